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
        # reduction block vars are not used to index the output buffers", TVM 0.27), and its CPU rules
        # leave the "shift" prologue's x + b0 + t a buffer of symbolic size, which fails to build where hw
        # is symbolic ("cannot make uint from negative value"): no candidate
        gn = workload.op == "group_norm"
        return target.kind in self.kinds and not (
            gn and target.kind == "cuda" and "n" in workload.ranges) and not (
            gn and target.kind == "llvm" and "shift" in workload.epilogue and "hw" in workload.ranges)

    def apply(self, workload, target, candidate):
        import tvm
        from tvm.s_tir import dlight as dl

        mod = tvm.IRModule({"main": opdef(workload.op).prim_func(workload)})
        if target.kind == "cuda":  # Matmul imports TVM's tensor intrinsics itself where it tensorizes
            rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(), dl.gpu.Reduction(),
                     dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
        else:
            rules = [dl.cpu.GEMV(), dl.cpu.Reduction()]
        with target.tvm_target():
            return dl.ApplyDefaultSchedule(*rules)(mod)


register(DlightDefault())
