"""shapetune::group_norm / shapetune::layer_norm: templates, tuned ops vs torch, fallbacks, opcheck.

Tolerances (scheduler.verify.TOLERANCES, the same numbers the tuner verifies with):
  float32 (CPU here)  1e-4 elementwise, 1e-5 relative L2. The statistics are fp32 sums of x - p and
          (x - p)^2 (p each group's first element: shifted moments) in another order than torch's:
          ~sqrt(n) * 6e-8 relative error; the variance loses log2(1 + ((mean - p) / std)^2) bits
          more (a few, whatever the group's offset: tests/ops/test_norm_precision.py); normalized
          outputs are O(1), so errors stay ~1e-5 at most for these groups of ~1000 elements.
  float16 (GPU)       1e-2 elementwise, 5e-3 relative L2: the output is rounded to fp16 once
          (2^-11 = 4.9e-4 relative, i.e. <= 2e-3 absolute for |y| <= 4); statistics are kept in
          fp32, whose error (above) is three orders of magnitude smaller.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import kernels
from shapetune.ops import opdef
from shapetune.ops.norm import eps_of, group_norm_workload, layer_norm_workload
from scheduler import templates
from scheduler.tuner import TuneOptions, tune
from scheduler.verify import check_output
from shapetune.buckets import DEFAULT
from shapetune.target import cuda_target, detect

# (n, h, w, c, groups, silu): 7x11 = 77 (prime factors only), C/G = 12 and 2 channels per group.
GN = [(2, 7, 11, 48, 4, True), (1, 7, 11, 64, 32, False)]
LN = [(37, 48), (5, 24)]


@pytest.fixture(scope="module")
def tuned_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("norm") / "tuning.db"
    ws = ([group_norm_workload(n, h * w, c, g, "float32", silu=s) for n, h, w, c, g, s in GN]
          + [layer_norm_workload(m, c, "float32") for m, c in LN])
    reps = tune(ws, detect("llvm"), path, TuneOptions(trials=3, batch=3, templates=("dlight", "norm_llvm")))
    assert all(r.best is not None for r in reps), [r.by_status for r in reps]
    return path


def _gn_ref(x, g, w, b, silu):
    y = F.group_norm(x.double(), g, w.double(), b.double(), 1e-5)
    return (F.silu(y) if silu else y).float()


# -- workloads and templates ---------------------------------------------------------------------
def test_workload_key_carries_eps_and_epilogue():
    a = group_norm_workload(2, 4096, 320, 32, eps=1e-5)
    assert eps_of(a) == 1e-5 and a.epilogue == ("affine",)
    assert a.key != group_norm_workload(2, 4096, 320, 32, eps=1e-6).key
    assert a.key != group_norm_workload(2, 4096, 320, 32, silu=True).key
    with pytest.raises(ValueError, match="divisible"):
        group_norm_workload(2, 16, 30, 32)


def test_buckets_make_n_hw_and_m_dynamic():
    b = DEFAULT.bucket_of(group_norm_workload(2, 77, 64, 32))
    assert b.ranges == {"n": (2, 2), "hw": (65, 128)} and b.dim["hw"] == 128 and b.dim["n"] == 2
    b = DEFAULT.bucket_of(group_norm_workload(3, 4096, 320, 32, silu=True))
    assert b.ranges == {"n": (3, 4), "hw": (2049, 4096)} and b.dim["n"] == 4 and b.epilogue == ("affine", "silu")
    assert DEFAULT.bucket_of(layer_norm_workload(37, 48)).ranges == {"m": (33, 64)}


@pytest.mark.parametrize("w", [
    group_norm_workload(2, 77, 48, 4, "float32", silu=True),
    group_norm_workload(1, 77, 64, 32, "float32"),
    group_norm_workload(2, 77, 64, 32, "float32", hw_range=(65, 128)),
    group_norm_workload(4, 77, 64, 32, "float32", silu=True, n_range=(3, 4), hw_range=(65, 128)),
    layer_norm_workload(37, 48, "float32"),
    layer_norm_workload(30, 24, "float32", m_range=(17, 32)),
], ids=lambda w: w.name)
def test_llvm_templates_match_reference(w):
    from shapetune.buckets import concrete

    import tvm

    tgt = detect("llvm")
    od = opdef(w.op)
    mw = concrete(w, **{n: lo for n, lo, _ in w.dynamic}) if w.dynamic else w
    for t in ("norm_llvm", "dlight"):
        space = templates.get(t).space(w, tgt)
        for cand in space[:: max(1, len(space) // 3)]:
            mod = templates.get(t).apply(w, tgt, cand)
            with tgt.tvm_target():
                fn = tvm.compile(mod, target=tgt.tvm_target())["main"]
            ins = od.inputs(mw, "cpu", torch.Generator().manual_seed(1))
            out = od.output(mw, "cpu").fill_(float("nan"))
            fn(*ins, out)
            chk = check_output(out, od.reference(mw, ins), w.dtype)
            assert chk.ok, (str(cand), chk.reason)


@pytest.mark.parametrize("w", [
    group_norm_workload(2, 4096, 320, 32, silu=True),  # C/G = 10: vec <= 2, no shared cache
    group_norm_workload(2, 1024, 640, 32),
    group_norm_workload(2, 64, 2560, 32, silu=True),
    group_norm_workload(2, 4096, 320, 32, hw_range=(2049, 4096)),
    group_norm_workload(4, 4096, 320, 32, silu=True, n_range=(3, 4), hw_range=(2049, 4096)),
    layer_norm_workload(8192, 320),
    layer_norm_workload(512, 1280, m_range=(257, 512)),
], ids=lambda w: w.name)
def test_cuda_template_builds_for_sm90(w):
    """CUDA codegen (no GPU needed): sampled candidates of the SD shapes lower and generate code. Each
    thread loads its group's pivot into one register, both sums subtract it from every element, and each
    sum's vector cache of x stays `vec` wide (a pivot read inline would widen its region to position 0)."""
    import re

    import tvm

    tgt = cuda_target()
    t = templates.get("norm_cuda")
    space = t.space(w, tgt)
    assert space
    for cand in space[:: max(1, len(space) // 5)] + [space[-1]]:
        with tgt.tvm_target():
            src = tvm.compile(t.apply(w, tgt, cand), target=tgt.tvm_target()).mod.imports[0].inspect_source()
        assert t.features(w, tgt, cand.knob)["blocks"] >= 1
        assert re.findall(r"float pivot_local_ptr\[(\d+)\]", src) == ["1"], str(cand)
        for s in ("sum", "sqsum"):
            assert re.search(rf"in_thread_{s}_shared_ptr\[0\] = \(in_thread_{s}_shared_ptr\[0\] \+ .*- pivot_local_ptr", src)
        vec = cand.knob["vec"]
        caches = re.findall(r"half x(?:_shared)?_local_ptr(?:_\d+)?\[(\d+)\]", src)  # x_shared: cache_x
        assert caches == ([str(vec)] * 2 if vec > 1 else []), (str(cand), caches)


def test_cuda_valid_bounds():
    t, tgt = templates.get("norm_cuda"), cuda_target()
    space = t.space(group_norm_workload(2, 4096, 320, 32), tgt)
    assert {c.knob["vec"] for c in space} == {1, 2}  # C/G = 10 channels per run
    assert not any(c.knob["cache_x"] for c in space)  # 4096 x 10 x 2 B = 80 KB > 48 KB
    assert any(c.knob["cache_x"] for c in t.space(group_norm_workload(2, 1024, 640, 32), tgt))  # 40 KB
    assert not any(c.knob["cache_x"] for c in t.space(group_norm_workload(2, 1024, 640, 32, hw_range=(513, 1024)), tgt))


# -- the custom ops ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,h,w,c,g,silu", GN)
def test_group_norm_channels_last_matches_torch(registry, n, h, w, c, g, silu):
    gen = torch.Generator().manual_seed(c + g)
    x = torch.randn(n, c, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
    wt, b = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
    y = kernels.group_norm(x, g, wt, b, silu=silu)
    assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, _gn_ref(x, g, wt, b, silu), atol=1e-4, rtol=1e-4)
    # [N, HW, C] input: the same kernel
    y3 = kernels.group_norm(x.permute(0, 2, 3, 1).reshape(n, h * w, c), g, wt, b, silu=silu, layout="NLC")
    torch.testing.assert_close(y3, y.permute(0, 2, 3, 1).reshape(n, h * w, c))
    assert registry.calls[("group_norm", "tuned")] == 2
    assert ("group_norm", "relayout_copy") not in registry.calls


def test_group_norm_nchw_contiguous_is_copied_and_counted(registry):
    n, h, w, c, g, silu = GN[0]
    x = torch.randn(n, c, h, w)
    wt, b = torch.randn(c), torch.randn(c)
    y = kernels.group_norm(x, g, wt, b, silu=silu)
    torch.testing.assert_close(y, _gn_ref(x, g, wt, b, silu), atol=1e-4, rtol=1e-4)
    assert registry.calls[("group_norm", "tuned")] == 1 and registry.calls[("group_norm", "relayout_copy")] == 1


def test_group_norm_fallbacks(registry):
    x = torch.randn(2, 16, 3, 5).contiguous(memory_format=torch.channels_last)
    wt, b = torch.randn(16), torch.randn(16)
    torch.testing.assert_close(kernels.group_norm(x, 4, wt, b), F.group_norm(x, 4, wt, b))
    torch.testing.assert_close(kernels.group_norm(x, 4), F.group_norm(x, 4))
    x64 = x.double()
    torch.testing.assert_close(kernels.group_norm(x64, 4, wt.double(), b.double(), silu=True),
                               F.silu(F.group_norm(x64, 4, wt.double(), b.double())))
    assert registry.calls[("group_norm", "not_tuned")] == 1
    assert registry.calls[("group_norm", "no_affine")] == 1
    assert registry.calls[("group_norm", "unsupported_dtype")] == 1
    with pytest.raises(ValueError, match="divisible"):
        kernels.group_norm(x, 5, None, None)


@pytest.mark.parametrize("m,c", LN)
def test_layer_norm_matches_torch(registry, m, c):
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, c, generator=gen) + 0.5
    wt, b = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
    y = kernels.layer_norm(x, wt, b)
    ref = F.layer_norm(x.double(), (c,), wt.double(), b.double()).float()
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kernels.layer_norm(x.reshape(1, m, c), wt, b), ref.reshape(1, m, c),
                               atol=1e-4, rtol=1e-4)
    assert registry.calls[("layer_norm", "tuned")] == 2


def test_layer_norm_untuned_falls_back(registry):
    x, wt, b = torch.randn(3, 7), torch.randn(7), torch.randn(7)
    torch.testing.assert_close(kernels.layer_norm(x, wt, b), F.layer_norm(x, (7,), wt, b))
    assert kernels.fallback_summary()["layer_norm"]["not_tuned"] == 1


@pytest.mark.parametrize("grad", [False, True])
def test_opcheck(registry, grad):
    n, h, w, c, g, silu = GN[0]
    x = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last).requires_grad_(grad)
    wt, b = torch.randn(c, requires_grad=grad), torch.randn(c)
    opcheck(torch.ops.shapetune.group_norm.default, (x, g, wt, b, 1e-5, silu))
    opcheck(torch.ops.shapetune.group_norm.default, (x.permute(0, 2, 3, 1).reshape(n, h * w, c).detach(),
                                                     g, wt.detach(), b, 1e-5, silu))
    m, c = LN[0]
    opcheck(torch.ops.shapetune.layer_norm.default,
            (torch.randn(m, c, requires_grad=grad), torch.randn(c, requires_grad=grad), torch.randn(c), 1e-5))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = torch.ops.shapetune.group_norm(torch.empty(2, 64, 8, 8).contiguous(memory_format=torch.channels_last),
                                           32, torch.empty(64), torch.empty(64), 1e-5, True)
        z = torch.ops.shapetune.layer_norm(torch.empty(2, 9, 32), torch.empty(32), torch.empty(32), 1e-5)
    assert y.shape == (2, 64, 8, 8) and y.is_contiguous(memory_format=torch.channels_last)
    assert z.shape == (2, 9, 32)


@pytest.mark.parametrize("w", [
    group_norm_workload(2, 4096, 320, 32, silu=True),  # C/G = 10
    group_norm_workload(2, 1024, 1920, 32, silu=True),
    group_norm_workload(2, 64, 1280, 32),
], ids=lambda w: w.name)
def test_cuda_split_template_builds_with_one_group_per_thread(w):
    """norm_cuda_split (statistics over S blocks per group, then a normalize kernel): sampled candidates
    of both orders build for sm_90, and each normalize thread holds one group's two statistics — a
    region over-approximated by the schedule would show up as a huge per-thread array here."""
    import re

    import tvm

    tgt, t = cuda_target(), templates.get("norm_cuda_split")
    space = t.space(w, tgt)
    assert {c.knob["order"] for c in space} == {"group", "natural"}
    assert not t.applies(group_norm_workload(2, 4096, 320, 32, hw_range=(2049, 4096)), tgt)
    for cand in space[:: max(1, len(space) // 4)] + [c for c in space if c.knob["order"] == "natural"][:2]:
        with tgt.tvm_target():
            lib = tvm.compile(t.apply(w, tgt, cand), target=tgt.tvm_target())
        src = lib.mod.imports[0].inspect_source()
        assert len(re.findall(r"__global__ void[^;{]*\{", src)) == 2, str(cand)  # two kernel definitions
        sizes = [int(n) for n in re.findall(r"float stats_local_ptr\[(\d+)\]", src)]
        assert sizes == [2], (str(cand), sizes)
        # one pivot register per thread in each kernel: the statistics' and the normalize pass's
        assert re.findall(r"float (stats_pivot|pivot)_local_ptr\[1\]", src) == ["stats_pivot", "pivot"], str(cand)


@pytest.mark.parametrize("w, split", [
    (group_norm_workload(2, 37, 96, 8, "float32", silu=True, hw_range=(33, 64)), 4),  # hw % split != 0
    (group_norm_workload(1, 50, 64, 32, "float32", n_range=(1, 2), hw_range=(33, 64)), 8),
    (group_norm_workload(3, 64, 64, 32, "float32"), 8),  # static and a multiple: no clamp, no select
], ids=lambda v: getattr(v, "name", str(v)))
def test_predicated_split_definition_matches_reference_on_llvm(w, split):
    """norm_cuda_split_bucket's definition (S partial sums per group over ceil(hw / S) positions each,
    the positions past hw clamped and adding 0, then the partials summed): compiled unscheduled for the
    CPU at hw not a multiple of S, against float64, output poisoned first."""
    from scheduler.templates.norm_cuda_split import predicated_group_norm

    _definition_matches_reference_on_llvm(predicated_group_norm(w, split), w)


@pytest.mark.parametrize("w", [
    group_norm_workload(4, 4096, 320, 32, silu=True, n_range=(3, 4), hw_range=(2049, 4096)),  # C/G = 10
    group_norm_workload(1, 128, 1280, 32, n_range=(1, 1), hw_range=(65, 128)),
], ids=lambda w: w.name)
def test_cuda_split_bucket_template_builds_two_kernels(w):
    """norm_cuda_split_bucket serves shape buckets (norm_cuda_split, whose rfactor needs a static hw,
    does not): sampled candidates, vector loads included, build for sm_90 as two kernels, each normalize
    thread holding its one group's two statistics, and every load of x clamped into bounds."""
    import re

    import tvm

    tgt, t = cuda_target(), templates.get("norm_cuda_split_bucket")
    assert t.applies(w, tgt) and not templates.get("norm_cuda_split").applies(w, tgt)
    assert not t.applies(group_norm_workload(2, 4096, 320, 32), tgt)  # exact shapes keep norm_cuda_split
    space = t.space(w, tgt)
    picks = space[:: max(1, len(space) // 3)] + [c for c in space if c.knob["vec_s"] > 1][:1]
    assert picks and {c.knob["split"] for c in space} >= {2, 8}
    for cand in picks:
        with tgt.tvm_target():
            lib = tvm.compile(t.apply(w, tgt, cand), target=tgt.tvm_target())
        src = lib.mod.imports[0].inspect_source()
        assert len(re.findall(r"__global__ void[^;{]*\{", src)) == 2, str(cand)
        assert re.findall(r"float stats_local_ptr\[(\d+)\]", src) == ["2"], str(cand)
        assert "(hw - 1)" in src, str(cand)  # the clamp of the chunk's last positions
        assert re.findall(r"float (stats_pivot|pivot)_local_ptr\[1\]", src) == ["stats_pivot", "pivot"], str(cand)


def test_row_stats_definition_matches_reference_on_llvm():
    """norm_cuda_rows' three-stage definition (per-chunk, per-channel partial sums -> per-group sums
    -> normalize) computes group_norm: compiled unscheduled for the CPU, against float64."""
    from scheduler.templates.norm_cuda_rows import row_stats_group_norm

    for w, chunk in ((group_norm_workload(2, 64, 96, 8, "float32", silu=True), 16),
                     (group_norm_workload(1, 32, 64, 32, "float32"), 8)):
        _definition_matches_reference_on_llvm(row_stats_group_norm(w, chunk), w)


def _definition_matches_reference_on_llvm(prim_func, w) -> None:
    """A template's own compute definition of w's op, compiled unscheduled for the CPU and run on fresh
    random inputs into a poisoned output, against the op's float64 reference."""
    import tvm

    od = opdef(w.op)
    fn = tvm.compile(tvm.IRModule({"main": prim_func}), target="llvm")["main"]
    ins = od.inputs(w, "cpu", torch.Generator().manual_seed(0))
    out = od.output(w, "cpu").fill_(float("nan"))
    fn(*ins, out)
    chk = check_output(out, od.reference(w, ins), w.dtype)
    assert chk.ok, chk.reason


@pytest.mark.parametrize("w", [group_norm_workload(2, 4096, 320, 32, silu=True), group_norm_workload(2, 64, 2560, 32)],
                         ids=lambda w: w.name)
def test_cuda_rows_template_builds_three_kernels(w):
    import re

    import tvm

    tgt, t = cuda_target(), templates.get("norm_cuda_rows")
    space = t.space(w, tgt)
    assert space  # buckets and odd hw: tests/ops/test_norm_rows.py
    for cand in space[:: max(1, len(space) // 3)]:
        with tgt.tvm_target():
            src = tvm.compile(t.apply(w, tgt, cand), target=tgt.tvm_target()).mod.imports[0].inspect_source()
        assert len(re.findall(r"__global__ void[^;{]*\{", src)) == 3, str(cand)
        # the row pass accumulates in registers (2 sums x vec channels), not in global memory, less the
        # pivots of its vec channels' groups (registers too); the normalize pass holds its group's pivot
        assert re.findall(r"float partial_local_ptr\[(\d+)\]", src) == [str(2 * cand.knob["vec"])], str(cand)
        assert re.findall(r"float stats_pivot_local_ptr\[(\d+)\]", src) == [str(cand.knob["vec"])], str(cand)
        assert re.findall(r"float pivot_local_ptr\[(\d+)\]", src) == ["1"], str(cand)


def test_backward_matches_torch(registry):
    """group_norm(+silu) and layer_norm differentiate like torch (the backward recomputes torch's ops)."""
    n, h, w, c, g, silu = GN[0]
    x = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
    wt, b = torch.randn(c), torch.randn(c)
    a = [t.clone().requires_grad_(True) for t in (x, wt, b)]
    r = [t.clone().requires_grad_(True) for t in (x, wt, b)]
    y = kernels.group_norm(a[0], g, a[1], a[2], silu=silu)
    gy = torch.randn(y.shape)
    y.backward(gy)
    F.silu(F.group_norm(r[0], g, r[1], r[2])).backward(gy)
    for p, q in zip(a, r):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4)
    m, c = LN[0]
    a = [torch.randn(s, requires_grad=True) for s in ((m, c), (c,), (c,))]
    r = [t.detach().clone().requires_grad_(True) for t in a]
    gy = torch.randn(m, c)
    kernels.layer_norm(*a).backward(gy)
    F.layer_norm(r[0], (c,), r[1], r[2]).backward(gy)
    for p, q in zip(a, r):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4)


def test_dlight_is_no_candidate_for_a_batch_bucket_group_norm_on_cuda():
    """dlight cannot schedule a group_norm with a symbolic batch on CUDA (every tuning run wasted a
    build on it): it is not offered there, norm_cuda is; with only hw symbolic it still is."""
    import tvm

    tgt = cuda_target()
    w = DEFAULT.bucket_of(group_norm_workload(1, 4096, 320, 32, silu=True))
    assert "n" in w.ranges
    with pytest.raises(Exception, match="reduction block vars"):
        tvm.compile(templates.get("dlight").apply(w, tgt, templates.get("dlight").space(w, tgt)[0]),
                    target=tgt.tvm_target())
    names = [t.name for t in templates.for_workload(w, tgt)]
    assert "dlight" not in names and "norm_cuda" in names
    assert templates.get("dlight").applies(group_norm_workload(2, 4096, 320, 32, hw_range=(2049, 4096)), tgt)
    assert templates.get("dlight").applies(w, detect("llvm"))
