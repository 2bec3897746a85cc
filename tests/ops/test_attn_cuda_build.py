"""attn_cuda_wmma builds for CUDA sm_90 without a GPU (CUDA codegen needs no driver), for exact SD
shapes, ragged key counts (77) and sq/skv buckets; its space respects the 48 KB shared-memory launch
limit. Correctness runs on a GPU (tests/ops/test_attn_gpu.py). About 10 s here."""

from __future__ import annotations

import pytest

from shapetune.ops.attention import attention_workload
from scheduler import templates
from scheduler.templates.attn_cuda import SMEM_LIMIT, head_pad, smem_bytes
from shapetune.records import Candidate
from shapetune.target import cuda_target, detect

SD_SHAPES = [(4096, 4096, 40), (1024, 1024, 80), (256, 256, 160), (64, 64, 160),
             (4096, 77, 40), (1024, 77, 80), (256, 77, 160), (64, 77, 160)]


@pytest.fixture(scope="module")
def tgt():
    return cuda_target()


@pytest.fixture(scope="module")
def tmpl():
    return templates.get("attn_cuda_wmma")


def _cuda_source(tmpl, w, tgt, knobs) -> str:
    import tvm

    mod = tmpl.apply(w, tgt, Candidate(tmpl.name, tuple(sorted(knobs.items()))))
    with tgt.tvm_target():
        lib = tvm.compile(mod, target=tgt.tvm_target())
    cuda = [m for m in lib.mod.imports if m.kind == "cuda"]
    assert cuda, "no CUDA module"
    return cuda[0].inspect_source()


def test_applies_to_fp16_cuda_only(tmpl, tgt):
    w = attention_workload(2, 1024, 77, 8, 80)
    assert tmpl.applies(w, tgt)
    assert not tmpl.applies(attention_workload(2, 1024, 77, 8, 80, dtype="float32"), tgt)
    assert not tmpl.applies(w, detect("llvm"))


@pytest.mark.parametrize("sq,skv,d", SD_SHAPES, ids=[f"sq{a}_skv{b}_d{c}" for a, b, c in SD_SHAPES])
def test_space_nonempty_within_smem(tmpl, tgt, sq, skv, d):
    w = attention_workload(2, sq, skv, 8, d)
    space = tmpl.space(w, tgt)
    assert space, w.name
    for c in space:
        assert smem_bytes(d, c.knob) <= SMEM_LIMIT
        f = tmpl.features(w, tgt, c.knob)
        assert 0 <= f["pad_flop_frac"] < 1 and f["smem_kb"] <= 48 and f["blocks"] >= 1
    # everything the knobs allow but over the limit is rejected
    over = {"warps": 8, "kv_tile": 128}
    assert smem_bytes(d, over) > SMEM_LIMIT and not tmpl.valid(w, tgt, over)


@pytest.mark.parametrize("w,knobs", [
    (attention_workload(2, 4096, 4096, 8, 40), {"warps": 4, "kv_tile": 32}),   # d=40 padded to 48
    (attention_workload(2, 64, 77, 8, 160), {"warps": 2, "kv_tile": 32}),      # ragged last key tile
    (attention_workload(2, 4096, 77, 8, 40), {"warps": 1, "kv_tile": 128}),    # one key tile (kept a loop)
    (attention_workload(2, 4096, 4096, 8, 40, sq_range=(2049, 4096), skv_range=(2049, 4096)),
     {"warps": 4, "kv_tile": 32}),
    (attention_workload(2, 1024, 128, 8, 80, skv_range=(65, 128)), {"warps": 2, "kv_tile": 32}),
    (attention_workload(4, 1024, 77, 8, 80, b_range=(3, 4), sq_range=(513, 1024), skv_range=(65, 128)),
     {"warps": 2, "kv_tile": 32}),
], ids=["self-d40", "cross-d160", "one-kv-tile", "bucket-sq-skv", "bucket-skv", "bucket-b-sq-skv"])
def test_builds_for_sm90(tmpl, tgt, w, knobs):
    assert tmpl.valid(w, tgt, knobs)
    src = _cuda_source(tmpl, w, tgt, knobs)
    assert "__global__" in src and "nvcuda::wmma::mma_sync" in src
    assert "__syncwarp" in src and "__shfl_xor_sync" in src
    # WMMA pointers need 32-byte alignment: every shared tile is declared alignas(64)
    assert "__shared__ alignas(64)" in src
    if w.dynamic:  # symbolic sizes are kernel arguments, not constants
        for name, _, _ in w.dynamic:
            assert name in src


def test_head_dim_padding():
    assert [head_pad(d) for d in (40, 48, 80, 160, 8)] == [48, 48, 80, 160, 16]
