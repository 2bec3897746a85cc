"""CUDA normalization (group_norm, layer_norm): one thread block per statistics group.

group_norm: a block per (n, g) reduces the shifted sums S1 = sum (x - p), S2 = sum (x - p)^2 over its
hw x C/G elements (p the group's pivot, its first element: shapetune/ops/norm.py), then writes y for the
same elements; layer_norm: a block per row m over its C elements. Every thread first loads p into a
register (one address for the block: a broadcast); each then accumulates `vec`-wide loads less p in fp32
registers (strided by threads*vec, so a warp reads contiguous runs), then TVM's cross-thread allreduce
(warp shuffles + shared memory) combines the threads; the statistics live in shared memory. The
normalize pass re-reads x from global memory (an L2 hit while the block is resident), or, with
`cache_x`, from a shared-memory copy of the group loaded once (so x crosses DRAM exactly once: the
kernel moves 2 x size(x) bytes in all).

The y block is re-indexed from (n, hw, c) to (n, g, hw, c % (C/G)) (transform_block_layout), so
the normalize loop nest sits under the same block index as the reductions.
"""

from __future__ import annotations

import math

from cost_model import dtype_bytes
from shapetune.ops import opdef

from .base import Template, register

SMEM_LIMIT = 49152  # TVM 0.27 launches without opting in to more (see gemm_cuda.py)
# Full unrolling of a loop with more iterations makes nvcc take minutes (hw4096 x c640 groups: 1280
# iterations at 64 threads x vec 1 never finished building within the tuning job's limit) and
# gains nothing over a rolled loop of that length.
MAX_UNROLL = 64


def group_shape(workload) -> tuple[int, int, int]:
    """(blocks, elements per block, contiguous run length of one row of a block)."""
    d = workload.dim
    if workload.op == "group_norm":
        cg = d["c"] // d["g"]
        return d["n"] * d["g"], d["hw"] * cg, cg
    return d["m"], d["c"], d["c"]


def norm_features(workload, target, kn, threads: int, vec: int, cache_x: bool) -> dict[str, float]:
    """Analytical numbers of a block-per-group normalization schedule (also used by norm_llvm)."""
    blocks, per_block, _ = group_shape(workload)
    eb = dtype_bytes(workload.dtype)
    x_bytes = blocks * per_block * eb
    x_reads = 1 if cache_x else 3  # S1, S2 and normalize passes (the last two mostly from cache)
    resident = max(1, min(32, 2048 // threads)) * target.num_cores  # blocks in flight
    waves = blocks / resident
    iters = math.ceil(per_block / (threads * vec))
    return {
        "bytes_moved": float(x_bytes * (1 + x_reads)),
        "log2_bytes": math.log2(x_bytes * 2),
        "blocks": float(blocks),
        "waves": waves,
        "wave_eff": blocks / (math.ceil(waves) * resident),
        "elems_per_thread": per_block / threads,
        "iters_per_thread": float(iters),
        "thread_util": per_block / (iters * threads * vec),
        "vec_bytes": float(vec * eb),
        "smem_kb": per_block * eb / 1024 if cache_x else 0.0,
    }


def inline_elementwise(sch):
    """xs (group_norm's "shift" prologue, x + b0 + t: into the statistics, the pivots and y), mean, rstd,
    affine, silu: folded into their readers (they are per-element or per-group scalars). The pivot stages
    stay: each template computes them once per block, thread or task (pivot_in_registers)."""
    for name in ("xs", "mean", "rstd", "affine", "silu"):
        try:
            sch.compute_inline(sch.get_sblock(name))
        except Exception:  # xs or silu absent
            pass


def regroup_y(sch, workload):
    """y's loops as (group..., within-group...): group_norm (n, g, hw, c % (C/G)); layer_norm (m, c).
    Returns (group loops, within-group loops)."""
    y = sch.get_sblock("y")
    if workload.op == "group_norm":
        cg = workload.dim["c"] // workload.dim["g"]
        sch.transform_block_layout(y, lambda n, h, c: (n, c // cg, h, c % cg))
        loops = sch.get_loops(y)
        return loops[:2], loops[2:]
    loops = sch.get_loops(y)
    return loops[:1], loops[1:]


class NormCuda(Template):
    name = "norm_cuda"
    ops = ("group_norm", "layer_norm")
    kinds = ("cuda",)
    knob_choices = {
        "threads": (64, 128, 256, 512, 1024),
        "vec": (1, 2, 4, 8),
        "cache_x": (False, True),
        "unroll": (False, True),
    }

    def valid(self, workload, target, kn):
        _, per_block, run = group_shape(workload)
        eb = dtype_bytes(workload.dtype)
        if run % kn["vec"] or kn["vec"] * eb > 16:  # whole, at most 128-bit vectors
            return False
        if kn["threads"] > max(64, -(-per_block // kn["vec"])):  # no mostly idle blocks
            return False
        if kn["unroll"] and -(-per_block // (kn["threads"] * kn["vec"])) > MAX_UNROLL:
            return False
        if kn["cache_x"]:  # a static shared buffer: concrete sizes only
            return not workload.dynamic and per_block * eb <= SMEM_LIMIT - 1024
        return True

    def apply(self, workload, target, candidate):
        import tvm
        from tvm import s_tir

        kn = candidate.knob
        T, V = kn["threads"], kn["vec"]
        sch = s_tir.Schedule(tvm.IRModule({"main": opdef(workload.op).prim_func(workload)}))
        inline_elementwise(sch)
        group, inner = regroup_y(sch, workload)
        n_red = len(inner)
        bx = sch.fuse(*group)
        sch.bind(bx, "blockIdx.x")
        y_o = _thread_split(sch, inner, T, V)
        sch.vectorize(sch.get_loops(sch.get_sblock("y"))[-1])

        stats = [sch.get_sblock("sum"), sch.get_sblock("sqsum")]
        if kn["cache_x"]:
            xs = sch.cache_read(stats[0], 0, "shared", consumer_blocks=stats + [sch.get_sblock("y")])
        serial = [y_o]
        for blk in reversed(stats):
            sch.set_scope(blk, 0, "shared")
            sch.compute_at(blk, bx, preserve_unit_loops=True)
        for blk in stats:
            red = sch.get_loops(blk)[-n_red:]
            # (..., r_last) -> (tx, serial, v): thread t owns vectors t, t + T, t + 2T, ...
            r_o, r_v = sch.split(red[-1], [None, V])
            r_s, tx = sch.split(sch.fuse(*red[:-1], r_o), [None, T])
            sch.reorder(tx, r_s, r_v)
            sch.bind(tx, "threadIdx.x")
            serial.append(r_s)
            if V > 1:  # one vector load into registers, then V scalar accumulations
                xl = sch.cache_read(blk, 0, "local", consumer_blocks=[blk])
                sch.compute_at(xl, r_s, preserve_unit_loops=True)
                sch.vectorize(sch.get_loops(xl)[-1])
        pivot_in_registers(sch, "pivot", bx)
        if kn["cache_x"]:
            sch.compute_at(xs, bx, preserve_unit_loops=True)
            loops = sch.get_loops(xs)[-n_red:]
            _thread_split(sch, loops, T, V)
            sch.vectorize(sch.get_loops(xs)[-1])
        if kn["unroll"]:
            for loop in serial:  # constant trip counts unroll fully (symbolic ones cannot)
                if isinstance(sch.get(loop).extent, tvm.tirx.IntImm):
                    sch.unroll(loop)
        return sch.mod

    def features(self, workload, target, kn):
        f = norm_features(workload, target, kn, kn["threads"], kn["vec"], kn["cache_x"])
        f["threads"] = float(kn["threads"])
        return f


def pivot_in_registers(sch, name: str, loop) -> None:
    """The pivot stage `name` (shapetune/ops/norm.py: each statistics group's first element) computed under
    `loop` (a block's or a thread's loop) into registers ("local"): every thread loads its group's pivot
    once (one address for a block: a broadcast), and the reductions and the normalize pass subtract it."""
    blk = sch.get_sblock(name)
    sch.set_scope(blk, 0, "local")
    sch.compute_at(blk, loop, preserve_unit_loops=True)


def _thread_split(sch, loops, threads: int, vec: int):
    """(..., last) -> (serial, threadIdx.x, vec) with the vector loop innermost; returns serial."""
    last_o, last_v = sch.split(loops[-1], [None, vec])
    o, tx = sch.split(sch.fuse(*loops[:-1], last_o), [None, threads])
    sch.bind(tx, "threadIdx.x")
    return o


register(NormCuda())
