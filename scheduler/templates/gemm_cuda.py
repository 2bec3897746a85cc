"""CUDA GEMM on tensor cores (WMMA 16x16x16, fp16 in, fp32 accumulate), for sm_70+.

y[m, n] = sum_k x[m, k] w[n, k]. A thread block computes a BM x BN tile of y, BM = 16*warps_m*frag_m,
BN = 16*warps_n*frag_n; each warp owns frag_m x frag_n fragments. k advances BK = 16*k_frags at a
time through shared memory (optionally software-pipelined, optionally with cp.async). The epilogue
(bias, cast to fp16) is applied while the accumulators go back through shared memory to y.
Shapes that are not tile multiples are padded (pad_einsum), so every shape is computed.
"""

from __future__ import annotations

from cost_model import dtype_bytes, gemm_tile_features
from shapetune.ops import opdef

from .base import Template, register

# TVM 0.27 launches without raising the dynamic shared-memory limit (cudaFuncSetAttribute), so
# anything over the default 48 KB fails with CUDA_ERROR_INVALID_VALUE (seen on H200, 2026-11-27).
SMEM_LIMIT = 49152
STATIC_SMEM_LIMIT = 49152


def tile_shape(kn: dict) -> tuple[int, int, int]:
    return 16 * kn["warps_m"] * kn["frag_m"], 16 * kn["warps_n"] * kn["frag_n"], 16 * kn["k_frags"]


def smem_bytes(kn: dict) -> tuple[int, int]:
    """(dynamic bytes for the x/w tiles, static bytes for the fp32 output staging tile)."""
    bm, bn, bk = tile_shape(kn)
    stages = 2 if kn["pipeline"] else 1
    return (bm + bn) * (bk + 8) * 2 * stages, bm * (bn + 4) * 4


class GemmCudaWMMA(Template):
    name = "gemm_cuda_wmma"
    ops = ("linear",)
    kinds = ("cuda",)
    knob_choices = {
        "warps_m": (1, 2, 4),
        "warps_n": (1, 2, 4),
        "frag_m": (1, 2, 4),
        "frag_n": (1, 2, 4),
        "k_frags": (1, 2, 4),
        "vec": (4, 8),
        "pipeline": (0, 1, 2),  # 0: none, 1: software pipeline, 2: pipeline + cp.async
    }

    def applies(self, workload, target):
        return super().applies(workload, target) and workload.dtype == "float16"

    def valid(self, workload, target, kn):
        bm, bn, bk = tile_shape(kn)
        threads = 32 * kn["warps_m"] * kn["warps_n"]
        if threads > 1024 or kn["frag_m"] * kn["frag_n"] > 8 or bm > 256 or bn > 256:
            return False
        dyn, static = smem_bytes(kn)
        if dyn + static > SMEM_LIMIT or static > STATIC_SMEM_LIMIT:
            return False
        # Cooperative loads: every thread moves whole vectors, no ragged tail.
        per_step = threads * kn["vec"]
        if (bm * bk) % per_step or (bn * bk) % per_step or (bm * bn) % (32 * kn["vec"]):
            return False
        d = workload.dim
        # Tiles far larger than the problem only add padding.
        return bm <= max(16, 2 * d["m"]) and bn <= max(16, 2 * d["n"]) and bk <= max(16, 2 * d["k"])

    def apply(self, workload, target, candidate):
        import tvm
        from tvm import s_tir

        sch = s_tir.Schedule(tvm.IRModule({"main": opdef(workload.op).prim_func(workload)}))
        schedule_wmma_gemm(sch, sch.get_sblock("matmul"), candidate.knob)
        return sch.mod

    def features(self, workload, target, kn):
        d = workload.dim
        return wmma_features(workload, target, kn, d["m"], d["n"], d["k"])


def wmma_features(workload, target, kn, m: int, n: int, k: int) -> dict[str, float]:
    bm, bn, bk = tile_shape(kn)
    f = gemm_tile_features(m, n, k, bm, bn, bk, target.num_cores, dtype_bytes(workload.dtype))
    f["threads"] = 32.0 * kn["warps_m"] * kn["warps_n"]
    f["smem_kb"] = sum(smem_bytes(kn)) / 1024
    f["frags_per_warp"] = float(kn["frag_m"] * kn["frag_n"])
    return f


def schedule_wmma_gemm(sch, mm, kn: dict) -> None:
    """Schedule the einsum block mm, C[i, j] = sum_k A[i, k] B[j, k] (exactly three loops i, j, k;
    A and B may be produced by inlinable blocks, C may feed elementwise consumers) with these knobs."""
    bm, bn, bk = tile_shape(kn)
    n_warps = kn["warps_m"] * kn["warps_n"]
    sch.pad_einsum(mm, [bm, bn, bk])

    # 16x16x16 micro tiles become one block each: the unit the WMMA intrinsics replace.
    i, j, k = sch.get_loops(mm)
    i, ii = sch.split(i, [None, 16])
    j, ji = sch.split(j, [None, 16])
    k, ki = sch.split(k, [None, 16])
    sch.reorder(i, j, k, ii, ji, ki)
    outer = sch.blockize(ii)

    i0, i1, i2 = sch.split(i, [None, kn["warps_m"], kn["frag_m"]])
    j0, j1, j2 = sch.split(j, [None, kn["warps_n"], kn["frag_n"]])
    k0, k1 = sch.split(k, [None, kn["k_frags"]])
    sch.reorder(i0, j0, i1, j1, k0, k1, i2, j2)
    sch.bind(sch.fuse(i0, j0), "blockIdx.x")
    warp = sch.fuse(i1, j1)
    sch.bind(warp, "threadIdx.y")

    def to_shared(idx):
        blk = sch.cache_read(outer, idx, "shared.dyn")
        sch.compute_at(blk, k0)
        fused = sch.fuse(*sch.get_loops(blk)[-2:])
        _, ty, tx, v = sch.split(fused, [None, n_warps, 32, kn["vec"]])
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")
        sch.vectorize(v)
        sch.storage_align(blk, 0, axis=-2, factor=16, offset=8)
        return blk

    a_s, b_s = to_shared(0), to_shared(1)
    for blk in (a_s, b_s):
        _inline_producers(sch, blk)

    a_f = sch.cache_read(outer, 0, "wmma.matrix_a")
    b_f = sch.cache_read(outer, 1, "wmma.matrix_b")
    sch.compute_at(a_f, k1)
    sch.compute_at(b_f, k1)

    # Static shared memory for the fp32 staging tile: merged into the fp16 dynamic pool, TVM
    # 0.27 mistypes its tvm_access_ptr (float16 vs float32) and refuses to build.
    acc_s = sch.cache_write(outer, 0, "shared")
    sch.storage_align(acc_s, 0, axis=-2, factor=16, offset=4)
    acc_f = sch.cache_write(outer, 0, "wmma.accumulator")
    sch.reverse_compute_at(acc_f, warp)
    sch.reverse_compute_at(acc_s, warp)
    init = sch.decompose_reduction(outer, k0)

    tensorize_wmma(sch, a_f, b_f, acc_f, init, mm)

    # Epilogue (unpad, bias, cast) fused into the shared -> global store of each warp's tile.
    _inline_consumers(sch, acc_s)
    fused = sch.fuse(*sch.get_loops(acc_s)[-2:])
    _, tx, v = sch.split(fused, [None, 32, kn["vec"]])
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(v)

    annotate_pipeline(sch, k0, kn["pipeline"])


def tensorize_wmma(sch, a_f, b_f, acc_f, init, mm):
    """Replace the fragment loads, the accumulator store, its zero-init and the 16x16x16 update
    with WMMA intrinsics (fp16 x fp16 -> fp32; x tiles from shared.dyn, staging tile in shared)."""
    from .wmma import intrinsics

    intrin = intrinsics()
    for blk, name in ((a_f, "load_a"), (b_f, "load_b"), (acc_f, "store")):
        li, lj = sch.get_loops(blk)[-2:]
        li0, li1 = sch.split(li, [None, 16])
        lj0, lj1 = sch.split(lj, [None, 16])
        sch.reorder(li0, lj0, li1, lj1)
        sch.tensorize(li1, intrin[name])
    sch.tensorize(sch.get_loops(sch.get_child_blocks(init)[0])[-2], intrin["init"])
    sch.tensorize(sch.get_loops(mm)[-3], intrin["compute"])


def annotate_pipeline(sch, k0, mode: int):
    """mode 1: double-buffer the shared tiles across k0; mode 2: and load them with cp.async."""
    if mode:
        sch.annotate(k0, "software_pipeline_stage", [0, 0, 1])
        sch.annotate(k0, "software_pipeline_order", [0, 1, 2])
        if mode == 2:
            sch.annotate(k0, "software_pipeline_async_stages", [0])


def _inline_producers(sch, blk):
    for p in sch.get_producers(blk):
        try:
            sch.compute_inline(p)
        except Exception:
            continue
        _inline_producers(sch, blk)
        return


def _inline_consumers(sch, blk):
    while True:
        for c in sch.get_consumers(blk):
            try:
                sch.reverse_compute_inline(c)
                break
            except Exception:
                continue
        else:
            return


register(GemmCudaWMMA())
