"""kernels/ctxkv.py: a UNet's cross-attention k/v projections as one GEMM per forward.

A tiny diffusers UNet (4 transformer blocks, so 4 cross-attentions reading one context) patched, against
an eager twin on the same weights. Tolerance: float32 on the CPU with no tuned kernels: one
[B*S, sum 2C] GEMM against four [B*S, 2C] ones reorders no sums; 1e-5 covers the rest of the UNet's
float32 rounding. A change counts as observed when the output moves by more than 1e-3.
"""

from __future__ import annotations


import pytest
import torch

import kernels
from kernels import ctxkv, qkv

diffusers = pytest.importorskip("diffusers")

from ._tiny_unet import CHANGES, OBSERVED, TOL, inputs, linear_calls, outputs, pair, weight_change  # noqa: E402


@pytest.fixture(autouse=True)
def registry(empty_registry):
    return empty_registry


def _cross(u):
    return [m for n, m in u.named_modules() if n.endswith("attn2")]


def test_one_gemm_serves_every_cross_attention_and_matches_eager(registry):
    eager, opt = pair()
    rep = kernels.patch(opt)
    attns = _cross(opt)
    assert rep.patched["ctxkv_packed"] == len(attns) == 4
    group = attns[0].__dict__[ctxkv._ATTR][0]
    assert all(a.__dict__[ctxkv._ATTR][0] is group for a in attns) and group.intact()
    ptr = group.weight.untyped_storage().data_ptr()
    for a in attns:  # every k/v Parameter, and each attention's own k/v packing, views the one storage
        assert {a.to_k.weight.untyped_storage().data_ptr(), a.to_v.weight.untyped_storage().data_ptr(),
                a.__dict__[qkv._ATTR].weight.untyped_storage().data_ptr()} == {ptr}
        assert a.__dict__[qkv._ATTR].intact(a)
    x = inputs()
    ref, out = outputs(eager, opt, registry, x)
    calls = linear_calls(registry)
    torch.testing.assert_close(out, ref, **TOL)
    assert not group.active and group.out is None  # nothing kept past the forward
    _, unshared = pair()
    kernels.patch(unshared)
    for a in _cross(unshared):
        ctxkv.unpack(a)
    with torch.no_grad():
        registry.calls.clear()
        torch.testing.assert_close(unshared(**x).sample, ref, **TOL)
    assert calls == linear_calls(registry) - 3  # 4 k/v GEMMs became 1


@pytest.mark.parametrize("change", CHANGES)
def test_weight_changes_between_forwards_show(registry, change):
    eager, opt = pair()
    kernels.patch(opt)
    if change == "lora":
        pytest.importorskip("peft")
    target = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"
    before, ref, out, opt = weight_change(change, eager, opt, target, inputs())
    assert (ref - before).abs().max() > OBSERVED
    torch.testing.assert_close(out, ref, **TOL)
    if change == "lora":  # the wrapped attention stays in the group: its delta is added to its columns
        entries = [a.__dict__.get(ctxkv._ATTR) for a in _cross(opt)]
        assert all(entries) and len({id(e[0]) for e in entries}) == 1 and entries[0][0].intact()
        assert registry.calls[("lora_linear", "packed")] >= 1


def test_outside_the_forward_inference_mode_grad_and_unpatch(registry):
    eager, opt = pair()
    kernels.patch(opt)
    x = inputs()
    with torch.no_grad():  # an attention called on its own projects for itself (no group forward open)
        a, ae = _cross(opt)[0], _cross(eager)[0]
        h, c = torch.randn(2, 16, a.to_q.in_features), x["encoder_hidden_states"]
        torch.testing.assert_close(a(h, encoder_hidden_states=c), ae(h, encoder_hidden_states=c), **TOL)
    with torch.inference_mode():  # an inference-tensor context has no version counter
        torch.testing.assert_close(opt(**x).sample, eager(**x).sample, **TOL)
    # autograd with trainable projections: each attention projects itself, so every weight gets its gradient
    eager(**x).sample.square().sum().backward()
    opt(**x).sample.square().sum().backward()
    for a, b in zip(_cross(opt), _cross(eager)):
        torch.testing.assert_close(a.to_k.weight.grad, b.to_k.weight.grad, atol=1e-4, rtol=1e-4)
    kernels.unpatch(opt)
    ptrs = {p.untyped_storage().data_ptr() for a in _cross(opt) for p in (a.to_k.weight, a.to_v.weight)}
    assert len(ptrs) == 8 and all(ctxkv._ATTR not in a.__dict__ for a in _cross(opt))
    assert not opt._forward_pre_hooks and not opt._forward_hooks
    with torch.no_grad():
        torch.testing.assert_close(opt(**x).sample, eager(**x).sample, **TOL)


def test_fuse_qkv_off(registry):
    _, opt = pair()
    rep = kernels.patch(opt, fuse_qkv=False)
    assert "ctxkv_packed" not in rep.patched and all(ctxkv._ATTR not in a.__dict__ for a in _cross(opt))


def test_fuse_ctxkv_off_keeps_the_per_attention_packing(registry):
    eager, opt = pair()
    rep = kernels.patch(opt, fuse_ctxkv=False)
    assert "ctxkv_packed" not in rep.patched and rep.patched["qkv_packed"] == 8
    assert all(ctxkv._ATTR not in a.__dict__ and qkv._ATTR in a.__dict__ for a in _cross(opt))
    with torch.no_grad():
        torch.testing.assert_close(opt(**inputs()).sample, eager(**inputs()).sample, **TOL)


def test_each_inner_run_of_a_graphed_call_computes_its_own_kv(registry):
    """kernels.graphs warms up and captures a forward by running the model's inner forward several times
    inside one call of the model, whose hooks open the group's forward once around them all. Each run
    must compute the shared k/v itself: before, the capture took the k/v the last warm-up had cached for
    the same static context buffer, so the graph read memory outside its pool that was freed when the
    call ended (wrong outputs for a new context, an illegal address on an H100). Here a weight written
    between two runs must show in the second."""
    from kernels.graphs import GraphedCall

    eager, opt = pair()
    kernels.patch(opt)
    g = GraphedCall(opt)  # installs itself as opt.forward; on the CPU only its inner runs are exercised
    group = _cross(opt)[0].__dict__[ctxkv._ATTR][0]  # (the time-embedding group stays closed: its resnets project alone)
    target = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"
    x = inputs()
    with torch.no_grad():
        group.open()  # what the model's pre-hook does around a GraphedCall's call
        registry.calls.clear()
        first = g._inner_run((), x).sample
        for m in (eager, opt):
            dict(m.named_modules())[target].weight.data.mul_(-1)
        second = g._inner_run((), x).sample
        group.close()
        ref = eager(**x).sample
    assert (ref - first).abs().max() > OBSERVED
    torch.testing.assert_close(second, ref, **TOL)
    g.uninstall()
