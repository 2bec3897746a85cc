"""CUDA group_norm with the statistics split over several blocks per group: two kernels, no idle SMs.

Why: SD's GroupNorm has n x 32 = 64 groups at batch 2. One block per group (norm_cuda) fills at most
64 of an H100/H200's 132 SMs, and at 4096 positions each of those blocks streams 2.6 MB alone: the
kernel stays far below a device copy's bandwidth there (see BENCHMARKS.md, "GroupNorm (+SiLU) and
LayerNorm", the hw4096 rows). Here:

  kernel 1 (statistics)  grid n*g*S: block (n, g, s) reduces the shifted sums S1 = sum (x - p) and
                         S2 = sum (x - p)^2 (p the group's pivot, its first element, in a register
                         of every thread: shapetune/ops/norm.py) over its 1/S of the group's positions
                         (threads strided over `vec_s`-wide vector loads of contiguous channels, TVM's
                         cross-thread allreduce), writing partials [S, n, g, 2] to a global workspace;
  kernel 2 (normalize)   grid over all elements, `iters` x `vec` per thread: each thread first sums
                         its group's S partials (2S loads, L1 broadcasts) and loads p into registers,
                         then writes y = ((x - p) - mean) * rstd * w + b (, silu) for its elements.

x is read twice, but SD's activations (<= 21 MB at batch 2) stay in the 50/60 MB L2 between the two
kernels, so DRAM sees about x once and y once. The two statistics come from one reduction block
over a stacked axis t in {0: x, 1: x^2} (rfactor then splits it over S), so one kernel computes
both. S must divide hw (rfactor of a non-perfect split is refused), so shape buckets (symbolic hw)
stay with norm_cuda. The PrimFunc is this template's own variant of shapetune/ops/norm.py's definition
(same arguments, same math) — verified against the same float64 reference as every candidate.
"""

from __future__ import annotations

import math

from cost_model import dtype_bytes
from shapetune.ops.norm import _normalize, eps_of, group_norm_input, group_pivot

from .base import Template, register
from .norm_cuda import inline_elementwise, pivot_in_registers


def group_norm_from_stats(wl, stats):
    """group_norm(x, w, b) -> y whose sums come from `stats(x, te, tirx)`: a tensor st[n, g, t]
    with t = 0: sum (x - p), 1: sum (x - p)^2 over the group, p = x[n, 0, g * C/G] the group's pivot
    (shifted moments, as in shapetune/ops/norm.py; the templates differ only in how they build st).
    Each `stats` reads its pivot through a stage of its own, "stats_pivot" (group_pivot: computed in the
    statistics kernel), the normalize pass through "pivot" (computed in the normalize kernel): one stage
    cannot be computed in two kernels, and read inline, x[n, 0, ...] would widen the region of x a
    thread's vector cache holds. A bucket's dynamic n / hw are symbolic (x.shape tells `stats`), and
    with "shift" x is the stage x + b0 + t, as in shapetune/ops/norm.py (group_norm_input)."""
    from tvm import te, tirx

    d = wl.dim
    n, hw, c, g = d["n"], d["hw"], d["c"], d["g"]
    cg = c // g
    if "hw" in wl.ranges:
        hw = te.var("hw")
    if "n" in wl.ranges:
        n = te.var("n")
    args, x = group_norm_input(wl, n, hw, te)
    w = te.placeholder((c,), wl.dtype, name="w")
    b = te.placeholder((c,), wl.dtype, name="b")
    st = stats(x, te, tirx)
    cnt = tirx.const(float(hw * cg), wl.acc_dtype) if isinstance(hw, int) else (hw * cg).astype(wl.acc_dtype)
    s1 = te.compute((n, g), lambda i, j: st[i, j, 0], name="sum")
    s2 = te.compute((n, g), lambda i, j: st[i, j, 1], name="sqsum")
    p = group_pivot(x, cg, wl.acc_dtype, te)
    y = _normalize(te, tirx, x, p, w, b, s1, s2, cnt, eps_of(wl), (n, hw, c),
                   lambda i, h, k: (i, k // cg), lambda i, h, k: k, wl.dtype, wl.acc_dtype, "silu" in wl.epilogue)
    return te.create_prim_func(args + [w, b, y]).with_attr("global_symbol", "main")


def stacked_term(x, idx, acc: str, t, tirx, p):
    """v = x - p (as acc, p the group's pivot) for t == 0, v^2 for t == 1: the two shifted sums as one
    stacked reduction."""
    v = x[idx].astype(acc) - p
    return tirx.Select(t == 0, v, v * v)


def stacked_group_norm(wl):
    """group_norm(x, w, b) -> y with S1, S2 as one reduction: st[n, g, t], t = 0: x - p, 1: (x - p)^2."""
    d = wl.dim
    hw, cg = d["hw"], d["c"] // d["g"]

    def stats(x, te, tirx):
        p = group_pivot(x, cg, wl.acc_dtype, te, "stats_pivot")
        rh, rc = te.reduce_axis((0, hw), "rh"), te.reduce_axis((0, cg), "rc")
        return te.compute((d["n"], d["g"], 2), lambda i, j, t: te.sum(
            stacked_term(x, (i, rh, j * cg + rc), wl.acc_dtype, t, tirx, p[i, j]), axis=[rh, rc]), name="stats")

    return group_norm_from_stats(wl, stats)


class NormCudaSplit(Template):
    name = "norm_cuda_split"
    ops = ("group_norm",)
    kinds = ("cuda",)
    knob_choices = {
        "split": (2, 4, 8, 16),  # S: blocks per group in the statistics kernel
        "threads": (128, 256, 512),  # statistics kernel
        "vec_s": (1, 2, 4, 8),  # statistics kernel: elements per vector load
        "threads_y": (128, 256),  # normalize kernel
        "iters": (1, 2, 4, 8),  # normalize: vectors per thread (amortizes the partial sums)
        "vec": (1, 2, 4, 8),  # normalize: elements per vector access
        # normalize order: "group" walks a group's (hw, C/G) elements (a thread stays in one group);
        # "natural" walks y in memory order (fully coalesced rows of C channels), one vector a thread
        "order": ("group", "natural"),
    }

    def applies(self, workload, target):
        return super().applies(workload, target) and not workload.dynamic

    def valid(self, workload, target, kn):
        d = workload.dim
        cg = d["c"] // d["g"]
        eb = dtype_bytes(workload.dtype)
        if d["hw"] % kn["split"] or cg % kn["vec"] or kn["vec"] * eb > 16:
            return False
        if cg % kn["vec_s"] or kn["vec_s"] * eb > 16:
            return False
        per_block = d["hw"] // kn["split"] * cg
        if kn["threads"] * kn["vec_s"] > per_block:  # no mostly idle statistics blocks
            return False
        if kn["order"] == "natural":
            return kn["iters"] == 1 and d["n"] * d["hw"] * d["c"] // kn["vec"] % kn["threads_y"] == 0
        per_thread_y = kn["threads_y"] * kn["iters"] * kn["vec"]
        return d["hw"] * cg % per_thread_y == 0  # normalize tiles never straddle two groups

    def apply(self, workload, target, candidate):
        import tvm
        from tvm import s_tir

        kn = candidate.knob
        S, T, TY, IT, V, VS = kn["split"], kn["threads"], kn["threads_y"], kn["iters"], kn["vec"], kn["vec_s"]
        d = workload.dim
        cg = d["c"] // d["g"]
        sch = s_tir.Schedule(tvm.IRModule({"main": stacked_group_norm(workload)}))
        for name in ("sum", "sqsum"):
            sch.compute_inline(sch.get_sblock(name))
        inline_elementwise(sch)

        # kernel 1: partial statistics [S, n, g, 2]
        st = sch.get_sblock("stats")
        _, _, _, rh, _ = sch.get_loops(st)
        rs, _ = sch.split(rh, [S, None])
        rf = sch.rfactor(rs, factor_axis=0)
        ln, lg, lt, ls, li, lc = sch.get_loops(rf)
        schedule_partials(sch, rf, (ln, lg, ls, lt, li, lc), T, VS)

        # kernel 2: normalize, each thread reducing its group's partials first
        if kn["order"] == "group":  # a thread stays in one group: (n, g, the group's elements)
            y = sch.get_sblock("y")
            sch.transform_block_layout(y, lambda n, h, c: (n, c // cg, h * cg + c % cg))
            yn, yg, ye = sch.get_loops(y)
            eo, ei, ty, yv = sch.split(ye, [None, IT, TY, V])
            ybx = sch.fuse(yn, yg, eo)
            sch.reorder(ty, ei, yv)
            sch.bind(ybx, "blockIdx.x")
            sch.bind(ty, "threadIdx.x")
            sch.vectorize(yv)
            sch.set_scope(st, 0, "local")
            sch.compute_at(st, ty, preserve_unit_loops=True)
            pivot_in_registers(sch, "pivot", ty)
        else:
            normalize_in_memory_order(sch, st, cg, TY, V)
        return sch.mod

    def features(self, workload, target, kn):
        return split_features(workload, target, kn, kn["iters"], kn["order"] == "natural")


def schedule_partials(sch, block, loops, threads: int, vec_s: int) -> None:
    """Kernel 1 of the split templates: `block` computes the partial statistics [S, n, g, 2] under
    `loops` = (n, g, s, t, the reduction over positions, over the group's channels). A thread block per
    (n, g, s); thread t owns vectors t, t + T, ... of `vec_s` channels (TVM's cross-thread allreduce
    combines them), each loaded into registers once, then vec_s scalar accumulations, each less the
    group's pivot ("stats_pivot", loaded into a register by every thread first)."""
    ln, lg, ls, lt, lh, lc = loops
    sch.reorder(ln, lg, ls, lt, lh, lc)
    bx = sch.fuse(ln, lg, ls)
    sch.bind(bx, "blockIdx.x")
    pivot_in_registers(sch, "stats_pivot", bx)
    lc_o, lc_v = sch.split(lc, [None, vec_s])
    r_s, tx = sch.split(sch.fuse(lh, lc_o), [None, threads])
    sch.reorder(tx, r_s, lc_v)
    sch.bind(tx, "threadIdx.x")
    if vec_s > 1:
        xl = sch.cache_read(block, 0, "local", consumer_blocks=[block])
        sch.compute_at(xl, r_s, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(xl)[-1])


def normalize_in_memory_order(sch, stats, cg: int, threads_y: int, vec: int) -> None:
    """Kernel 2 of the split templates in memory order: y as (n, hw, g, c % (C/G)), with the group a loop
    of its own so each thread's statistics region is provably one group (a fused index over-approximates
    it), one `vec`-wide vector per thread, each thread summing its group's S partials (`stats`, local)
    and loading its group's pivot first; the last thread block predicated where the sizes leave a
    remainder."""
    y = sch.get_sblock("y")
    sch.transform_block_layout(y, lambda n, h, c: (n, h, c // cg, c % cg))
    yn, yh, yg, yc = sch.get_loops(y)
    yco, yv = sch.split(yc, [None, vec])
    ybx, ty = sch.split(sch.fuse(yn, yh, yg, yco), [None, threads_y])
    sch.bind(ybx, "blockIdx.x")
    sch.bind(ty, "threadIdx.x")
    sch.vectorize(yv)
    sch.set_scope(stats, 0, "local")
    sch.compute_at(stats, ty, preserve_unit_loops=True)
    pivot_in_registers(sch, "pivot", ty)


def split_features(workload, target, kn, iters: int, natural: bool) -> dict[str, float]:
    """The analytical numbers of a split-statistics schedule (knobs `kn`, normalize `iters` vectors per
    thread, in memory order or group by group)."""
    d = workload.dim
    cg = d["c"] // d["g"]
    groups = d["n"] * d["g"]
    eb = dtype_bytes(workload.dtype)
    blocks1 = groups * kn["split"]
    blocks2 = groups * d["hw"] * cg / (kn["threads_y"] * iters * kn["vec"])
    return {
        "log2_bytes": math.log2(d["n"] * d["hw"] * d["c"] * eb * 2),
        "blocks": float(blocks1),
        "waves": blocks1 / target.num_cores,
        "blocks_y": float(blocks2),
        "waves_y": blocks2 / (target.num_cores * max(1, 2048 // kn["threads_y"])),
        "elems_per_thread": d["hw"] / kn["split"] * cg / kn["threads"],
        "partial_loads_per_elem": 2.0 * kn["split"] / (iters * kn["vec"]),
        "vec_bytes": float(kn["vec"] * eb),
        "vec_s_bytes": float(kn["vec_s"] * eb),
        "threads": float(kn["threads"]),
        "split": float(kn["split"]),
        "natural_order": float(natural),
        "run_bytes": float(d["c"] * eb if natural else cg * eb),  # contiguous bytes per row walked
    }


register(NormCudaSplit())


def predicated_group_norm(wl, split: int):
    """group_norm(x, w, b) -> y for any hw, shape buckets included: the statistics in `split` partials per
    group, each over a chunk of ceil(hw / split) positions, summed per thread by the normalize kernel.
    A chunk's positions past hw load position hw - 1 (clamped: in bounds) and add 0 (a select on the
    position), and the statistics divide by the true count hw x C/G. Where hw is a known multiple of
    `split` neither the clamp nor the select is emitted."""
    d = wl.dim
    g, cg, acc = d["g"], d["c"] // d["g"], wl.acc_dtype
    exact = "hw" not in wl.ranges and d["hw"] % split == 0

    def stats(x, te, tirx):
        n, hw, _ = x.shape
        p = group_pivot(x, cg, acc, te, "stats_pivot")
        chunk = tirx.indexdiv(hw + split - 1, split)
        rh, rc = te.reduce_axis((0, chunk), "rh"), te.reduce_axis((0, cg), "rc")

        def term(s, i, j, t):
            h = s * chunk + rh
            if exact:
                return stacked_term(x, (i, h, j * cg + rc), acc, t, tirx, p[i, j])
            v = stacked_term(x, (i, tirx.Min(h, hw - 1), j * cg + rc), acc, t, tirx, p[i, j])
            return tirx.Select(h < hw, v, tirx.const(0, acc))

        part = te.compute((split, n, g, 2), lambda s, i, j, t: te.sum(term(s, i, j, t), axis=[rh, rc]),
                          name="partial")
        rs = te.reduce_axis((0, split), "rs")
        return te.compute((n, g, 2), lambda i, j, t: te.sum(part[rs, i, j, t], axis=rs), name="stats")

    return group_norm_from_stats(wl, stats)


class NormCudaSplitBucket(Template):
    """norm_cuda_split's two kernels for shape buckets (n and / or hw symbolic), where rfactor cannot
    split a symbolic hw: the partial statistics are their own stage (predicated_group_norm), and the
    normalize kernel walks y in memory order, one vector per thread, its last block predicated.

    Why: a bucket's GroupNorm otherwise has one block per group (norm_cuda: 32 blocks at batch 1 on 132
    SMs) or three kernels (norm_cuda_rows: a launch more); on an H100 (2026-12-07, 4 trials a search)
    bucket kernels ran at 0.60-0.87x the exact-shape kernels that norm_cuda_split gave
    (tuning_logs/bench/bench_buckets_group_norm_h100.json). Knobs are judged at the bucket's
    representative, and a split must leave every block work at the bucket's smallest hw."""

    name = "norm_cuda_split_bucket"
    ops = ("group_norm",)
    kinds = ("cuda",)
    knob_choices = {
        "split": (2, 4, 8, 16, 32),
        "threads": (128, 256, 512),
        "vec_s": (1, 2, 4, 8),
        "threads_y": (128, 256, 512),
        "vec": (1, 2, 4, 8),
    }

    def applies(self, workload, target):
        return super().applies(workload, target) and bool(workload.dynamic)

    def valid(self, workload, target, kn):
        d = workload.dim
        cg = d["c"] // d["g"]
        eb = dtype_bytes(workload.dtype)
        if cg % kn["vec"] or kn["vec"] * eb > 16 or cg % kn["vec_s"] or kn["vec_s"] * eb > 16:
            return False
        hw_lo = workload.ranges.get("hw", (d["hw"], d["hw"]))[0]
        return kn["threads"] * kn["vec_s"] <= hw_lo // kn["split"] * cg  # no mostly idle statistics blocks

    def apply(self, workload, target, candidate):
        import tvm
        from tvm import s_tir

        kn = candidate.knob
        S, T, TY, V, VS = kn["split"], kn["threads"], kn["threads_y"], kn["vec"], kn["vec_s"]
        cg = workload.dim["c"] // workload.dim["g"]
        sch = s_tir.Schedule(tvm.IRModule({"main": predicated_group_norm(workload, S)}))
        for name in ("sum", "sqsum"):
            sch.compute_inline(sch.get_sblock(name))
        inline_elementwise(sch)

        # kernel 1: partial statistics [S, n, g, 2], a block per (n, g, s), threads across its chunk
        part = sch.get_sblock("partial")
        ls, ln, lg, lt, lh, lc = sch.get_loops(part)
        schedule_partials(sch, part, (ln, lg, ls, lt, lh, lc), T, VS)
        # kernel 2: normalize in memory order, each thread summing its group's S partials first
        normalize_in_memory_order(sch, sch.get_sblock("stats"), cg, TY, V)
        return sch.mod

    def features(self, workload, target, kn):
        return split_features(workload, target, kn, 1, True)


register(NormCudaSplitBucket())
