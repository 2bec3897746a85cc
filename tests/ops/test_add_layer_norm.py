"""shapetune::add_layer_norm: a residual add and the LayerNorm after it as one kernel (s = a + r, y = LN(s),
out[2, m, c] = [s, y]); the serving function's tuned and unfused paths; the patched transformer block.

Tolerances: scheduler.verify's, float32 on the CPU (1e-4 elementwise): the statistics are fp32 sums in
another order than torch's (tests/ops/test_norm.py); s itself is the same fp32 add as torch's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from scheduler import templates
from scheduler.tuner import TuneOptions, tune
from scheduler.verify import check_output
from shapetune.buckets import DEFAULT
from shapetune.ops import opdef
from shapetune.ops.norm import add_layer_norm_workload
from shapetune.target import cuda_target, detect

M, C = 37, 48  # odd rows; the bucket [33, 64] serves m = 33 and 64 too


@pytest.fixture(scope="module")
def tuned_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("aln") / "tuning.db"
    ws = [add_layer_norm_workload(M, C, "float32"), DEFAULT.bucket_of(add_layer_norm_workload(M, C, "float32"))]
    reps = tune(ws, detect("llvm"), path, TuneOptions(trials=1, batch=1, templates=("dlight",)))
    assert all(r.best is not None for r in reps), [r.by_status for r in reps]
    return path


def _operands(m, c, seed):
    g = torch.Generator().manual_seed(seed)
    a, r = torch.randn(m, c, generator=g) + 0.25, torch.randn(m, c, generator=g)
    return a, r, 1 + 0.25 * torch.randn(c, generator=g), 0.25 * torch.randn(c, generator=g)


def test_definition_and_vendor_path_match_float64_on_llvm():
    import tvm

    od = opdef("add_layer_norm")
    for w in (add_layer_norm_workload(M, C, "float32"), DEFAULT.bucket_of(add_layer_norm_workload(50, 24, "float32"))):
        fn = tvm.compile(tvm.IRModule({"main": od.prim_func(w)}), target="llvm")["main"]
        ins = od.inputs(w, "cpu", torch.Generator().manual_seed(0))
        before = [t.clone() for t in ins]
        out = od.output(w, "cpu").fill_(float("nan"))
        fn(*ins, out)
        ref = od.reference(w, ins)
        assert check_output(out, ref, w.dtype).ok and check_output(od.vendor(w)(*ins), ref, w.dtype).ok
        assert all(torch.equal(x, y) for x, y in zip(ins, before))
    assert w.ranges == {"m": (33, 64)}  # rows are a bucketed dim, as layer_norm's


@pytest.mark.parametrize("m", [M, 33, 64])
def test_tuned_kernel_serves_exact_and_bucket_rows(registry, m):
    a, r, w, b = _operands(m, C, m)
    s, y = kernels.add_layer_norm(a, r, w, b)
    assert torch.equal(s, a + r)
    torch.testing.assert_close(y, F.layer_norm((a + r).double(), (C,), w.double(), b.double()).float(),
                               atol=1e-4, rtol=1e-4)
    assert registry.calls[("add_layer_norm", "tuned")] == 1 and not registry.calls[("layer_norm", "tuned")]


def test_without_a_kernel_the_unfused_path_runs_counted(registry):
    a, r, w, b = _operands(70, C, 3)  # past the bucket: no kernel
    s, y = kernels.add_layer_norm(a, r, w, b)
    torch.testing.assert_close(y, F.layer_norm(a + r, (C,), w, b), atol=1e-5, rtol=1e-5)
    assert torch.equal(s, a + r)
    assert registry.calls[("add_layer_norm", "not_tuned")] == 1 and sum(
        n for (op, _), n in registry.calls.items() if op == "layer_norm") == 1


def test_bad_input_is_one_clear_error(registry):
    a, r, w, b = _operands(M, C, 4)
    with pytest.raises(ValueError, match="r must be a's shape"):
        kernels.add_layer_norm(a, r[:-1], w, b)
    with pytest.raises(ValueError, match="weight must be"):
        kernels.add_layer_norm(a, r, w[:-1], b)


def test_cuda_template_builds_one_kernel_for_exact_and_bucket_rows():
    import re

    import tvm

    tgt, t = cuda_target(), templates.get("add_norm_cuda")
    for w in (add_layer_norm_workload(8192, 320), DEFAULT.bucket_of(add_layer_norm_workload(3000, 1280))):
        space = t.space(w, tgt)
        assert space and t.applies(w, tgt)
        for cand in space[:: max(1, len(space) // 3)]:
            with tgt.tvm_target():
                lib = tvm.compile(t.apply(w, tgt, cand), target=tgt.tvm_target())
            src = lib.mod.imports[0].inspect_source()
            assert len(re.findall(r"__global__ void[^;{]*\{", src)) == 1, str(cand)
            assert re.search(r"__shared__ alignas\(\d+\) half s_shared_ptr\[" + str(w.dim["c"]) + r"\]", src), str(cand)
            # the row's pivot s[m, 0], read from shared memory into a register once s is there
            assert re.search(r"__syncthreads\(\);\s+pivot_local_ptr\[0\] = \(\(float\)s_shared_ptr\[0\]\);", src), str(cand)
