"""kernels/temb.py: a UNet's ResnetBlock2D time-embedding projections as one GEMM per forward.

A tiny diffusers UNet (4 resnets with a time embedding) patched, against an eager twin on the same
weights. Tolerance: float32 on the CPU with no tuned kernels: one [B, sum C] GEMM against four [B, C]
ones reorders no sums; 1e-5 covers the rest of the UNet's float32 rounding. A change counts as observed
when the output moves by more than 1e-3.
"""

from __future__ import annotations

import copy

import pytest
import torch

import kernels
from kernels import temb

diffusers = pytest.importorskip("diffusers")

from ._tiny_unet import CHANGES, OBSERVED, TOL, inputs, linear_calls, outputs, pair, weight_change  # noqa: E402


@pytest.fixture(autouse=True)
def registry(empty_registry):
    return empty_registry


def _resnets(u):
    return [m for m in u.modules() if type(m).__name__ == "ResnetBlock2D"]


def test_one_gemm_serves_every_resnet_and_matches_eager(registry):
    eager, opt = pair()
    rep = kernels.patch(opt)
    resnets = _resnets(opt)
    assert rep.patched["temb_packed"] == len(resnets) == 8
    group = resnets[0].__dict__[temb._ATTR][0]
    assert all(r.__dict__[temb._ATTR][0] is group for r in resnets) and group.intact()
    for r in resnets:  # each projection's Parameter is a view of the packed storage
        assert r.time_emb_proj.weight.untyped_storage().data_ptr() == group.weight.untyped_storage().data_ptr()
    x = inputs()
    ref, out = outputs(eager, opt, registry, x)
    torch.testing.assert_close(out, ref, **TOL)
    # the time MLP (2), one packed time-embedding GEMM, 4 transformer blocks' self-attention q/k/v (4) and
    # cross-attention queries (4), and one GEMM for all 4 cross-attentions' k/v (kernels/ctxkv.py)
    assert linear_calls(registry) == 2 + 1 + 4 + 4 + 1
    assert not group.active and group.out is None  # nothing kept past the forward


@pytest.mark.parametrize("change", CHANGES)
def test_weight_changes_between_forwards_show(registry, change):
    eager, opt = pair()
    kernels.patch(opt)
    if change == "lora":
        pytest.importorskip("peft")
    target = [n for n, m in eager.named_modules() if type(m).__name__ == "ResnetBlock2D"][2] + ".time_emb_proj"
    before, ref, out, opt = weight_change(change, eager, opt, target, inputs())
    assert (ref - before).abs().max() > OBSERVED
    torch.testing.assert_close(out, ref, **TOL)
    if change == "lora":  # the wrapped resnet left the group; the other seven share a new one
        entries = [r.__dict__.get(temb._ATTR) for r in _resnets(opt)]
        assert sum(e is None for e in entries) == 1 and len({id(e[0]) for e in entries if e}) == 1


def test_a_resnet_called_outside_the_forward_projects_for_itself(registry):
    """The packed output lives within one forward of the packed UNet: a resnet called on its own, with the
    same temb twice and its weight changed in place in between, sees the change."""
    eager, opt = pair()
    kernels.patch(opt)
    with torch.no_grad():
        opt(**inputs())
        r, re_ = _resnets(opt)[0], _resnets(eager)[0]
        h = torch.randn(2, 16, 8, 8)
        t = torch.randn(2, 64)
        first = r(h, t)
        for m in (r, re_):
            m.time_emb_proj.weight.data.mul_(-1)
        torch.testing.assert_close(r(h, t), re_(h, t), **TOL)
        assert (r(h, t) - first).abs().max() > OBSERVED


def test_graphs_and_grad_paths_and_unpatch(registry):
    eager, opt = pair()
    kernels.patch(opt)
    x = inputs()
    # autograd with trainable projections: each resnet projects itself, so every weight gets its gradient
    eager(**x).sample.square().sum().backward()
    opt(**x).sample.square().sum().backward()
    for a, b in zip(_resnets(opt), _resnets(eager)):
        torch.testing.assert_close(a.time_emb_proj.weight.grad, b.time_emb_proj.weight.grad, atol=1e-4, rtol=1e-4)
    kernels.unpatch(opt)
    ptrs = {r.time_emb_proj.weight.untyped_storage().data_ptr() for r in _resnets(opt)}
    assert len(ptrs) == 8 and all(temb._ATTR not in r.__dict__ for r in _resnets(opt))
    assert not opt._forward_pre_hooks and not opt._forward_hooks
    with torch.no_grad():
        torch.testing.assert_close(opt(**x).sample, eager(**x).sample, **TOL)


def test_fuse_temb_off(registry):
    _, opt = pair()
    rep = kernels.patch(opt, fuse_temb=False)
    assert "temb_packed" not in rep.patched and all(temb._ATTR not in r.__dict__ for r in _resnets(opt))


def test_inference_mode(registry):
    """Under torch.inference_mode temb is an inference tensor, which has no version counter: the packed
    forward raised RuntimeError ("Inference tensors do not track version counter") until it was keyed by
    identity there; it matches eager and still runs one time-embedding GEMM."""
    eager, opt = pair()
    kernels.patch(opt)
    with torch.inference_mode():
        before = linear_calls(registry)
        out = opt(**inputs()).sample
        packed_calls = linear_calls(registry) - before
        torch.testing.assert_close(out, eager(**inputs()).sample, **TOL)
    unpacked = copy.deepcopy(eager)
    kernels.patch(unpacked, fuse_temb=False)
    with torch.inference_mode():
        before = linear_calls(registry)
        unpacked(**inputs())
        assert packed_calls == linear_calls(registry) - before - len(_resnets(opt)) + 1


def test_each_member_gets_its_projection_contiguous(registry):
    """Each resnet's projected temb is a contiguous [B, C]: its consumer (the bias_add / conv2d shift
    epilogue) copied a column slice of the packed [B, sum C] output to contiguous, one copy kernel per
    resnet (an H100 profile, 2026-12-07: 22 more copy kernels per SD 1.5 step than unpacked). Now one
    relayout per run of equal widths (members stacked by width), and values equal each resnet's own
    projection."""
    _, opt = pair()
    kernels.patch(opt)
    resnets = _resnets(opt)
    group = resnets[0].__dict__[temb._ATTR][0]
    widths = sorted({r.time_emb_proj.out_features for r in resnets})
    assert [n for _, _, n in group.runs] == widths  # one run per width
    t = torch.randn(2, resnets[0].time_emb_proj.in_features)
    with torch.no_grad():
        group.open()
        try:
            got = [temb.projected(r, t) for r in resnets]
        finally:
            group.close()
        for r, y in zip(resnets, got):
            assert y.is_contiguous() and y.shape == (2, r.time_emb_proj.out_features)
            torch.testing.assert_close(y, r.time_emb_proj(torch.nn.functional.silu(t)), **TOL)
        assert len({y.untyped_storage().data_ptr() for y in got}) == len(widths)
