"""CPU normalization (llvm): one parallel task per statistics group (group_norm: (n, g); layer_norm:
`rows` rows). A task loads its group's pivot p (its first element), reduces the shifted sums S1 = sum
(x - p) and S2 = sum (x - p)^2 of its group (shapetune/ops/norm.py), then normalizes it while it is
still in cache; the normalize loop is vectorized `vec` wide over the contiguous channels, the
reduction's innermost loop optionally unrolled (LLVM cannot vectorize a TIR reduction loop, but
unrolling lets it interleave the adds). A group's sums run serially in one accumulator: their rounding
grows with the group's size (fp32: ~1e-4 max error at 40960 elements, about fp32's tolerance).
"""

from __future__ import annotations

from shapetune.ops import opdef

from .base import Template, register
from .norm_cuda import group_shape, inline_elementwise, norm_features, regroup_y


class NormLLVM(Template):
    name = "norm_llvm"
    ops = ("group_norm", "layer_norm")
    kinds = ("llvm",)
    knob_choices = {
        "vec": (1, 4, 8, 16),
        "rows": (1, 4, 16),  # layer_norm rows per task (group_norm: always one (n, g) group)
        "unroll": (False, True),
    }

    def valid(self, workload, target, kn):
        _, _, run = group_shape(workload)
        if workload.op == "group_norm" and kn["rows"] != 1:
            return False
        return run % kn["vec"] == 0 and (kn["rows"] == 1 or kn["rows"] <= workload.dim.get("m", 1))

    def apply(self, workload, target, candidate):
        import tvm
        from tvm import s_tir

        kn = candidate.knob
        sch = s_tir.Schedule(tvm.IRModule({"main": opdef(workload.op).prim_func(workload)}))
        inline_elementwise(sch)
        group, inner = regroup_y(sch, workload)
        y = sch.get_sblock("y")
        if workload.op == "group_norm":
            task = at = sch.fuse(*group)
        else:
            task, at = sch.split(group[0], [None, kn["rows"]])
        sch.parallel(task)
        _, v = sch.split(inner[-1], [None, kn["vec"]])
        sch.vectorize(v)
        for name in ("sqsum", "sum"):
            blk = sch.get_sblock(name)
            sch.compute_at(blk, at, preserve_unit_loops=True)
            if kn["unroll"]:
                _, ri = sch.split(sch.get_loops(blk)[-1], [None, 4 if kn["vec"] == 1 else kn["vec"]])
                sch.unroll(ri)
            sch.decompose_reduction(blk, sch.get_loops(blk)[-len(inner) - (1 if kn["unroll"] else 0)])
        sch.compute_at(sch.get_sblock("pivot"), at, preserve_unit_loops=True)  # the group's first element
        del y
        return sch.mod

    def features(self, workload, target, kn):
        f = norm_features(workload, target, kn, kn["rows"], kn["vec"], False)
        f["rows"] = float(kn["rows"])
        return f


register(NormLLVM())
