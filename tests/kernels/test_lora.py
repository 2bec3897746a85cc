"""LoRA on an optimized pipeline (issue 10 item 6), CPU: diffusers' load_lora_weights, set_adapters,
switching adapters, weighted mixes, fuse_lora / unfuse_lora and unload_lora_weights on a tiny
StableDiffusionPipeline after kernels.optimize, against an eager twin given the same calls: no
re-tuning, no manual re-patching, the images match, and the adapters' new Linear layers are served by
shapetune::linear (patched when the module tree changed).

Tolerance: float32 on the CPU, no tuned kernels: 1e-4 absolute on images in [0, 1].
"""

from __future__ import annotations

import copy

import pytest
import torch

import kernels
from scheduler.pipelines import build_sd_pipeline, build_sdxl_pipeline
from shapetune.target import detect

pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")


def _lora(unet, seed: int, targets=("to_q", "to_k", "to_v", "to_out.0"), prefix: str = "unet") -> dict:
    """A LoRA for this model (a UNet; or a text encoder, `prefix` its pipeline attribute) in diffusers'
    PEFT format ("unet." keys), random A and B."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    u = copy.deepcopy(unet)
    u.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(targets)))
    g = torch.Generator().manual_seed(seed)
    return {f"{prefix}.{k}": torch.randn(v.shape, generator=g) * 0.2 for k, v in get_peft_model_state_dict(u).items()}


def _image(pipe):
    g = torch.Generator().manual_seed(0)
    return torch.from_numpy(pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, generator=g,
                                 output_type="np").images)


@pytest.fixture
def registry(tmp_path):
    prev = kernels.set_registry(kernels.Registry(db_path=tmp_path / "empty.db", target=detect("llvm")))
    yield
    kernels.set_registry(prev)


def test_lora_load_switch_mix_fuse_unload_match_eager(registry):
    eager, opt = build_sd_pipeline(tiny=True), build_sd_pipeline(tiny=True)
    la, lb = _lora(eager.unet, 1), _lora(eager.unet, 2, ("to_q", "to_v", "ff.net.2"))
    base = _image(eager)
    kernels.optimize(opt)
    torch.testing.assert_close(_image(opt), base, atol=1e-4, rtol=0)

    steps = [  # (what, the call, whether the image changes)
        ("load a", lambda p: p.load_lora_weights(dict(la), adapter_name="a"), True),
        ("load b, switch to b",
         lambda p: (p.load_lora_weights(dict(lb), adapter_name="b"), p.set_adapters(["b"])), True),
        ("switch back to a", lambda p: p.set_adapters(["a"]), True),
        ("mix a 0.5 + b 1.0", lambda p: p.set_adapters(["a", "b"], adapter_weights=[0.5, 1.0]), True),
        ("fuse", lambda p: p.fuse_lora(), False),  # the same mix, merged into the weights
        ("unfuse", lambda p: p.unfuse_lora(), False),
    ]
    prev = base
    for name, step, changes in steps:
        step(eager)
        step(opt)
        ref = _image(eager)
        torch.testing.assert_close(_image(opt), ref, atol=1e-4, rtol=0, msg=name)
        assert ((ref - prev).abs().max() > 1e-3) == changes, name
        prev = ref
    lora_a = next(m for n, m in opt.unet.named_modules() if n.endswith("attn1.to_q.lora_A.a"))
    assert getattr(lora_a, "_shapetune_patched", None) == "linear"
    for p in (eager, opt):
        p.unload_lora_weights()
    out = _image(opt)
    torch.testing.assert_close(out, _image(eager), atol=1e-4, rtol=0)
    torch.testing.assert_close(out, base, atol=1e-4, rtol=0)


def test_lora_hotswap_keeps_every_graph_valid_and_matches_eager(registry):
    """diffusers' `load_lora_weights(..., hotswap=True)` writes a new LoRA's weights into the loaded adapter's
    tensors in place (same rank and targets): the optimized UNet's module tree, parameter storage and PEFT
    adapter state, all a CUDA graph depends on, stay the same, so a graph captured before the swap replays
    the new LoRA without a capture (tests/kernels/test_graphs_gpu.py runs it on a GPU)."""
    eager, opt = build_sd_pipeline(tiny=True), build_sd_pipeline(tiny=True)
    la, lb = _lora(eager.unet, 1), _lora(eager.unet, 2)
    rep = kernels.optimize(opt)
    g = rep.components["unet"].graphs["forward"]
    for p in (eager, opt):
        p.load_lora_weights(dict(la), adapter_name="x")
    with_a = _image(eager)
    torch.testing.assert_close(_image(opt), with_a, atol=1e-4, rtol=0)
    baked, key = g._state(), g._adapter_state()
    for p in (eager, opt):
        p.load_lora_weights(dict(lb), adapter_name="x", hotswap=True)
    ref = _image(eager)
    assert (ref - with_a).abs().max() > 1e-3  # the swap changed the image
    torch.testing.assert_close(_image(opt), ref, atol=1e-4, rtol=0)
    assert g._state() == baked and g._adapter_state() == key  # nothing a captured graph baked in changed


def test_sdxl_lora_on_the_unet_and_both_text_encoders_matches_eager(registry):
    """StableDiffusionXLPipeline: one LoRA over the UNet's attention projections and both CLIP text
    encoders' (diffusers' load_lora_weights splits it by prefix), loaded after optimize, weighted, then
    unloaded. The UNet's q/k/v LoRA layers keep their packed GEMMs (counted "packed")."""
    eager, opt = build_sdxl_pipeline(tiny=True), build_sdxl_pipeline(tiny=True)
    clip = ("q_proj", "k_proj", "v_proj", "out_proj")
    lora = {**_lora(eager.unet, 1), **_lora(eager.text_encoder, 2, clip, "text_encoder"),
            **_lora(eager.text_encoder_2, 3, clip, "text_encoder_2")}
    base = _image(eager)
    kernels.optimize(opt)
    for name, step in (("load", lambda p: p.load_lora_weights(dict(lora), adapter_name="a")),
                       ("weight 0.5", lambda p: p.set_adapters(["a"], adapter_weights=[0.5]))):
        step(eager)
        step(opt)
        kernels.get_registry().calls.clear()
        ref = _image(eager)
        torch.testing.assert_close(_image(opt), ref, atol=1e-4, rtol=0, msg=name)
        assert (ref - base).abs().max() > 1e-3, name
        assert kernels.get_registry().calls[("lora_linear", "packed")] > 0, name
    for p in (eager, opt):
        p.unload_lora_weights()
    torch.testing.assert_close(_image(opt), base, atol=1e-4, rtol=0)
