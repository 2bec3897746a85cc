"""kernels/qkv.py: an attention's q/k/v (self) or k/v (cross) projections as one GEMM over packed weights.

Each test patches a diffusers Attention (or a tiny UNet) and compares with an eager twin on the same
weights. Tolerance: float32 on the CPU with no tuned kernels (torch's GEMMs): one [M, 3N] GEMM against
three [M, N] ones reorders no sums, so 1e-5 absolute covers it; a change counts as observed when the
output moves by more than 1e-2.
"""

from __future__ import annotations

import copy

import pytest
import torch

import kernels
from kernels import qkv

pytest.importorskip("diffusers")
from diffusers.models.attention_processor import Attention  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)
OBSERVED = 1e-2


@pytest.fixture(autouse=True)
def registry(empty_registry):
    return empty_registry


def _pair(cross: int | None = None, bias: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    eager = Attention(16, cross_attention_dim=cross, heads=2, dim_head=8, bias=bias).eval()
    return eager, copy.deepcopy(eager)


def _inputs(cross: int | None = None):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 16, generator=g)
    ctx = torch.randn(2, 5, cross, generator=g) if cross else None
    return x, ctx


def _linear_calls(registry) -> int:
    return sum(n for (op, _), n in registry.calls.items() if op == "linear")


@pytest.mark.parametrize("cross,bias", [(None, False), (None, True), (24, False)])
def test_one_gemm_matches_eager(registry, cross, bias):
    eager, opt = _pair(cross, bias)
    rep = kernels.patch(opt)
    assert rep.patched["qkv_packed"] == 1
    p = opt.__dict__[qkv._ATTR]
    assert p.names == (("to_k", "to_v") if cross else ("to_q", "to_k", "to_v"))
    x, ctx = _inputs(cross)
    with torch.no_grad():
        ref = eager(x, encoder_hidden_states=ctx)
        registry.calls.clear()
        out = opt(x, encoder_hidden_states=ctx)
    torch.testing.assert_close(out, ref, **TOL)
    # self: q/k/v in one call, then to_out; cross: q, the k/v pair, to_out
    assert _linear_calls(registry) == (3 if cross else 2)


def test_parameters_are_views_of_one_storage_and_values_unchanged():
    eager, opt = _pair()
    kernels.patch(opt)
    p = opt.__dict__[qkv._ATTR]
    for name in ("to_q", "to_k", "to_v"):
        w = getattr(opt, name).weight
        assert isinstance(w, torch.nn.Parameter)
        assert w.untyped_storage().data_ptr() == p.weight.untyped_storage().data_ptr()
        torch.testing.assert_close(w, getattr(eager, name).weight, atol=0, rtol=0)
    assert set(opt.state_dict()) == set(eager.state_dict())


@pytest.mark.parametrize("change", ["inplace_data", "copy_", "load_state_dict", "replace_data", "new_parameter"])
def test_every_weight_change_shows_on_the_next_call(registry, change):
    """No stale packed weight: in-place writes reach the packed GEMM (same memory); a replaced
    Parameter breaks the packing, and the call runs the three projections as they are."""
    eager, opt = _pair()
    kernels.patch(opt)
    x, _ = _inputs()
    with torch.no_grad():
        before = opt(x)
        for m in (eager, opt):
            w = m.to_k.weight
            delta = torch.full_like(w, 0.05)
            if change == "inplace_data":
                w.data.add_(delta)
            elif change == "copy_":
                w.copy_(w + delta)
            elif change == "load_state_dict":
                sd = {k: v.clone() for k, v in m.state_dict().items()}
                sd["to_k.weight"] += delta
                m.load_state_dict(sd)
            elif change == "replace_data":
                w.data = (w + delta).clone()
            else:
                m.to_k.weight = torch.nn.Parameter(w + delta)
        ref = eager(x)
        out = opt(x)
    assert (ref - before).abs().max() > OBSERVED
    torch.testing.assert_close(out, ref, **TOL)
    packed = opt.__dict__[qkv._ATTR].intact(opt)
    assert packed == (change in ("inplace_data", "copy_", "load_state_dict"))
    if not packed:  # a later patch call packs again, with the new values
        kernels.patch(opt)
        assert opt.__dict__[qkv._ATTR].intact(opt)
        with torch.no_grad():
            torch.testing.assert_close(opt(x), ref, **TOL)


def test_autograd_reaches_the_parameters():
    """With grad on and trainable projections the packed path (a plain tensor) is not used, so every
    projection's weight gets its gradient."""
    eager, opt = _pair()
    kernels.patch(opt)
    x, _ = _inputs()
    eager(x).square().sum().backward()
    opt(x).square().sum().backward()
    for name in ("to_q", "to_k", "to_v"):
        torch.testing.assert_close(getattr(opt, name).weight.grad, getattr(eager, name).weight.grad, **TOL)


def test_peft_lora_on_a_projection_keeps_the_packing_and_matches(registry):
    """The LoRA layer's base Linear keeps its rows of the packed storage: one GEMM for q/k/v, then lora_A's
    GEMM and lora_B's accumulating into k's columns (before: the packing dropped, three GEMMs)."""
    peft = pytest.importorskip("peft")
    eager, opt = _pair()
    kernels.patch(opt)
    cfg = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["to_k"], init_lora_weights=False)
    torch.manual_seed(3)  # the same random LoRA weights in both
    eager = peft.inject_adapter_in_model(cfg, eager)
    torch.manual_seed(3)
    opt = peft.inject_adapter_in_model(copy.deepcopy(cfg), opt)
    kernels.patch(opt)  # what optimize's re-patch does when the tree changed
    x, _ = _inputs()
    registry.calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(opt(x), eager(x), **TOL)
    assert opt.__dict__[qkv._ATTR].intact(opt)
    assert _linear_calls(registry) == 3  # packed q/k/v, lora_A, to_out (lora_B: addmm_ into k's columns)
    assert registry.calls[("lora_linear", "packed")] == 1


def test_unpatch_gives_each_projection_its_own_storage():
    eager, opt = _pair()
    kernels.patch(opt)
    kernels.unpatch(opt)
    ptrs = {getattr(opt, n).weight.untyped_storage().data_ptr() for n in ("to_q", "to_k", "to_v")}
    assert len(ptrs) == 3
    assert qkv._ATTR not in opt.__dict__
    for name in ("to_q", "to_k", "to_v"):
        torch.testing.assert_close(getattr(opt, name).weight, getattr(eager, name).weight, atol=0, rtol=0)


def test_fuse_qkv_off_leaves_projections_alone(registry):
    _, opt = _pair()
    rep = kernels.patch(opt, fuse_qkv=False)
    assert "qkv_packed" not in rep.patched and qkv._ATTR not in opt.__dict__
    x, _ = _inputs()
    registry.calls.clear()
    with torch.no_grad():
        opt(x)
    assert _linear_calls(registry) == 4


def test_mixed_projection_dtypes_are_not_packed():
    _, opt = _pair()
    opt.to_v.double()
    kernels.patch(opt)
    assert qkv._ATTR not in opt.__dict__
