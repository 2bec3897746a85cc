"""norm_cuda_rows on shape buckets (symbolic n, hw) and on hw that no chunk divides.

The last chunk of positions is partial there: its positions past hw read row hw - 1 and add 0, and
the statistics divide by the true hw x C/G. Builds are for sm_90 (CUDA codegen needs no GPU); the
numerics run the template's own TE definition, unscheduled, on the CPU (llvm) against the float64
reference, at the float32 tolerances of scheduler.verify (see tests/ops/test_norm.py).
"""

from __future__ import annotations

import re

import pytest
import torch

from scheduler import templates
from scheduler.templates.norm_cuda_rows import row_stats_group_norm
from scheduler.verify import check_output
from shapetune.buckets import DEFAULT, concrete, verification_members
from shapetune.ops import opdef
from shapetune.ops.norm import group_norm_workload
from shapetune.target import cuda_target

# Buckets of batch 3..8 at the large-hw edges, and a hand-made bucket whose bounds (1000, 1500) no
# chunk divides; a concrete hw = 77 with n = 3 (C/G = 12).
BUCKETS = [
    DEFAULT.bucket_of(group_norm_workload(8, 16384, 320, 32, silu=True)),  # n [5, 8], hw [8193, 16384]
    DEFAULT.bucket_of(group_norm_workload(3, 3000, 640, 32)),  # n [3, 4], hw [2049, 4096]
    group_norm_workload(3, 1500, 960, 32, silu=True, n_range=(1, 3), hw_range=(1000, 1500)),
    group_norm_workload(3, 77, 48, 4, silu=True),
]


@pytest.mark.parametrize("w", BUCKETS, ids=lambda w: w.name)
def test_rows_template_applies_to_buckets_and_builds_three_kernels(w):
    """Offered for buckets and odd hw; sampled candidates (every chunk among them) build for sm_90 with
    the row pass in registers: 2 sums x vec channels, and one vec-wide x vector per position."""
    import tvm

    tgt, t = cuda_target(), templates.get("norm_cuda_rows")
    assert "norm_cuda_rows" in [x.name for x in templates.for_workload(w, tgt)]
    space = t.space(w, tgt)
    chunks = sorted({c.knob["chunk"] for c in space})
    assert chunks == [p for p in (16, 32, 64, 128) if p <= w.dim["hw"]]
    picked = space[:: max(1, len(space) // 3)] + [next(c for c in space if c.knob["chunk"] == p) for p in chunks]
    for cand in picked:
        with tgt.tvm_target():
            src = tvm.compile(t.apply(w, tgt, cand), target=tgt.tvm_target()).mod.imports[0].inspect_source()
        assert len(re.findall(r"__global__ void[^;{]*\{", src)) == 3, str(cand)
        assert re.findall(r"float partial_local_ptr\[(\d+)\]", src) == [str(2 * cand.knob["vec"])], str(cand)
        assert re.findall(r"half xrow_local_ptr\[(\d+)\]", src) == [str(cand.knob["vec"])], str(cand)
        # the pivots of the thread's channels' groups in registers (the row pass), its group's (normalize)
        assert re.findall(r"float stats_pivot_local_ptr\[(\d+)\]", src) == [str(cand.knob["vec"])], str(cand)
        assert re.findall(r"float pivot_local_ptr\[(\d+)\]", src) == ["1"], str(cand)
        f = t.features(w, tgt, cand.knob)
        assert f["blocks"] >= 1 and 0 < f["chunk_util"] <= 1


def test_rows_valid_rejects_what_cannot_apply():
    """A chunk longer than every position is refused (the smallest stays), as are vectors that do not
    divide the channels; nothing asks hw or n to divide anything any more."""
    tgt, t = cuda_target(), templates.get("norm_cuda_rows")
    assert {c.knob["chunk"] for c in t.space(group_norm_workload(2, 9, 64, 32), tgt)} == {16}
    space = t.space(group_norm_workload(3, 77, 320, 32), tgt)  # C/G = 10
    assert {c.knob["vec_y"] for c in space} == {1, 2} and {c.knob["vec"] for c in space} == {1, 2, 4}
    assert {c.knob["chunk"] for c in space} == {16, 32, 64}


def _run_llvm(w, chunk, members):
    import tvm

    od = opdef("group_norm")
    fn = tvm.compile(tvm.IRModule({"main": row_stats_group_norm(w, chunk)}), target="llvm")["main"]
    for m in members:
        ins = od.inputs(m, "cpu", torch.Generator().manual_seed(m.dim["hw"] + chunk))
        assert all(bool((t != 0).all()) for t in ins)
        out = od.output(m, "cpu").fill_(float("nan"))
        fn(*ins, out)
        chk = check_output(out, od.reference(m, ins), m.dtype)
        assert chk.ok, (m.name, chunk, chk.reason)


@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("chunk", [16, 32, 64])
def test_row_stats_partial_last_chunk_matches_reference(chunk, silu):
    """n = 3, hw = 77 = 4 x 16 + 13 = 2 x 32 + 13 = 64 + 13: a partial last chunk at every chunk size."""
    w = group_norm_workload(3, 77, 48, 4, "float32", silu=silu)
    _run_llvm(w, chunk, [w])


@pytest.mark.parametrize("chunk", [16, 64])
def test_row_stats_bucket_matches_reference_at_its_members(chunk):
    """One kernel of symbolic n in [3, 4] and hw in [65, 128], run at n = 3 and hw = 65, 77, 100, 128."""
    w = group_norm_workload(4, 128, 64, 8, "float32", silu=True, n_range=(3, 4), hw_range=(65, 128))
    members = [concrete(w, n=3, hw=h) for h in (65, 77, 100, 128)] + [concrete(w, hw=77)]
    _run_llvm(w, chunk, members)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_rows_bucket_kernels_match_reference_on_gpu():
    """The scheduled kernels of a bucket at its verification members (bounds and an odd hw), fp16."""
    import random

    import tvm

    tgt, t, od = cuda_target(), templates.get("norm_cuda_rows"), opdef("group_norm")
    w = BUCKETS[2]
    space = t.space(w, tgt)
    for cand in space[:: max(1, len(space) // 4)]:
        with tgt.tvm_target():
            fn = tvm.compile(t.apply(w, tgt, cand), target=tgt.tvm_target())["main"]
        for m in verification_members(w, random.Random(0)):
            ins = od.inputs(m, "cuda", torch.Generator(device="cuda").manual_seed(0))
            out = od.output(m, "cuda").fill_(float("nan"))
            fn(*ins, out)
            chk = check_output(out, od.reference(m, ins), m.dtype)
            assert chk.ok, (str(cand), m.name, chk.reason)
