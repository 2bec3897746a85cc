"""CUDA GEGLU on tensor cores (WMMA 16x16x16, fp16 in, fp32 accumulate): gemm_cuda_wmma's tiling with
both halves of the projection in one thread block.

acc[s, i, j] = sum_k x[i, k] w[s, j, k] (s = 0: h, s = 1: gate; w is diffusers' proj.weight [2f, k]
viewed as [2, f, k]); y[i, j] = (acc[0, i, j] + b[0, j]) * gelu(acc[1, i, j] + b[1, j]).

A thread block owns a BM x BN tile of y and computes both of its accumulator tiles in one k loop:
each warp holds frag_m x 2 x frag_n WMMA fragments (h and gate for the same columns), x's shared
tile feeds both. The fragments go to one fp32 shared staging tile [2, BM, BN]; the gated epilogue
(bias, exact GELU in fp32, product, cast) reads both halves from there and writes y. The [m, 2f]
projection never reaches global memory.

Why the block tile is placed from y's side (compute_at of the GEMM under y's tile loop), not the
other way round as in gemm_cuda: the epilogue reads two elements of the accumulator per output, so
TVM cannot move it under the GEMM's loops (reverse_compute_at solves one producer element per
output) nor inline it into the fragment store.

Exact shapes that are whole multiples of the tile only (see `valid`); with a symbolic m (a shape bucket), TVM 0.27 refuses the compute_at of the
shared-memory loads ("not a stage pipeline": region cover fails under the ragged symbolic tile), so
this template does not apply to bucket workloads; geglu buckets get dlight alone on CUDA.
"""

from __future__ import annotations

from shapetune.ops import opdef

from .base import Template, register
from .gemm_cuda import (SMEM_LIMIT, STATIC_SMEM_LIMIT, _inline_producers, annotate_pipeline, tensorize_wmma,
                        tile_shape)


def smem_bytes(kn: dict) -> tuple[int, int]:
    """(dynamic bytes for the x tile and both w tiles, static bytes for the [2, BM, BN] fp32
    staging tile)."""
    bm, bn, bk = tile_shape(kn)
    stages = 2 if kn["pipeline"] else 1
    return (bm + 2 * bn) * (bk + 8) * 2 * stages, 2 * bm * (bn + 4) * 4


class GegluCudaWMMA(Template):
    name = "geglu_cuda_wmma"
    ops = ("geglu",)
    kinds = ("cuda",)
    knob_choices = {
        "warps_m": (1, 2, 4),
        "warps_n": (1, 2, 4),
        "frag_m": (1, 2, 4),
        "frag_n": (1, 2),
        "k_frags": (1, 2, 4),
        "vec": (4, 8),
        "pipeline": (0, 1, 2),  # 0: none, 1: software pipeline, 2: pipeline + cp.async
    }

    def applies(self, workload, target):
        return super().applies(workload, target) and workload.dtype == "float16" and not workload.dynamic

    def valid(self, workload, target, kn):
        bm, bn, bk = tile_shape(kn)
        threads = 32 * kn["warps_m"] * kn["warps_n"]
        # Two accumulator fragments (h, gate) per (frag_m, frag_n): at most 8 per warp.
        if threads > 1024 or 2 * kn["frag_m"] * kn["frag_n"] > 8 or bm > 256 or bn > 128:
            return False
        dyn, static = smem_bytes(kn)
        if dyn + static > SMEM_LIMIT or static > STATIC_SMEM_LIMIT:
            return False
        per_step = threads * kn["vec"]
        if (bm * bk) % per_step or (2 * bn * bk) % per_step or (bm * bn) % per_step:
            return False
        d = workload.dim
        # Whole tiles only: with padding (pad_einsum's ragged tiles) TVM 0.27 refuses the
        # compute_at of the shared-memory loads under y's tile ("not a stage pipeline"). Every SD
        # geglu shape divides; other shapes get no candidate here and run the unfused path.
        return d["m"] % bm == 0 and d["f"] % bn == 0 and d["k"] % bk == 0

    def apply(self, workload, target, candidate):
        import tvm
        from tvm import s_tir

        kn = candidate.knob
        bm, bn, bk = tile_shape(kn)
        n_warps = kn["warps_m"] * kn["warps_n"]
        sch = s_tir.Schedule(tvm.IRModule({"main": opdef(workload.op).prim_func(workload)}))
        mm, y = sch.get_sblock("matmul"), sch.get_sblock("y")
        sch.pad_einsum(mm, [1, bm, bn, bk])
        for c in sch.get_consumers(mm):  # the unpad copy: y reads the padded accumulator itself
            if sch.get(c).name_hint != "y":
                sch.compute_inline(c)

        # One thread block per BM x BN tile of y; its two accumulator tiles are computed under it.
        i, j = sch.get_loops(y)
        io, yi = sch.split(i, [None, bm])
        jo, yj = sch.split(j, [None, bn])
        sch.reorder(io, jo, yi, yj)
        blk = sch.fuse(io, jo)
        sch.bind(blk, "blockIdx.x")
        sch.compute_at(mm, blk, preserve_unit_loops=True)

        # 16x16x16 micro tiles (one half each) become one block each: what WMMA replaces.
        s, i, j, k = sch.get_loops(mm)[-4:]
        i, ii = sch.split(i, [None, 16])
        j, ji = sch.split(j, [None, 16])
        k, ki = sch.split(k, [None, 16])
        sch.reorder(s, i, j, k, ii, ji, ki)
        outer = sch.blockize(ii)

        i0, i1, i2 = sch.split(i, [None, kn["warps_m"], kn["frag_m"]])  # i0, j0: unit loops
        j0, j1, j2 = sch.split(j, [None, kn["warps_n"], kn["frag_n"]])
        k0, k1 = sch.split(k, [None, kn["k_frags"]])
        sch.reorder(i0, j0, i1, j1, k0, k1, i2, s, j2)
        warp = sch.fuse(i1, j1)
        sch.bind(warp, "threadIdx.y")

        def to_shared(idx, ndim):
            c = sch.cache_read(outer, idx, "shared.dyn")
            sch.compute_at(c, k0)
            fused = sch.fuse(*sch.get_loops(c)[-ndim:])
            _, ty, tx, v = sch.split(fused, [None, n_warps, 32, kn["vec"]])
            sch.bind(ty, "threadIdx.y")
            sch.bind(tx, "threadIdx.x")
            sch.vectorize(v)
            sch.storage_align(c, 0, axis=-2, factor=16, offset=8)
            return c

        for c in (to_shared(0, 2), to_shared(1, 3)):
            _inline_producers(sch, c)

        a_f = sch.cache_read(outer, 0, "wmma.matrix_a")
        b_f = sch.cache_read(outer, 1, "wmma.matrix_b")
        sch.compute_at(a_f, k1)
        sch.compute_at(b_f, k1)

        # fp32 staging tile in static shared memory (see gemm_cuda), read by the gated epilogue.
        acc_s = sch.cache_write(outer, 0, "shared")
        acc_f = sch.cache_write(outer, 0, "wmma.accumulator")
        sch.reverse_compute_at(acc_f, warp)
        sch.storage_align(acc_f, 0, axis=-2, factor=16, offset=4)
        sch.compute_inline(acc_s)  # y reads the staging tile directly
        init = sch.decompose_reduction(outer, k0)

        tensorize_wmma(sch, a_f, b_f, acc_f, init, mm)

        # Gated epilogue: every thread of the block, vec outputs at a time.
        fused = sch.fuse(yi, yj)
        _, ty, tx, v = sch.split(fused, [None, n_warps, 32, kn["vec"]])
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")
        sch.vectorize(v)

        annotate_pipeline(sch, k0, kn["pipeline"])
        return sch.mod

    def features(self, workload, target, kn):
        from cost_model import dtype_bytes, gemm_tile_features

        d = workload.dim
        bm, bn, bk = tile_shape(kn)
        f = gemm_tile_features(d["m"], 2 * d["f"], d["k"], bm, 2 * bn, bk, target.num_cores,
                               dtype_bytes(workload.dtype))
        f["threads"] = 32.0 * kn["warps_m"] * kn["warps_n"]
        f["smem_kb"] = sum(smem_bytes(kn)) / 1024
        f["frags_per_warp"] = 2.0 * kn["frag_m"] * kn["frag_n"]
        return f


register(GegluCudaWMMA())
