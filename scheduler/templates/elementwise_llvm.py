"""CPU elementwise passes (gelu_gate, bias_add): rows (all but the last dim, fused) split into
parallel tasks of `rows` rows each, the contiguous last dim vectorized `vec` wide."""

from __future__ import annotations

from shapetune.ops import opdef

from .base import Template, register
from .elementwise_cuda import elementwise_features, elementwise_shape


class ElementwiseLLVM(Template):
    name = "elementwise_llvm"
    ops = ("gelu_gate", "bias_add")
    kinds = ("llvm",)
    knob_choices = {"vec": (1, 4, 8, 16), "rows": (1, 8, 64)}

    def valid(self, workload, target, kn):
        return elementwise_shape(workload)[1] % kn["vec"] == 0

    def apply(self, workload, target, candidate):
        import tvm
        from tvm import s_tir

        kn = candidate.knob
        sch = s_tir.Schedule(tvm.IRModule({"main": opdef(workload.op).prim_func(workload)}))
        loops = sch.get_loops(sch.get_sblock("y"))
        task, _ = sch.split(sch.fuse(*loops[:-1]), [None, kn["rows"]])
        sch.parallel(task)
        _, v = sch.split(loops[-1], [None, kn["vec"]])
        sch.vectorize(v)
        return sch.mod

    def features(self, workload, target, kn):
        elems, last = elementwise_shape(workload)
        f = elementwise_features(workload, target, kn["vec"], kn["rows"] * last, max(1, target.num_cores))
        f["rows"] = float(kn["rows"])
        return f


register(ElementwiseLLVM())
