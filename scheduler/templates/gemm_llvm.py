"""CPU GEMM (llvm): register tiling of (m, n), a k split, vectorized n, parallel outer tiles.

y[m, n] = sum_k x[m, k] w[n, k]: each task owns a tm x tn tile of y, accumulated over k in tk chunks;
the epilogue (bias, gelu, residual, cast) is computed right after its tile so the accumulator stays tile-sized.
"""

from __future__ import annotations

from cost_model import gemm_tile_features, dtype_bytes
from shapetune.ops import opdef

from .base import Template, register


class GemmLLVM(Template):
    name = "gemm_llvm"
    ops = ("linear",)
    kinds = ("llvm",)
    knob_choices = {
        "tm": (2, 4, 8, 16, 32),
        "tn": (4, 8, 16, 32, 64),
        "tk": (4, 16, 64, 256),
        "unroll_k": (False, True),
    }

    def valid(self, workload, target, knobs):
        d = workload.dim
        # Unrolling tm x tk vector steps makes LLVM compile for minutes (tm=32, tk=64: > 10 min).
        unroll_ok = not knobs["unroll_k"] or knobs["tm"] * knobs["tk"] <= 64
        return (knobs["tm"] <= max(2, d["m"]) and knobs["tn"] <= max(4, d["n"])
                and knobs["tk"] <= max(4, d["k"]) and knobs["tm"] * knobs["tn"] <= 1024 and unroll_ok)

    def apply(self, workload, target, candidate):
        import tvm
        from tvm import s_tir

        kn = candidate.knob
        sch = s_tir.Schedule(tvm.IRModule({"main": opdef(workload.op).prim_func(workload)}))
        mm = sch.get_sblock("matmul")
        i, j, k = sch.get_loops(mm)
        io, ii = sch.split(i, [None, kn["tm"]])
        jo, ji = sch.split(j, [None, kn["tn"]])
        ko, ki = sch.split(k, [None, kn["tk"]])
        sch.reorder(io, jo, ko, ki, ii, ji)
        # The epilogue chain (bias, gelu, residual, cast) collapses into its first block, placed
        # after each tile.
        last = collapse_epilogue(sch, mm)
        dynamic = bool(workload.ranges)
        if not dynamic:
            # (With a symbolic m, TVM 0.27 mis-sizes the compacted tile buffer: the epilogue then
            # stays a separate pass over y.)
            sch.reverse_compute_at(last, jo)
        outer = sch.fuse(io, jo)
        sch.parallel(outer)
        init = sch.decompose_reduction(mm, ko)
        d = workload.dim
        if not dynamic and d["m"] % kn["tm"] == 0 and d["n"] % kn["tn"] == 0 and d["k"] % kn["tk"] == 0:
            # Ragged tiles carry a predicate, which TVM cannot vectorize: they stay scalar.
            for loop in (sch.get_loops(init)[-1], ji, sch.get_loops(last)[-1]):
                _try(sch.vectorize, loop)
        if kn["unroll_k"]:
            sch.unroll(ki)
        sch.unroll(ii)
        return sch.mod

    def features(self, workload, target, knobs):
        d = workload.dim
        return gemm_tile_features(d["m"], d["n"], d["k"], knobs["tm"], knobs["tn"], knobs["tk"],
                                  target.num_cores, dtype_bytes(workload.dtype))


def _try(primitive, loop) -> None:
    """Apply a schedule primitive where TVM proves it legal; elsewhere the loop stays as it is."""
    from tvm.s_tir.schedule import ScheduleError

    try:
        primitive(loop)
    except ScheduleError:
        pass


def epilogue_chain(sch, block) -> list:
    """The elementwise blocks after `block`, in order (each the only consumer of the one before)."""
    chain = []
    while True:
        cs = sch.get_consumers(block)
        if len(cs) != 1:
            return chain
        block = cs[0]
        chain.append(block)


def collapse_epilogue(sch, block):
    """Reverse-inline every epilogue block after the first into it; returns that first block
    (which then computes the whole epilogue and writes the output)."""
    chain = epilogue_chain(sch, block)
    names = [sch.get(b).name_hint for b in chain]
    for name in reversed(names[1:]):
        sch.reverse_compute_inline(sch.get_sblock(name))
    return sch.get_sblock(names[0])


register(GemmLLVM())
