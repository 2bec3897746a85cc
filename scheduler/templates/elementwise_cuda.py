"""CUDA elementwise passes (gelu_gate, bias_add): the output in memory order, `vec` contiguous
elements of the last dim per thread and step (one 128-bit access at most), `threads` per block, each
thread doing `items` steps strided by the block's width (so every step of a warp reads one contiguous
run). Dynamic dims stay symbolic: the fused loop is predicated at its tail. gelu_gate's erf has no
vector form, so its operands and result are staged through registers with vector accesses around a
scalar compute loop.
"""

from __future__ import annotations

import math

from cost_model import dtype_bytes
from shapetune.ops import opdef

from .base import Template, register


def elementwise_shape(workload) -> tuple[int, int]:
    """(elements of the output, length of its contiguous last dim) at the workload's dims."""
    d = workload.dim
    if workload.op == "gelu_gate":
        return d["m"] * d["f"], d["f"]
    return d["n"] * d["hw"] * d["c"], d["c"]


def elementwise_features(workload, target, vec: int, per_task: int, tasks_resident: int) -> dict[str, float]:
    """Analytical numbers of an elementwise schedule (also used by elementwise_llvm): per_task =
    elements one block (CPU: one parallel task) writes, tasks_resident = tasks in flight."""
    elems, last = elementwise_shape(workload)
    eb = dtype_bytes(workload.dtype)
    tasks = math.ceil(elems / per_task)
    waves = tasks / tasks_resident
    moved = {"gelu_gate": 3, "bias_add": 2 if not workload.epilogue else 3}[workload.op] * elems * eb
    return {
        "log2_bytes": math.log2(moved),
        "bytes_moved": float(moved),
        "tasks": float(tasks),
        "waves": waves,
        "wave_eff": tasks / (math.ceil(waves) * tasks_resident),
        "vec_bytes": float(vec * eb),
        "per_task": float(per_task),
        "last_dim": float(last),
    }


class ElementwiseCuda(Template):
    name = "elementwise_cuda"
    ops = ("gelu_gate", "bias_add")
    kinds = ("cuda",)
    knob_choices = {
        "threads": (64, 128, 256, 512),
        "vec": (1, 2, 4, 8),
        "items": (1, 2, 4, 8),
    }

    def valid(self, workload, target, kn):
        elems, last = elementwise_shape(workload)
        if last % kn["vec"] or kn["vec"] * dtype_bytes(workload.dtype) > 16:
            return False
        return kn["threads"] * kn["vec"] * kn["items"] <= max(elems, kn["threads"] * kn["vec"])  # no idle block

    def apply(self, workload, target, candidate):
        import tvm
        from tvm import s_tir

        kn = candidate.knob
        sch = s_tir.Schedule(tvm.IRModule({"main": opdef(workload.op).prim_func(workload)}))
        y = sch.get_sblock("y")
        loops = sch.get_loops(y)
        last_o, v = sch.split(loops[-1], [None, kn["vec"]])
        bx, it, tx = sch.split(sch.fuse(*loops[:-1], last_o), [None, kn["items"], kn["threads"]])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        if kn["items"] > 1:
            sch.unroll(it)
        if workload.op == "gelu_gate" and kn["vec"] > 1:
            # erf has no vector form: TVM would scalarize the whole loop, loads and stores included.
            # Stage p (both halves) and y in registers with vector accesses; compute in a scalar loop.
            pl = sch.cache_read(y, 0, "local")
            sch.compute_at(pl, tx, preserve_unit_loops=True)
            sch.vectorize(sch.get_loops(pl)[-1])
            yl = sch.cache_write(y, 0, "local")
            sch.reverse_compute_at(yl, tx, preserve_unit_loops=True)
            sch.vectorize(sch.get_loops(yl)[-1])
            sch.unroll(v)
        else:
            sch.vectorize(v)
        return sch.mod

    def features(self, workload, target, kn):
        per_block = kn["threads"] * kn["vec"] * kn["items"]
        f = elementwise_features(workload, target, kn["vec"], per_block,
                                 max(1, min(32, 2048 // kn["threads"])) * target.num_cores)
        f["threads"] = float(kn["threads"])
        f["items"] = float(kn["items"])
        return f


register(ElementwiseCuda())
