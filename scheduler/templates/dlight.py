"""TVM's dlight default schedule: the baseline candidate of every tuning run (no knobs)."""

from __future__ import annotations

from shapetune.ops import opdef

from .base import Template, register


class DlightDefault(Template):
    name = "dlight"
    ops = ()  # every op family
    kinds = ("cuda", "llvm")
    knob_choices = {}

    def applies(self, workload, target):
        # dlight's GPU reduction rules cannot schedule a group_norm whose batch is symbolic ("the
        # reduction block vars are not used to index the output buffers", TVM 0.27): no candidate
        return target.kind in self.kinds and not (
            target.kind == "cuda" and workload.op == "group_norm" and "n" in workload.ranges)

    def apply(self, workload, target, candidate):
        import tvm
        from tvm import s_tir
        from tvm.s_tir import dlight as dl

        mod = tvm.IRModule({"main": opdef(workload.op).prim_func(workload)})
        if workload.op == "group_norm" and "shift" in workload.epilogue:
            # its prologue x + b0 + t folded into its readers first: dlight's CPU rules would leave it a
            # buffer, which fails to build where hw is symbolic ("cannot make uint from negative value")
            sch = s_tir.Schedule(mod)
            sch.compute_inline(sch.get_sblock("xs"))
            mod = sch.mod
        if target.kind == "cuda":  # Matmul imports TVM's tensor intrinsics itself where it tensorizes
            rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(), dl.gpu.Reduction(),
                     dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
        else:
            rules = [dl.cpu.GEMV(), dl.cpu.Reduction()]
        with target.tvm_target():
            return dl.ApplyDefaultSchedule(*rules)(mod)


register(DlightDefault())
