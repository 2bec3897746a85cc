"""CUDA group_norm whose statistics pass reads whole NHWC rows: three kernels, every access coalesced.

Why: a group of SD's NHWC GroupNorm is C/G = 10..80 channels of each position, i.e. runs of
20..160 bytes every C*2 bytes. Reading group by group (norm_cuda, norm_cuda_split) leaves DRAM
sectors partly used, and at 4096 positions those kernels stay near half of a device copy's
bandwidth (see BENCHMARKS.md, "GroupNorm (+SiLU) and LayerNorm", the hw4096 rows). Here:

  kernel 1 (row partials)  grid n x ceil(hw / P): block (n, chunk) walks its P positions; thread j owns
                           channels [vec*j, vec*j + vec) and sums x - p and (x - p)^2 of them over the
                           chunk, p each channel's group's pivot (its first element: shapetune/ops/
                           norm.py; the thread's vec pivots loaded into registers first, a thread's
                           channels may span two groups), a warp reading 32*vec contiguous channels per
                           position (full sectors), writing partials[n, chunk, c, 2];
  kernel 2 (group stats)   grid n*g: block (n, g) reduces its chunks x C/G partials (cross-thread);
  kernel 3 (normalize)     memory order, one vector of `vec_y` channels of one group per thread, its
                           group's two sums read from the stats (L1/L2 hits), its pivot into a register.

DRAM traffic: x once (kernel 1), partials (n*hw/P*C*8 bytes: 1/16 of x at P = 64 in fp16), x again
(kernel 3; SD's activations fit the 50/60 MB L2) and y once.

Any hw, shape buckets included (n and hw symbolic in TIR, as shapetune/ops/norm.py defines them):
the last chunk may be partial. Its positions past hw load row hw - 1 (clamped: in bounds, the same
full-row vectors, an L1 hit) and add 0 to the sums (a select on the position), and the statistics
divide by the true count hw x C/G; kernel 3's last block is predicated. Where hw is a known multiple
of P (the SD shapes) neither the clamp nor the select is emitted: the CUDA source is the one
before buckets but for a register array's name. Knobs are judged at a bucket's representative (the upper bounds).
"""

from __future__ import annotations

import math

from cost_model import dtype_bytes
from .base import Template, register
from .norm_cuda import inline_elementwise, pivot_in_registers
from .norm_cuda_split import group_norm_from_stats, stacked_term


def row_stats_group_norm(wl, chunk: int):
    """group_norm(x, w, b) -> y via per-(chunk, channel) partial sums, then per-group sums.

    ceil(hw / chunk) chunks, read through `xrow` (x's rows, padded to whole chunks): unless hw is a
    known multiple of the chunk, a position past hw reads row hw - 1 (in bounds, an L1 hit) and adds
    0 to the sums, so the loads stay unconditional vectors and the counts stay hw x C/G."""
    d = wl.dim
    c, g = d["c"], d["g"]
    cg = c // g
    exact = "hw" not in wl.ranges and d["hw"] % chunk == 0

    def stats(x, te, tirx):
        n, hw, _ = x.shape
        nch = tirx.indexdiv(hw + chunk - 1, chunk)
        xrow = te.compute((n, nch * chunk, c), lambda i, h, k: x[i, h if exact else tirx.min(h, hw - 1), k],
                          name="xrow")
        # channel k's group's pivot (x[n, 0, g * C/G], g = k // (C/G)): a thread's channels may span groups
        pc = te.compute((n, c), lambda i, k: x[i, 0, k // cg * cg].astype(wl.acc_dtype), name="stats_pivot")
        rp = te.reduce_axis((0, chunk), "rp")

        def term(i, ch, k, t):
            h = ch * chunk + rp
            v = stacked_term(xrow, (i, h, k), wl.acc_dtype, t, tirx, pc[i, k])
            return v if exact else tirx.Select(h < hw, v, tirx.const(0, wl.acc_dtype))

        part = te.compute((n, nch, c, 2), lambda i, ch, k, t: te.sum(term(i, ch, k, t), axis=rp), name="partial")
        rch, rcc = te.reduce_axis((0, nch), "rch"), te.reduce_axis((0, cg), "rcc")
        return te.compute((n, g, 2), lambda i, j, t: te.sum(part[i, rch, j * cg + rcc, t], axis=[rch, rcc]),
                          name="stats")

    return group_norm_from_stats(wl, stats)


class NormCudaRows(Template):
    name = "norm_cuda_rows"
    ops = ("group_norm",)
    kinds = ("cuda",)
    knob_choices = {
        "chunk": (16, 32, 64, 128),  # P: positions per kernel-1 block
        "vec": (1, 2, 4),  # kernel 1: channels per thread
        "threads_s": (64, 128, 256),  # kernel 2
        "threads_y": (128, 256),  # kernel 3
        "vec_y": (1, 2, 4, 8),  # kernel 3: channels per thread (one group)
    }

    def valid(self, workload, target, kn):
        """A bucket is judged at its representative (the upper bounds of n and hw); partial chunks and
        a partial last block of kernel 3 are masked, so neither needs hw or n to divide anything."""
        d = workload.dim
        cg = d["c"] // d["g"]
        eb = dtype_bytes(workload.dtype)
        if kn["chunk"] > max(16, d["hw"]):  # a chunk past every position only masks (the smallest stays)
            return False
        if d["c"] % kn["vec"] or d["c"] // kn["vec"] > 1024:
            return False
        if cg % kn["vec_y"] or kn["vec_y"] * eb > 16:
            return False
        return kn["threads_s"] <= max(64, _chunks(d["hw"], kn["chunk"]) * cg)  # no mostly idle stats blocks

    def apply(self, workload, target, candidate):
        import tvm
        from tvm import s_tir

        kn = candidate.knob
        d = workload.dim
        cg = d["c"] // d["g"]
        sch = s_tir.Schedule(tvm.IRModule({"main": row_stats_group_norm(workload, kn["chunk"])}))
        for name in ("sum", "sqsum"):
            sch.compute_inline(sch.get_sblock(name))
        inline_elementwise(sch)

        # kernel 1: block (n, chunk), thread over channel vectors, serial over t and positions
        # (sums in registers, written out once; x loaded once per position as one vector for both sums:
        # xrow, the clamped rows, lives in registers)
        part = sch.get_sblock("partial")
        pn, pch, pc, pt, prp = sch.get_loops(part)
        pco, pcv = sch.split(pc, [None, kn["vec"]])
        sch.reorder(pn, pch, pco, prp, pt, pcv)
        sch.bind(sch.fuse(pn, pch), "blockIdx.x")
        sch.bind(pco, "threadIdx.x")
        acc = sch.cache_write(part, 0, "local")
        sch.reverse_compute_at(acc, pco, preserve_unit_loops=True)
        pivot_in_registers(sch, "stats_pivot", pco)  # the pivots of the thread's vec channels
        xl = sch.get_sblock("xrow")
        sch.set_scope(xl, 0, "local")
        sch.compute_at(xl, prp, preserve_unit_loops=True)
        if kn["vec"] > 1:
            sch.vectorize(sch.get_loops(xl)[-1])

        # kernel 2: block (n, g), threads over (chunks x C/G) partials
        st = sch.get_sblock("stats")
        sn, sg, stt, srch, srcc = sch.get_loops(st)
        sch.bind(sch.fuse(sn, sg), "blockIdx.x")
        r_s, tx = sch.split(sch.fuse(srch, srcc), [None, kn["threads_s"]])
        sch.reorder(stt, tx, r_s)
        sch.bind(tx, "threadIdx.x")

        # kernel 3: memory order, (n, hw, g, c % (C/G)) so each thread's group is a loop of its own
        y = sch.get_sblock("y")
        sch.transform_block_layout(y, lambda n, h, c: (n, h, c // cg, c % cg))
        yn, yh, yg, yc = sch.get_loops(y)
        yco, yv = sch.split(yc, [None, kn["vec_y"]])
        ybx, ty = sch.split(sch.fuse(yn, yh, yg, yco), [None, kn["threads_y"]])
        sch.bind(ybx, "blockIdx.x")
        sch.bind(ty, "threadIdx.x")
        sch.vectorize(yv)
        pivot_in_registers(sch, "pivot", ty)
        return sch.mod

    def features(self, workload, target, kn):
        d = workload.dim
        cg = d["c"] // d["g"]
        eb = dtype_bytes(workload.dtype)
        x_bytes = d["n"] * d["hw"] * d["c"] * eb
        nch = _chunks(d["hw"], kn["chunk"])
        blocks1 = d["n"] * nch
        return {
            "log2_bytes": math.log2(2 * x_bytes),
            "blocks": float(blocks1),
            "waves": blocks1 / target.num_cores,
            "partial_bytes_frac": 8.0 * d["c"] * blocks1 / x_bytes,
            "threads": float(d["c"] // kn["vec"]),
            "vec_bytes": float(kn["vec"] * eb),
            "vec_y_bytes": float(kn["vec_y"] * eb),
            "stats_elems_per_thread": nch * cg / kn["threads_s"],
            "chunk_util": d["hw"] / (nch * kn["chunk"]),  # positions read / positions walked
            "run_bytes": float(d["c"] * eb),
            "chunk": float(kn["chunk"]),
        }


def _chunks(hw: int, chunk: int) -> int:
    return -(-hw // chunk)


register(NormCudaRows())
