"""shapetune::conv2d on the CPU: tuned llvm kernels match torch, fallbacks are counted, the op
passes opcheck; the CUDA implicit-GEMM template's rewrite is checked on llvm and (slow) its
candidates build for sm_90.

Tolerances: fp32 on the CPU, tuned TVM kernel vs torch: 1e-4 (accumulation order differs over
K = KH*KW*Ci <= 72 terms here).
"""

from __future__ import annotations

import random

import pytest
import torch
from torch.library import opcheck

import kernels
from shapetune.ops import opdef
from scheduler.tuner import TuneOptions, tune
from scheduler.verify import check_output
from shapetune.target import detect

from shapetune.ops.conv import conv2d_workload, gemm_dims  # noqa: I001

# (n, h, w, ci, co, kh, kw, stride, padding, bias, residual): odd sizes, both strides and kernels
SHAPES = [(2, 7, 9, 8, 12, 3, 3, 2, 1, True, False),
          (1, 7, 9, 8, 12, 3, 3, 1, 1, True, True),
          (2, 5, 6, 12, 8, 1, 1, 1, 0, True, True)]


def _workload(s, dtype="float32"):
    return conv2d_workload(*s[:9], dtype=dtype, bias=s[9], residual=s[10])


def _operands(s, gen):
    n, h, w, ci, co, kh, kw, stride, pad, bias, res = s
    ho, wo = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
    x = torch.randn(n, ci, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
    wt = torch.randn(co, ci, kh, kw, generator=gen)  # OIHW, as nn.Conv2d holds it
    b = torch.randn(co, generator=gen) if bias else None
    r = torch.randn(n, co, ho, wo, generator=gen).contiguous(memory_format=torch.channels_last) if res else None
    return x, wt, b, r


def _torch(x, wt, b, stride, pad, r):
    y = torch.nn.functional.conv2d(x, wt, b, stride, pad)
    return y + r if r is not None else y


@pytest.fixture(scope="module")
def tuned_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("db") / "tuning.db"
    tune([_workload(s) for s in SHAPES], detect("llvm"), path,
         TuneOptions(trials=3, batch=3, templates=("conv_llvm",)))
    return path


@pytest.mark.parametrize("s", SHAPES, ids=lambda s: _workload(s).name)
def test_op_uses_tuned_kernel_and_matches_torch(registry, s):
    x, wt, b, r = _operands(s, torch.Generator().manual_seed(sum(s[:5])))
    y = kernels.conv2d(x, wt, b, s[7], s[8], r)
    torch.testing.assert_close(y, _torch(x, wt, b, s[7], s[8], r), atol=1e-4, rtol=1e-4)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert registry.calls[("conv2d", "tuned")] == 1, registry.calls


def test_channels_last_weight_and_nchw_input(registry):
    s = SHAPES[0]
    x, wt, b, r = _operands(s, torch.Generator().manual_seed(0))
    x_nchw, wt_cl = x.contiguous(), wt.contiguous(memory_format=torch.channels_last)
    y = kernels.conv2d(x_nchw, wt_cl, b, s[7], s[8], r)
    torch.testing.assert_close(y, _torch(x, wt, b, s[7], s[8], r), atol=1e-4, rtol=1e-4)
    assert registry.calls[("conv2d", "tuned")] == 1


def test_weight_conversion_follows_in_place_updates(registry):
    s = SHAPES[0]
    x, wt, b, r = _operands(s, torch.Generator().manual_seed(1))
    kernels.conv2d(x, wt, b, s[7], s[8], r)
    with torch.no_grad():
        wt.mul_(-2.0)  # same storage, new values: the op must compute with them
    torch.testing.assert_close(kernels.conv2d(x, wt, b, s[7], s[8], r), _torch(x, wt, b, s[7], s[8], r),
                               atol=1e-4, rtol=1e-4)


def test_untuned_shape_falls_back_and_is_counted(registry):
    x = torch.randn(1, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    wt, b = torch.randn(4, 3, 3, 3), torch.randn(4)
    y = kernels.conv2d(x, wt, b, 1, 1)
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, wt, b, 1, 1))
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert registry.calls[("conv2d", "not_tuned")] == 1
    assert kernels.fallback_summary()["conv2d"]["not_tuned"] == 1


def test_unsupported_dtype_and_bad_input(registry):
    x, wt = torch.randn(1, 3, 5, 5, dtype=torch.float64), torch.randn(4, 3, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(kernels.conv2d(x, wt, None, 1, 1), torch.nn.functional.conv2d(x, wt, None, 1, 1))
    assert registry.calls[("conv2d", "unsupported_dtype")] == 1
    with pytest.raises(ValueError, match="channels"):
        kernels.conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 2, 3, 3))
    with pytest.raises(ValueError, match="residual must be"):
        kernels.conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), None, 1, 1, torch.randn(1, 4, 4, 4))


@pytest.mark.parametrize("s", [SHAPES[0], SHAPES[1]], ids=["stride2_bias", "residual"])
def test_opcheck(registry, s):
    x, wt, b, r = _operands(s, torch.Generator().manual_seed(2))
    opcheck(torch.ops.shapetune.conv2d.default, (x, wt, b, s[7], s[8], r))
    x.requires_grad_(True)
    wt.requires_grad_(True)
    opcheck(torch.ops.shapetune.conv2d.default, (x, wt, b, s[7], s[8], r))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = torch.ops.shapetune.conv2d(torch.empty(2, 16, 9, 7), torch.empty(32, 16, 3, 3), torch.empty(32), 2, 1)
    assert y.shape == (2, 32, 5, 4) and y.is_contiguous(memory_format=torch.channels_last)


# -- the CUDA template's GEMM rewrite, checked where it can run -------------------------------------
@pytest.mark.parametrize("s", SHAPES + [(1, 8, 8, 4, 8, 1, 1, 2, 0, False, False)],
                         ids=lambda s: _workload(s).name + f"_s{s[7]}")
def test_implicit_gemm_rewrite_is_exact_on_llvm(s):
    """conv_cuda's reindex into C[m, co] = sum_k A[m, k] B[co, k], built unscheduled for the CPU."""
    import tvm
    from tvm import s_tir

    from scheduler.templates.conv_cuda import to_gemm

    w = _workload(s)
    od = opdef("conv2d")
    sch = s_tir.Schedule(tvm.IRModule({"main": od.prim_func(w)}))
    blk = to_gemm(sch, w)
    m, n, k = gemm_dims(w)
    assert [int(sch.get(lp).extent) for lp in sch.get_loops(blk)] == [m, n, k]
    fn = tvm.compile(sch.mod, target=detect("llvm").tvm_target())["main"]
    ins = od.inputs(w, "cpu", torch.Generator().manual_seed(3))
    out = od.output(w, "cpu").fill_(float("nan"))
    fn(*ins, out)
    chk = check_output(out, od.reference(w, ins), "float32")
    assert chk.ok, chk.reason


def test_cuda_candidates_build_for_sd_convs():
    """Sampled conv_cuda_wmma candidates of two SD 1.5 convs compile for sm_90 (no GPU needed)."""
    import tvm

    from scheduler.templates import get
    from shapetune.target import cuda_target

    target, t, rng = cuda_target(), get("conv_cuda_wmma"), random.Random(0)
    for w in (conv2d_workload(2, 64, 64, 320, 320, 3, 3, 1, 1, "float16", True, True),
              conv2d_workload(2, 32, 32, 640, 640, 3, 3, 2, 1, "float16", True, False),
              conv2d_workload(2, 16, 16, 640, 1280, 1, 1, 1, 0, "float16", True, False)):
        for c in rng.sample(t.space(w, target), 4):
            with target.tvm_target():
                lib = tvm.compile(t.apply(w, target, c), target=target.tvm_target())
            src = "".join(m.inspect_source() for m in lib.mod.imports if m.kind == "cuda")
            assert "wmma::mma_sync" in src, f"{w.name} {c}: not tensorized"


# -- batch buckets --------------------------------------------------------------------------------
BATCH_SHAPE = (3, 7, 9, 8, 12, 3, 3, 1, 1, True, True)  # batch 3: bucket n in [3, 4]


def test_batch_bucket_is_correct_at_its_members_on_llvm():
    import tvm

    from shapetune.buckets import DEFAULT, verification_members
    from scheduler.templates import get

    w = DEFAULT.bucket_of(_workload(BATCH_SHAPE))
    assert w.ranges == {"n": (3, 4)} and w.dim["n"] == 4 and w.dim["h"] == 7
    cpu, t, od = detect("llvm"), get("conv_llvm"), opdef("conv2d")
    for c in t.space(w, cpu)[::9][:3]:
        fn = tvm.compile(t.apply(w, cpu, c), target=cpu.tvm_target())["main"]
        for mw in verification_members(w, random.Random(0)):
            ins = od.inputs(mw, "cpu", torch.Generator().manual_seed(mw.dim["n"]))
            out = od.output(mw, "cpu").fill_(float("nan"))
            fn(*ins, out)
            assert check_output(out, od.reference(mw, ins), "float32").ok, (c, mw.name)


def test_batch_bucket_cuda_candidates_build_for_sm90():
    import tvm

    from shapetune.buckets import DEFAULT
    from scheduler.templates import get
    from shapetune.target import cuda_target

    target, t = cuda_target(), get("conv_cuda_wmma")
    w = DEFAULT.bucket_of(conv2d_workload(3, 64, 64, 320, 320, 3, 3, 1, 1, "float16", True, True))
    assert w.ranges == {"n": (3, 4)}
    space = t.space(w, target)
    # one small-tile candidate, pipelined, 2 x 2 warps: 0.3 s to build here, where a larger tile with a
    # symbolic batch took 270 s of a 2-core machine's CI run (TVM simplifying the unrolled fragment loops)
    c = next(c for c in space if c.knob["pipeline"] == 1 and c.knob["warps_m"] == c.knob["warps_n"] == 2
             and c.knob["frag_m"] == c.knob["frag_n"] == c.knob["k_frags"] == 1)
    lib = tvm.compile(t.apply(w, target, c), target=target.tvm_target())
    src = "".join(m.inspect_source() for m in lib.mod.imports if m.kind == "cuda")
    assert "wmma::mma_sync" in src and "int n" in src, c  # tensorized, the batch a kernel argument


def test_op_serves_a_batch_bucket(tmp_path):
    from kernels.registry import Registry, set_registry
    from shapetune.buckets import DEFAULT

    path = tmp_path / "t.db"
    tune([DEFAULT.bucket_of(_workload(BATCH_SHAPE))], detect("llvm"), path,
         TuneOptions(trials=2, batch=2, templates=("conv_llvm",)))
    prev = set_registry(Registry(db_path=path, target=detect("llvm"), require_faster=False))
    try:
        for n in (3, 4):
            x, wt, b, r = _operands((n,) + BATCH_SHAPE[1:], torch.Generator().manual_seed(n))
            y = kernels.conv2d(x, wt, b, 1, 1, residual=r)
            torch.testing.assert_close(y, _torch(x, wt, b, 1, 1, r), atol=1e-4, rtol=1e-4)
        assert kernels.fallback_summary()["conv2d"]["tuned"] == 2  # (an OIHW weight: also weight_relayout)
    finally:
        set_registry(prev)
