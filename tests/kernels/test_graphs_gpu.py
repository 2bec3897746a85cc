"""On an NVIDIA GPU: CUDA graphs per call signature (kernels.graphs through kernels.optimize) on a tiny
fp16 diffusers UNet: replay equals the patched eager run, one capture per shape, LRU eviction, weights
changed in place seen without re-capture, replaced storage and PEFT adapters re-captured (and matching
eager with the same adapter), no layout transposes inside the captured forward.

Tolerances: replay vs the same patched module run eagerly — the same kernels on the same inputs —
1e-3 absolute (fp16 outputs of O(1); equal in practice); vs eager diffusers in fp16, relative L2
<= 1e-2 (the patched path rounds at other points: channels_last convs, fused SiLU).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs an NVIDIA GPU", allow_module_level=True)

import kernels  # noqa: E402
from kernels.registry import Registry, set_registry  # noqa: E402
from shapetune.target import detect  # noqa: E402

diffusers = pytest.importorskip("diffusers")

TINY = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32)


@pytest.fixture(autouse=True)
def registry(tmp_path):
    prev = set_registry(Registry(db_path=tmp_path / "empty.db", target=detect("cuda")))
    yield
    set_registry(prev)


def _unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(**TINY).to("cuda", torch.float16).eval()


def _optimized(**kw):
    """A tiny UNet, its optimized deep copy (the same weights) and the copy's GraphedCall of forward."""
    eager = _unet()
    unet = copy.deepcopy(eager)
    return eager, unet, kernels.optimize(unet, **kw).components["model"].graphs["forward"]


def _inputs(batch=2, lat=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(batch, 4, lat, lat, generator=g).to("cuda", torch.float16),
                timestep=torch.tensor(500, device="cuda"),
                encoder_hidden_states=torch.randn(batch, 77, 64, generator=g).to("cuda", torch.float16))


def _run(m, x):
    with torch.no_grad():
        return m(**x).sample


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_replay_equals_the_patched_eager_run_one_capture_per_shape():
    eager, unet, g = _optimized()
    for seed in (1, 2, 3):
        x = _inputs(seed=seed)
        out = _run(unet, x)
        with torch.no_grad():
            again = g.inner(**x).sample  # the same patched forward, eagerly
        torch.testing.assert_close(out, again, atol=1e-3, rtol=0)
        assert _rel(out, _run(eager, x)) < 1e-2
    assert g.stats["captured"] == 1 and g.stats["replayed"] == 3, g.stats
    out1 = _run(unet, _inputs(batch=1))  # a new shape: one more capture
    assert g.stats["captured"] == 2 and out1.shape[0] == 1
    # a shape change costs one capture (the process's first one also pays CUDA's lazy module loading
    # and cuBLAS/cuDNN set-up: over 2 s on a cold machine, so it is not the figure)
    assert g.capture_s[-1] < 2.0, g.capture_s
    parts = g.capture_parts[-1]  # where it went: the warm-up runs, and the captured run with instantiation
    assert len(g.capture_parts) == 2 and parts["warmups"] == g.warmup
    assert 0 <= parts["inputs_s"] + parts["warmup_s"] + parts["capture_s"] <= g.capture_s[-1]
    a, b = _run(unet, _inputs(seed=5)), _run(unet, _inputs(batch=1, seed=5))  # outputs are the caller's own
    _run(unet, _inputs(seed=6))
    torch.testing.assert_close(a, _run(unet, _inputs(seed=5)), atol=0, rtol=0)
    torch.testing.assert_close(b, _run(unet, _inputs(batch=1, seed=5)), atol=0, rtol=0)


class _Scaled:
    """An attention processor that is no nn.Module (diffusers keeps it as a plain attribute): diffusers'
    SDPA processor with its output scaled."""

    def __init__(self, factor: float):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.inner, self.factor = AttnProcessor2_0(), factor

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return self.inner(attn, hidden_states, *args, **kwargs) * self.factor


def _changed_after_capture_is_captured_again(change):
    """Capture, then `change(model)` in both the eager and the optimized UNet: the next call drops the graph
    and captures again (one invalidation), and matches eager with the change."""
    eager, unet, g = _optimized()
    x = _inputs()
    _run(unet, x)
    for m in (eager, unet):
        change(m)
    ref = _run(eager, x)
    assert _rel(_run(unet, x), ref) < 1e-2
    assert g.stats["invalidated"] == 1 and g.stats["captured"] == 2, g.stats


def test_an_attention_processor_set_after_capture_is_captured_again():
    """Defect (before: the replays kept the processor of the capture): `set_processor` after a capture
    drops the graphs; the next call captures the new processor and matches eager with it."""
    _changed_after_capture_is_captured_again(
        lambda m: m.down_blocks[0].attentions[0].transformer_blocks[0].attn1.set_processor(_Scaled(3.0)))


def test_freeu_enabled_after_capture_is_captured_again():
    """Defect (before: the replays kept the capture's branch): enable_freeu sets plain attributes the up
    blocks' forwards read; after it, the next call captures again and matches eager with FreeU."""
    _changed_after_capture_is_captured_again(lambda m: m.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4))


def test_a_graph_captured_outside_autocast_does_not_serve_a_call_under_it():
    """Defect (before: autocast was no part of the key): a float32 UNet captured without autocast replayed its
    float32 graph for a call under torch.autocast(float16), whose eager output is computed in and returned as
    float16. Now each autocast state has its own graph."""
    torch.manual_seed(0)
    eager = diffusers.UNet2DConditionModel(**TINY).to("cuda").eval()
    opt = copy.deepcopy(eager)
    g = kernels.optimize(opt).components["model"].graphs["forward"]
    x = {k: v.float() if v.is_floating_point() else v for k, v in _inputs().items()}
    _run(opt, x)
    with torch.autocast("cuda", torch.float16):
        ref, out = _run(eager, x), _run(opt, x)
    assert out.dtype == ref.dtype == torch.float16 and g.stats["captured"] == 2
    assert _rel(out, ref) < 5e-3


def test_lru_bound_evicts_the_least_recent_graph():
    unet = _unet()
    rep = kernels.optimize(unet, max_graphs=2)
    g = rep.components["model"].graphs["forward"]
    for b in (1, 2, 3):
        _run(unet, _inputs(batch=b))
    assert len(g.graphs) == 2 and g.stats["evicted"] == 1
    _run(unet, _inputs(batch=1))  # evicted: captured again
    assert g.stats["captured"] == 4


def test_weights_changed_in_place_are_seen_replaced_storage_is_recaptured():
    eager, unet, g = _optimized()
    x = _inputs()
    _run(unet, x)
    for m in (eager, unet):  # in place, through .data (as a PEFT merge writes): the graph reads the memory
        with torch.no_grad():
            m.conv_in.weight.data.mul_(1.5)
            m.up_blocks[1].attentions[0].proj_out.bias.data.add_(0.25)
    assert _rel(_run(unet, x), _run(eager, x)) < 1e-2
    assert g.stats["invalidated"] == 0 and g.stats["captured"] == 1
    for m in (eager, unet):  # new storage: the graph would read the old tensor
        w = m.conv_out.weight
        w.data = (w.data * 0.5).contiguous(memory_format=torch.channels_last)
    assert _rel(_run(unet, x), _run(eager, x)) < 1e-2
    assert g.stats["invalidated"] == 1 and g.stats["captured"] == 2


def test_a_peft_adapter_is_patched_and_recaptured_and_matches_eager():
    from peft import LoraConfig

    eager, unet, g = _optimized()
    x = _inputs()
    base = _run(unet, x)
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    for m in (eager, unet):
        m.add_adapter(cfg)
    torch.manual_seed(7)  # lora_B starts at zero: give it values; lora_A (random init) copied over too
    lora = {k: (torch.randn_like(v) * 0.1 if "lora_B" in k else v.clone())
            for k, v in eager.state_dict().items() if "lora_" in k}
    for m in (eager, unet):
        m.load_state_dict(lora, strict=False)
    out = _run(unet, x)
    assert g.stats["invalidated"] == 1 and g.stats["captured"] == 2
    assert _rel(out, _run(eager, x)) < 1e-2 and _rel(out, base) > 1e-2  # the adapter changes the output
    lora_a = next(m for n, m in unet.named_modules() if n.endswith("to_q.lora_A.default"))
    assert getattr(lora_a, "_shapetune_patched", None) == "linear"  # the adapter's Linear layers are served
    for m in (eager, unet):
        m.set_adapters(["default"], weights=[0.5])  # a Python scale the forward reads: a graph of its own
    assert _rel(_run(unet, x), _run(eager, x)) < 1e-2
    assert g.stats["invalidated"] == 1 and g.stats["captured"] == 3
    for m in (eager, unet):
        m.set_adapters(["default"], weights=[1.0])  # back: the graph captured for that state replays
    assert _rel(_run(unet, x), _run(eager, x)) < 1e-2 and _rel(_run(unet, x), out) < 2e-3
    assert g.stats["captured"] == 3


def test_no_layout_transposes_inside_the_captured_forward():
    """channels_last end to end: profiling the graph's eager twin (the patched forward on the static,
    channels_last inputs) shows no copy kernels that transpose NCHW <-> NHWC."""
    from torch.profiler import ProfilerActivity, profile

    unet = _unet()
    rep = kernels.optimize(unet)
    g = rep.components["model"].graphs["forward"]
    x = {**_inputs(), "sample": _inputs()["sample"].contiguous(memory_format=torch.channels_last)}
    _run(unet, x)
    with profile(activities=[ProfilerActivity.CUDA]) as prof, torch.no_grad():
        g.inner(**x)
    names = [e.key for e in prof.key_averages()]
    relayout = [n for n in names if "nchwToNhwc" in n or "nhwcToNchw" in n or "transpose" in n.lower()]
    assert not relayout, relayout
    s = kernels.fallback_summary()
    assert not any("relayout" in k or "weight_relayout" in k for d in s.values() for k in d), s


def test_pad_batch_replays_a_larger_captured_batch_and_matches_unpadded():
    eager, unet, g = _optimized(pad_batch=True)
    _run(unet, _inputs(batch=4))
    x3 = _inputs(batch=3, seed=9)
    out = _run(unet, x3)  # no graph of batch 3: the batch-4 graph, padded
    assert g.stats["captured"] == 1 and g.stats["padded"] == 1, g.stats
    assert out.shape[0] == 3
    assert _rel(out, _run(eager, x3)) < 1e-2
    with torch.no_grad():
        twin = g.inner(**x3).sample  # the patched forward at batch 3, eagerly
    assert _rel(out, twin) < 2e-3
    _run(unet, _inputs(batch=5))  # larger than every graph: captured
    assert g.stats["captured"] == 2


def test_peak_memory_of_capture_and_replay_is_no_higher_than_eager():
    """Warm-up and capture run on one stream per device (one cuBLAS/cuDNN workspace, not one per
    capture) and intermediates live in the shared pool, so peak allocated memory stays at eager's."""
    x = _inputs(batch=4, lat=32)

    def peak(optimized: bool) -> int:
        m = _unet()
        if optimized:
            kernels.optimize(m)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            _run(m, x)
        torch.cuda.synchronize()
        p = torch.cuda.max_memory_allocated()
        if optimized:
            kernels.restore(m)
        del m
        torch.cuda.empty_cache()
        return p

    eager, opt = peak(False), peak(True)
    assert opt <= eager * 1.02 + (1 << 20), (opt / 2 ** 20, eager / 2 ** 20)


def test_a_lora_switch_captures_without_warmups_and_matches_eager():
    """Switching to an adapter not yet captured at this shape skips the warm-up runs (its kernels, plans and
    workspaces are those of the graph already captured under the other adapter): one captured run, and the
    output still equals eager with that adapter active."""
    from peft import LoraConfig

    eager, unet, g = _optimized()
    cfg = dict(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    for name, seed in (("a", 1), ("b", 2)):
        for m in (eager, unet):
            m.add_adapter(LoraConfig(**cfg), adapter_name=name)
            torch.manual_seed(seed)
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if f"lora_A.{name}" in n or f"lora_B.{name}" in n:
                        p.copy_(torch.randn_like(p) * 0.1)
    x = _inputs()
    outs = {}
    for name in ("a", "b", "a", "b"):
        for m in (eager, unet):
            m.set_adapters([name])
        out = _run(unet, x)
        assert _rel(out, _run(eager, x)) < 1e-2, name
        outs.setdefault(name, out)
    assert _rel(outs["a"], outs["b"]) > 1e-2  # the adapters differ
    assert g.stats["captured"] == 2 and g.stats["replayed"] == 4 and not g.stats["rewarmup_retry"], g.stats
    assert [p["warmups"] for p in g.capture_parts] == [g.warmup, 0]
    calls = kernels.get_registry().calls  # the LoRA layers took kernels/lora.py's one-GEMM path
    assert calls[("lora_linear", "fused")] > 0 and not calls[("lora_linear", "peft")], calls
    assert calls[("lora_linear", "packed")] > 0, calls  # q/k/v deltas into the packed GEMM's columns


def _lora_state(unet, seed: int) -> dict:
    """A rank-4 LoRA on every attention projection of this UNet, PEFT format, random A and B."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    u = copy.deepcopy(unet)
    u.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) * 0.1).to(v.dtype) for k, v in get_peft_model_state_dict(u).items()}


def test_a_lora_hotswap_replays_the_graph_without_a_capture():
    """load_lora_adapter(..., hotswap=True) writes the new LoRA into the adapter's tensors in place: the
    graph captured with the old LoRA replays the new one, no capture, and matches eager."""
    eager, unet, g = _optimized()
    la, lb = _lora_state(eager, 1), _lora_state(eager, 2)
    x = _inputs()
    for m in (eager, unet):
        m.load_lora_adapter(dict(la), prefix=None, adapter_name="x")
    with_a = _run(unet, x)
    assert _rel(with_a, _run(eager, x)) < 1e-2
    captured = g.stats["captured"]
    for m in (eager, unet):
        m.load_lora_adapter(dict(lb), prefix=None, adapter_name="x", hotswap=True)
    out, ref = _run(unet, x), _run(eager, x)
    assert _rel(out, ref) < 1e-2 and _rel(out, with_a) > 1e-2
    assert g.stats["captured"] == captured == 1 and not g.stats["invalidated"], g.stats
