"""CPU attention (llvm): one parallel task per `rows` query rows of one (batch, head).

Per query row the task computes its score row (skv fp32 values: q·k over d, scaled), the row max,
exp(s - max) and its sum, then P·V over the keys and the division by the sum. The score row lives
in a task-local buffer (skv x 4 bytes), so memory stays O(skv) per task, not O(sq x skv). The head
dim is the innermost loop of the P·V block (keys outside it, so v rows stream contiguously) and of
the output, which is vectorized `vec` wide when it divides d.
"""

from __future__ import annotations

from shapetune.ops import opdef

from .base import Template, register


class AttnLLVM(Template):
    name = "attn_llvm"
    ops = ("attention",)
    kinds = ("llvm",)
    knob_choices = {
        "rows": (1, 4, 16),  # query rows per parallel task
        "vec": (1, 4, 8),
        "unroll_d": (False, True),  # unroll the q·k dot product (d is small and constant)
    }

    def valid(self, workload, target, kn):
        d = workload.dim
        if d["d"] % kn["vec"]:
            return False
        if kn["unroll_d"] and d["d"] > 64:
            return False
        return "sq" in workload.ranges or kn["rows"] <= d["sq"]

    def apply(self, workload, target, candidate):
        import tvm
        from tvm import s_tir

        kn = candidate.knob
        sch = s_tir.Schedule(tvm.IRModule({"main": opdef("attention").prim_func(workload)}))
        for name in ("score", "prob"):  # elementwise: folded into their consumers
            sch.compute_inline(sch.get_sblock(name))
        o = sch.get_sblock("o")
        n, i, j, c = sch.get_loops(o)
        io, ii = sch.split(i, [None, kn["rows"]])
        sch.reorder(n, j, io, ii, c)
        task = sch.fuse(n, j, io)
        sch.parallel(task)
        # producers of one output row, computed under its query-row loop
        for name in ("pv", "rowsum", "rowmax", "qk"):
            sch.compute_at(sch.get_sblock(name), ii, preserve_unit_loops=True)
        pv = sch.get_sblock("pv")
        pc, rv = sch.get_loops(pv)[-2:]
        sch.reorder(rv, pc)  # keys outer, head dim inner: v rows are read contiguously
        sch.decompose_reduction(pv, rv)
        if kn["vec"] > 1:  # (LLVM vectorizes the inner P·V loop itself; a TIR vectorize of an
            _, cv = sch.split(sch.get_loops(o)[-1], [None, kn["vec"]])  # update block is refused)
            sch.vectorize(cv)
        if kn["unroll_d"]:
            sch.unroll(sch.get_loops(sch.get_sblock("qk"))[-1])
        return sch.mod

    def features(self, workload, target, kn):
        d = workload.dim
        tasks = d["b"] * d["h"] * -(-d["sq"] // kn["rows"])
        return {
            "tasks": float(tasks),
            "tasks_per_core": tasks / max(1, target.num_cores),
            "row_bytes": float(d["skv"] * 4),
            "kv_bytes": float(2 * d["skv"] * d["d"] * 2),
            "rows": float(kn["rows"]),
            "vec": float(kn["vec"]),
        }


register(AttnLLVM())
