"""CPU conv2d (llvm), NHWC x OHWI, directly on the conv loops.

y[n, ho, wo, co] = sum_{kh, kw, ci} xp[n, ho*s + kh, wo*s + kw, ci] w[co, kh, kw, ci]: each parallel
task owns one output row (n, ho); inside it a tw x tc tile of (wo, co) accumulates over kh, kw and
ci (in tk chunks), co innermost (vectorized where the tile divides Co). The zero padding is
inlined into the loads (a predicate, no padded copy of x); the epilogue (bias, residual, cast) runs
right after each tile.
"""

from __future__ import annotations

from shapetune.ops import opdef
from shapetune.ops.conv import out_hw

from .base import Template, register


class ConvLLVM(Template):
    name = "conv_llvm"
    ops = ("conv2d",)
    kinds = ("llvm",)
    knob_choices = {
        "tw": (1, 2, 4, 8),
        "tc": (4, 8, 16, 32),
        "tk": (4, 16, 64),
    }

    def valid(self, workload, target, kn):
        d = workload.dim
        _, wo = out_hw(workload)
        return kn["tw"] <= max(1, wo) and kn["tc"] <= max(4, d["co"]) and kn["tk"] <= max(4, d["ci"])

    def apply(self, workload, target, candidate):
        import tvm
        from tvm import s_tir

        kn = candidate.knob
        d = workload.dim
        sch = s_tir.Schedule(tvm.IRModule({"main": opdef(workload.op).prim_func(workload)}))
        conv = sch.get_sblock("conv")
        for p in sch.get_producers(conv):  # the zero-padding block, if any
            sch.compute_inline(p)
        n, i, j, c, rh, rw, rc = sch.get_loops(conv)
        jo, ji = sch.split(j, [None, kn["tw"]])
        co, ci = sch.split(c, [None, kn["tc"]])
        rco, rci = sch.split(rc, [None, kn["tk"]])
        sch.reorder(n, i, jo, co, rh, rw, rco, rci, ji, ci)
        last = _collapse_epilogue(sch, conv)
        sch.reverse_compute_at(last, co)
        sch.parallel(sch.fuse(n, i))
        init = sch.decompose_reduction(conv, rh)
        if d["co"] % kn["tc"] == 0:  # ragged tiles carry a predicate, which TVM cannot vectorize
            for loop in (sch.get_loops(init)[-1], ci, sch.get_loops(last)[-1]):
                _try(sch.vectorize, loop)
        sch.unroll(ji)
        return sch.mod

    def features(self, workload, target, kn):
        d = workload.dim
        _, wo = out_hw(workload)
        return {"tile_elems": float(kn["tw"] * kn["tc"]),
                "co_waste": float(-(-d["co"] // kn["tc"]) * kn["tc"] / d["co"]),
                "wo_waste": float(-(-wo // kn["tw"]) * kn["tw"] / wo)}


def _try(primitive, loop) -> None:
    from tvm.s_tir.schedule import ScheduleError

    try:
        primitive(loop)
    except ScheduleError:
        pass


def _collapse_epilogue(sch, block):
    """Reverse-inline the elementwise chain after `block` into its first block; returns that one."""
    names = []
    while len(cs := sch.get_consumers(block)) == 1:
        block = cs[0]
        names.append(sch.get(block).name_hint)
    for name in reversed(names[1:]):
        sch.reverse_compute_inline(sch.get_sblock(name))
    return sch.get_sblock(names[0])


register(ConvLLVM())
