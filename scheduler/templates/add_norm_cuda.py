"""add_layer_norm (a transformer block's residual add and the LayerNorm after it): CUDA, one block per row;
the CPU, one parallel task per row.

Each block sums its row s = a + r once into shared memory (vector loads of both operands), loads the
row's pivot p = s[m, 0] into a register of every thread, reduces the shifted sums S1 = sum (s - p) and
S2 = sum (s - p)^2 from there (TVM's cross-thread allreduce; shapetune/ops/norm.py), then writes the row
twice in one loop over [s, y]: s (the residual stream, read by the next residual add) and y =
LayerNorm(s). DRAM traffic: a and r read once, s and y written once: 4 rows, where torch's add then
LayerNorm moves 5 and launches twice. Rows are SD's 320..1280 channels (fp16: 0.6..2.5 KB of shared memory a row).
"""

from __future__ import annotations

import math

from cost_model import dtype_bytes
from shapetune.ops import opdef

from .base import Template, register
from .norm_cuda import SMEM_LIMIT, _thread_split, inline_elementwise, pivot_in_registers


def row_major(workload):
    """The schedule with LayerNorm's elementwise stages folded into the output, whose loops run row by
    row: (schedule, row loop, [s, y] loop, channel loop)."""
    import tvm
    from tvm import s_tir

    sch = s_tir.Schedule(tvm.IRModule({"main": opdef(workload.op).prim_func(workload)}))
    inline_elementwise(sch)
    sch.compute_inline(sch.get_sblock("y"))
    lt, li, lk = sch.get_loops(sch.get_sblock("out"))
    sch.reorder(li, lt, lk)
    return sch, li, lt, lk


class AddNormCuda(Template):
    name = "add_norm_cuda"
    ops = ("add_layer_norm",)
    kinds = ("cuda",)
    knob_choices = {
        "threads": (32, 64, 128, 256, 512),
        "vec": (1, 2, 4, 8),
    }

    def valid(self, workload, target, kn):
        c, eb = workload.dim["c"], dtype_bytes(workload.dtype)
        if c % kn["vec"] or kn["vec"] * eb > 16 or c * eb > SMEM_LIMIT - 1024:
            return False
        return kn["threads"] <= max(32, -(-c // kn["vec"]))  # no mostly idle threads

    def apply(self, workload, target, candidate):
        T, V = candidate.knob["threads"], candidate.knob["vec"]
        sch, li, lt, lk = row_major(workload)
        sch.bind(li, "blockIdx.x")
        ko, kv = sch.split(lk, [None, V])
        _, tx = sch.split(sch.fuse(lt, ko), [None, T])
        sch.bind(tx, "threadIdx.x")
        sch.vectorize(kv)
        s = sch.get_sblock("s")
        stats = [sch.get_sblock("sum"), sch.get_sblock("sqsum")]
        for blk in reversed(stats):
            sch.set_scope(blk, 0, "shared")
            sch.compute_at(blk, li, preserve_unit_loops=True)
        pivot_in_registers(sch, "pivot", li)  # s[m, 0], read from shared memory once s is there
        sch.set_scope(s, 0, "shared")
        sch.compute_at(s, li, preserve_unit_loops=True)
        _thread_split(sch, sch.get_loops(s)[-1:], T, V)
        sch.vectorize(sch.get_loops(s)[-1])
        for blk in stats:
            red = sch.get_loops(blk)[-1]
            r_o, r_v = sch.split(red, [None, V])
            r_s, rtx = sch.split(r_o, [None, T])
            sch.reorder(rtx, r_s, r_v)
            sch.bind(rtx, "threadIdx.x")
        return sch.mod

    def features(self, workload, target, kn):
        m, c = workload.dim["m"], workload.dim["c"]
        eb = dtype_bytes(workload.dtype)
        resident = max(1, min(32, 2048 // kn["threads"])) * target.num_cores
        iters = math.ceil(c / (kn["threads"] * kn["vec"]))
        return {
            "bytes_moved": float(4 * m * c * eb),
            "log2_bytes": math.log2(4 * m * c * eb),
            "blocks": float(m),
            "waves": m / resident,
            "elems_per_thread": c / kn["threads"],
            "iters_per_thread": float(iters),
            "thread_util": c / (iters * kn["threads"] * kn["vec"]),
            "vec_bytes": float(kn["vec"] * eb),
            "threads": float(kn["threads"]),
            "smem_kb": c * eb / 1024,
        }


register(AddNormCuda())


class AddNormLLVM(Template):
    """The CPU's add_layer_norm: one parallel task per row, its sum s kept for the row (its pivot s[m, 0],
    the statistics and the [s, y] writes read it from cache), the writes vectorized `vec` wide over the
    channels."""

    name = "add_norm_llvm"
    ops = ("add_layer_norm",)
    kinds = ("llvm",)
    knob_choices = {"vec": (1, 4, 8, 16)}

    def valid(self, workload, target, kn):
        return workload.dim["c"] % kn["vec"] == 0

    def apply(self, workload, target, candidate):
        V = candidate.knob["vec"]
        sch, li, _, lk = row_major(workload)
        sch.parallel(li)
        if V > 1:
            sch.vectorize(sch.split(lk, [None, V])[1])
        for name in ("sqsum", "sum", "pivot", "s"):
            sch.compute_at(sch.get_sblock(name), li, preserve_unit_loops=True)
        return sch.mod

    def features(self, workload, target, kn):
        m, c = workload.dim["m"], workload.dim["c"]
        eb = dtype_bytes(workload.dtype)
        return {"log2_bytes": math.log2(4 * m * c * eb), "blocks": float(m), "vec_bytes": float(kn["vec"] * eb),
                "waves": m / max(1, target.num_cores)}


register(AddNormLLVM())
