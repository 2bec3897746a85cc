"""shapetune::attention: the llvm template, tuned op vs torch SDPA, buckets, fallbacks, opcheck.

Tolerances (scheduler.verify.TOLERANCES): float32 on the CPU, 1e-4 elementwise and 1e-5 relative L2.
Scores, softmax and P·V all stay in fp32 here; the only differences from the float64 reference are
the summation orders of the d-long dot products and the skv-long sums (~sqrt(n) * 6e-8 relative),
three orders of magnitude below the bound. The fp16 GPU bounds are argued in shapetune/ops/attention.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import kernels
from shapetune.ops import opdef
from shapetune.ops.attention import attention_workload, scale_of
from scheduler import templates
from scheduler.tuner import TuneOptions, tune
from scheduler.verify import check_output
from shapetune.buckets import DEFAULT, concrete
from shapetune.target import detect

# (b, sq, skv, h, d): self-attention at an odd length, cross-attention to 77 tokens (SD's text length)
SELF = (2, 37, 37, 3, 16)
CROSS = (1, 20, 77, 2, 40)
BUCKET = DEFAULT.bucket_of(attention_workload(1, 24, 24, 2, 8, "float32"))  # sq, skv in [17, 32]
BATCH_BUCKET = DEFAULT.bucket_of(attention_workload(3, 24, 24, 2, 8, "float32"))  # b in [3, 4] too


@pytest.fixture(scope="module")
def tuned_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("attn") / "tuning.db"
    ws = [attention_workload(*SELF, "float32"), attention_workload(*CROSS, "float32"), BUCKET]
    reps = tune(ws, detect("llvm"), path, TuneOptions(trials=3, batch=3, templates=("attn_llvm",)))
    assert all(r.best is not None for r in reps), [r.by_status for r in reps]
    assert all(r.by_status.get("wrong_result", 0) == 0 for r in reps), [r.by_status for r in reps]
    return path


def _ref(q, k, v, scale=None):
    """float64 SDPA on [B, S, H, D] tensors."""
    o = F.scaled_dot_product_attention(*(t.double().transpose(1, 2) for t in (q, k, v)), scale=scale)
    return o.transpose(1, 2).float()


def _qkv(b, sq, skv, h, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k = (1.2 * torch.randn(b, s, h, d, generator=g) for s in (sq, skv))
    v = torch.randn(b, skv, h, d, generator=g) + 0.25
    return q.to(dtype), k.to(dtype), v.to(dtype)


# -- definition and template ----------------------------------------------------------------------
def test_workload_key_and_buckets():
    w = attention_workload(2, 4096, 77, 8, 40)
    assert math.isclose(scale_of(w), 40 ** -0.5)
    assert w.key != attention_workload(2, 4096, 77, 8, 40, scale=0.1).key
    b = DEFAULT.bucket_of(w)
    assert b.ranges == {"b": (2, 2), "sq": (2049, 4096), "skv": (65, 128)} and (b.dim["h"], b.dim["d"]) == (8, 40)
    assert b.covers(attention_workload(2, 3000, 100, 8, 40)) and not b.covers(attention_workload(2, 3000, 100, 8, 80))
    b3 = DEFAULT.bucket_of(attention_workload(3, 4096, 77, 8, 40))
    assert b3.ranges["b"] == (3, 4) and b3.dim["b"] == 4 and b3.covers(attention_workload(3, 3000, 100, 8, 40))


@pytest.mark.parametrize("w", [attention_workload(*SELF, "float32"), attention_workload(*CROSS, "float32"), BUCKET,
                               BATCH_BUCKET],
                         ids=lambda w: w.name)
def test_llvm_template_matches_reference(w):
    import tvm

    tgt, od, t = detect("llvm"), opdef("attention"), templates.get("attn_llvm")
    members = [concrete(w, sq=17, skv=31), concrete(w, sq=32, skv=17)] if w.dynamic else [w]
    if "b" in w.ranges:  # the batch bucket's lower bound too
        members.append(concrete(w, b=w.ranges["b"][0], sq=23, skv=19))
    space = t.space(w, tgt)
    assert len(space) >= 6
    for cand in space[:: max(1, len(space) // 4)]:
        with tgt.tvm_target():
            fn = tvm.compile(t.apply(w, tgt, cand), target=tgt.tvm_target())["main"]
        for mw in members:
            ins = od.inputs(mw, "cpu", torch.Generator().manual_seed(3))
            out = od.output(mw, "cpu").fill_(float("nan"))  # unwritten rows fail the check
            fn(*ins, out)
            chk = check_output(out, od.reference(mw, ins), w.dtype)
            assert chk.ok, (str(cand), mw.name, chk.reason)


def test_reference_and_vendor_agree():
    w = attention_workload(*CROSS, "float32")
    od = opdef("attention")
    ins = od.inputs(w, "cpu", torch.Generator().manual_seed(0))
    ref = od.reference(w, ins)
    assert ref.dtype == torch.float64 and ref.abs().mean() > 0.1  # not a near-zero average
    assert check_output(od.vendor(w)(*ins), ref, "float32").ok
    assert check_output(_ref(*ins, scale_of(w)), ref, "float32").ok


# -- the custom op ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [SELF, CROSS], ids=["self", "cross"])
def test_attention_matches_torch(registry, shape):
    q, k, v = _qkv(*shape)
    y = kernels.attention(q, k, v)
    assert y.shape == q.shape and y.is_contiguous()
    torch.testing.assert_close(y, _ref(q, k, v), atol=1e-4, rtol=1e-4)
    assert registry.calls[("attention", "tuned")] == 1


def test_flat_inputs_and_bucket_members(registry):
    """[B, S, H*D] inputs with `heads`, at sizes inside the tuned bucket (one kernel serves all)."""
    for sq, skv in ((17, 32), (29, 23), (32, 17)):
        q, k, v = _qkv(1, sq, skv, 2, 8, seed=sq)
        y = kernels.attention(q.flatten(-2), k.flatten(-2), v.flatten(-2), heads=2)
        assert y.shape == (1, sq, 16)
        torch.testing.assert_close(y, _ref(q, k, v).flatten(-2), atol=1e-4, rtol=1e-4)
    assert registry.calls[("attention", "tuned")] == 3
    assert registry.resolve(attention_workload(1, 29, 23, 2, 8, "float32")).kind == "bucket"


def test_strided_inputs_are_copied_and_counted(registry):
    b, sq, skv, h, d = SELF
    q, k, v = _qkv(*SELF)
    qkv = torch.cat([q, k, v], dim=-1)  # a fused QKV projection's output: slices are strided
    qs, ks, vs = qkv.split(d, dim=-1)
    torch.testing.assert_close(kernels.attention(qs, ks, vs), _ref(q, k, v), atol=1e-4, rtol=1e-4)
    assert registry.calls[("attention", "relayout_copy")] == 1 and registry.calls[("attention", "tuned")] == 1


def test_fallbacks_and_errors(registry):
    q, k, v = _qkv(1, 5, 9, 2, 8)
    torch.testing.assert_close(kernels.attention(q, k, v), _ref(q, k, v), atol=1e-5, rtol=1e-5)  # not tuned
    qd, kd, vd = (t.double() for t in _qkv(*SELF))
    torch.testing.assert_close(kernels.attention(qd, kd, vd), _ref(qd, kd, vd).double())
    s = kernels.fallback_summary()["attention"]
    assert s["not_tuned"] == 1 and s["unsupported_dtype"] == 1
    with pytest.raises(ValueError, match="k and v"):
        kernels.attention(q, k[:, :, :1], v)
    with pytest.raises(ValueError, match="heads"):
        kernels.attention(q.flatten(-2), k.flatten(-2), v.flatten(-2), heads=3)


@pytest.mark.parametrize("grad", [False, True])
def test_opcheck(registry, grad):
    q, k, v = (t.requires_grad_(grad) for t in _qkv(*CROSS))
    opcheck(torch.ops.shapetune.attention.default, (q, k, v, 40 ** -0.5))


def test_backward_matches_torch(registry):
    q, k, v = (t.requires_grad_(True) for t in _qkv(*SELF))
    g = torch.randn(q.shape)
    kernels.attention(q, k, v).backward(g)
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    _ref(q2, k2, v2).backward(g)
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = torch.ops.shapetune.attention(torch.empty(2, 64, 8, 40), torch.empty(2, 77, 8, 40),
                                          torch.empty(2, 77, 8, 40), 0.1)
    assert y.shape == (2, 64, 8, 40)
