"""kernels/lora.py on the CPU: a patched PEFT LoRA Linear accumulates each adapter's scaled delta into its
base output with one GEMM (addmm_, beta = 1) and computes what PEFT computes; every case it does not
cover (merged, disabled, dropout in training, autograd, a tensor scale, fuse_lora_add=False) runs PEFT's
own forward, counted. A tiny diffusers UNet with LoRAs on its attention projections against an eager twin
given the same adapters, float32, 1e-5."""

from __future__ import annotations

import pytest
import torch

import kernels

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from ._tiny_unet import OBSERVED, TOL, inputs, pair  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LAYERS = 4 * 2 * 4  # 4 transformer blocks x 2 attentions x 4 projections


def _with_loras(eager, opt):
    from peft import LoraConfig

    for name, seed, alpha in (("a", 1, 8), ("b", 2, 2)):
        for m in (eager, opt):
            m.add_adapter(LoraConfig(r=4, lora_alpha=alpha, target_modules=TARGETS), adapter_name=name)
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if f".lora_A.{name}." in n or f".lora_B.{name}." in n:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _run(m, x):
    with torch.no_grad():
        return m(**x).sample


def _calls(reg):
    return {k: n for (op, k), n in reg.calls.items() if op == "lora_linear"}


def _linear_calls(reg):
    return sum(n for (op, _), n in reg.calls.items() if op in ("linear", "linear_residual"))


#: LoRA layers whose base Linear runs in a packed GEMM (kernels/qkv.py, kernels/ctxkv.py): attn1's q, k, v
#: and attn2's k, v per block; the rest (attn2's q, both to_out.0) add their deltas to their own output
PACKED = 4 * (3 + 2)


def test_the_delta_is_accumulated_by_one_gemm_and_matches_peft(empty_registry):
    """Each adapter's delta by one GEMM into the base output, and the base layers keep their fusions: the
    q/k/v (k/v) packing and to_out.0's residual add. The GEMMs a forward runs are those without LoRA plus
    one lora_A GEMM per adapter and layer (before: q, k and v as three GEMMs, to_out.0 and its add apart)."""
    eager, opt = pair()
    kernels.patch(opt)
    x = inputs()
    base = _run(eager, x)
    empty_registry.calls.clear()
    _run(opt, x)
    gemms = _linear_calls(empty_registry)
    _with_loras(eager, opt)  # adapters added after patch: the next patch (optimize's repatch) serves them
    rep = kernels.patch(opt)
    assert rep.patched["lora_linear"] == LAYERS
    for adapters, weights in ((["a"], None), (["b"], None), (["a", "b"], [0.5, 1.5])):
        for m in (eager, opt):
            m.set_adapters(adapters, weights)
        empty_registry.calls.clear()
        ref, out = _run(eager, x), _run(opt, x)
        torch.testing.assert_close(out, ref, **TOL)
        assert (ref - base).abs().max() > OBSERVED  # the adapters change the output
        assert _calls(empty_registry) == {"packed": PACKED, "fused": LAYERS - PACKED}, adapters
        assert _linear_calls(empty_registry) == gemms + LAYERS * len(adapters), adapters


def test_a_lora_layer_that_peft_must_run_unpacks_only_its_attention(empty_registry):
    """A LoRA layer kernels/lora.py does not restate (here: dropout in training on one adapter of one
    projection) makes its attention's packed GEMM step aside for that call: the
    projections run as they are, PEFT's forward for that layer; the other attentions stay packed."""
    eager, opt = pair()
    _with_loras(eager, opt)
    kernels.patch(opt)
    for m in (eager, opt):
        m.set_adapters(["a"])
        layer = next(mod for n, mod in m.named_modules() if n.endswith("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"))
        layer.lora_dropout["a"] = torch.nn.Dropout(0.5).train()
    x = inputs()
    empty_registry.calls.clear()
    torch.manual_seed(3)
    ref = _run(eager, x)
    torch.manual_seed(3)
    out = _run(opt, x)
    torch.testing.assert_close(out, ref, **TOL)
    assert _calls(empty_registry) == {"packed": PACKED - 3, "fused": LAYERS - PACKED + 2, "peft": 1}


@pytest.mark.parametrize("case", ["merged_then_disabled", "train_dropout", "grad", "tensor_scale", "opted_out"])
def test_what_it_does_not_cover_runs_peft_and_still_matches(empty_registry, case):
    from peft.tuners.lora.layer import Linear as LoraLinear

    eager, opt = pair()
    _with_loras(eager, opt)
    kernels.patch(opt, fuse_lora_add=case != "opted_out")
    for m in (eager, opt):
        m.set_adapters(["a"])
        layers = [mod for mod in m.modules() if isinstance(mod, LoraLinear)]
        if case == "merged_then_disabled":  # PEFT's forward unmerges first: a side effect only it has
            for mod in layers:
                mod.merge()
            m.disable_adapters()
        elif case == "train_dropout":  # p > 0 in training: PEFT's dropout (seeded alike below)
            for mod in layers:
                mod.lora_dropout["a"] = torch.nn.Dropout(0.5).train()
        elif case == "tensor_scale":  # what enable_lora_hotswap makes of the scales
            for mod in layers:
                mod.scaling["a"] = torch.tensor(mod.scaling["a"])
    x = inputs()
    empty_registry.calls.clear()
    torch.manual_seed(3)
    if case == "grad":
        ref = eager(**x).sample.detach()
        torch.manual_seed(3)
        out = opt(**x).sample.detach()
    else:
        torch.manual_seed(3)
        ref = _run(eager, x)
        torch.manual_seed(3)
        out = _run(opt, x)
    torch.testing.assert_close(out, ref, **TOL)
    calls = _calls(empty_registry)
    assert calls.get("fused", 0) == 0 and calls.get("peft", 0) == LAYERS, calls


@pytest.mark.parametrize("case", ["merged", "disabled"])
def test_merged_or_disabled_adapters_keep_every_fusion_of_the_base_layers(empty_registry, case):
    """A fused LoRA (PEFT merge: its deltas written into the base weights, in place) and disabled adapters
    run the base layers alone, as PEFT does: the same GEMMs as the LoRA-less forward (q/k/v packed, the
    residual adds in to_out.0's epilogue), no lora_A GEMM, and PEFT's result. Before, both ran PEFT's
    forward on every LoRA layer: q, k and v as three GEMMs and each residual add a pass of its own."""
    eager, opt = pair()
    kernels.patch(opt)
    x = inputs()
    empty_registry.calls.clear()
    base = _run(opt, x)
    gemms = _linear_calls(empty_registry)
    _with_loras(eager, opt)
    kernels.patch(opt)
    for m in (eager, opt):
        m.set_adapters(["a", "b"], [0.5, 1.5])
        if case == "merged":
            for mod in m.modules():
                if hasattr(mod, "merge") and hasattr(mod, "lora_A"):
                    mod.merge()
        else:
            m.disable_adapters()
    empty_registry.calls.clear()
    ref, out = _run(eager, x), _run(opt, x)
    torch.testing.assert_close(out, ref, **TOL)
    assert ((ref - base).abs().max() > OBSERVED) == (case == "merged")  # merged deltas count, disabled ones not
    assert _linear_calls(empty_registry) == gemms
    assert set(_calls(empty_registry)) <= {"base"}, _calls(empty_registry)


def test_unpatch_gives_peft_its_forward_back(empty_registry):
    eager, opt = pair()
    _with_loras(eager, opt)
    kernels.patch(opt)
    kernels.unpatch(opt)
    layer = next(m for n, m in opt.named_modules() if n.endswith("attn1.to_q"))
    assert "forward" not in layer.__dict__ and not any(k.startswith("_shapetune") for k in layer.__dict__)
    x = inputs()
    torch.testing.assert_close(_run(opt, x), _run(eager, x), **TOL)


def test_a_lora_on_to_out_computes_each_attention_once(empty_registry):
    """Defect (before this fix): with to_out.0 LoRA-wrapped, the patched transformer block asked the
    processor for attention + residual fused into to_out.0, which computed q/k/v and the attention, found
    to_out.0 not a plain Linear, discarded them and ran the whole attention again unfused: every
    attention twice per forward."""
    from peft import LoraConfig

    eager, opt = pair()
    for m in (eager, opt):
        m.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_out.0"]))
    kernels.patch(opt)
    x = inputs()
    empty_registry.calls.clear()
    ref, out = _run(eager, x), _run(opt, x)
    torch.testing.assert_close(out, ref, **TOL)
    assert sum(n for (op, _), n in empty_registry.calls.items() if op == "attention") == 8  # 4 blocks x 2


def test_a_lora_on_the_geglu_projection_keeps_the_gate_in_one_pass(empty_registry):
    """A LoRA on the FeedForward's GEGLU projection (ff.net.0.proj, a common LoRA target): the projection
    with its delta, then h * gelu(g) as one gelu_gate pass, as with no LoRA (before: diffusers' chunk, gelu
    and multiply, three kernels), matching PEFT."""
    from peft import LoraConfig

    eager, opt = pair()
    x = inputs()
    base = _run(eager, x)
    for m in (eager, opt):
        torch.manual_seed(5)  # the same random A and B in both
        m.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["ff.net.0.proj"], init_lora_weights=False))
    kernels.patch(opt)
    empty_registry.calls.clear()
    ref, out = _run(eager, x), _run(opt, x)
    torch.testing.assert_close(out, ref, **TOL)
    assert (ref - base).abs().max() > OBSERVED
    assert sum(n for (op, _), n in empty_registry.calls.items() if op == "gelu_gate") == 4  # one per block
    assert _calls(empty_registry) == {"fused": 4}
