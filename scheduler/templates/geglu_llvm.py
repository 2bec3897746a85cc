"""CPU GEGLU (llvm): the gemm_llvm tiling over both halves at once, gated epilogue per tile.

acc[s, i, j] = sum_k x[i, k] w[s, j, k] for s in {h, gate}; y[i, j] = (acc[0]+b[0]) * gelu(acc[1]+b[1]).
Each task owns a tm x tn tile of y and both of its accumulators (2 x tm x tn), each x[i, k] feeding
both; the epilogue runs right after the tile, so the [2, m, f] projection stays tile-sized.
"""

from __future__ import annotations

from cost_model import dtype_bytes, gemm_tile_features
from shapetune.ops import opdef

from .base import Template, register
from .gemm_llvm import _try


class GegluLLVM(Template):
    name = "geglu_llvm"
    ops = ("geglu",)
    kinds = ("llvm",)
    knob_choices = {
        "tm": (2, 4, 8, 16),
        "tn": (4, 8, 16, 32, 64),
        "tk": (4, 16, 64, 256),
        "unroll_k": (False, True),
    }

    def valid(self, workload, target, knobs):
        d = workload.dim
        as_linear = dict(d, n=d["f"])
        unroll_ok = not knobs["unroll_k"] or 2 * knobs["tm"] * knobs["tk"] <= 64
        return (knobs["tm"] <= max(2, as_linear["m"]) and knobs["tn"] <= max(4, as_linear["n"])
                and knobs["tk"] <= max(4, d["k"]) and knobs["tm"] * knobs["tn"] <= 512 and unroll_ok)

    def apply(self, workload, target, candidate):
        import tvm
        from tvm import s_tir

        kn = candidate.knob
        sch = s_tir.Schedule(tvm.IRModule({"main": opdef(workload.op).prim_func(workload)}))
        # The gated epilogue reads both halves, so it cannot be moved under the GEMM's loops
        # (reverse_compute_at needs one producer element per output): tile y, and compute each
        # tile's two accumulators under it instead.
        y = sch.get_sblock("y")
        mm = sch.get_sblock("matmul")
        i, j = sch.get_loops(y)
        io, ii = sch.split(i, [None, kn["tm"]])
        jo, ji = sch.split(j, [None, kn["tn"]])
        sch.reorder(io, jo, ii, ji)
        if workload.ranges:
            # Symbolic m: TVM 0.27's compute_at overflows int32 bounds here, so the GEMM gets its
            # own tiling and the epilogue stays a separate pass over the [2, m, f] projection.
            sch.parallel(sch.fuse(io, jo))
            s, mi, mj, k = sch.get_loops(mm)
            mio, mi = sch.split(mi, [None, kn["tm"]])
            mjo, mj = sch.split(mj, [None, kn["tn"]])
            ko, ki = sch.split(k, [None, kn["tk"]])
            sch.reorder(mio, mjo, ko, ki, s, mi, mj)
            sch.parallel(sch.fuse(mio, mjo))
        else:
            sch.compute_at(mm, jo, preserve_unit_loops=True)
            s, mi, mj, k = sch.get_loops(mm)[-4:]
            ko, ki = sch.split(k, [None, kn["tk"]])
            sch.reorder(ko, ki, s, mi, mj)  # each x[i, k] feeds both halves
            sch.parallel(sch.fuse(io, jo))
        init = sch.decompose_reduction(mm, ko)
        d = workload.dim
        if not workload.ranges and d["m"] % kn["tm"] == 0 and d["f"] % kn["tn"] == 0 and d["k"] % kn["tk"] == 0:
            for loop in (sch.get_loops(init)[-1], mj, ji):
                _try(sch.vectorize, loop)
        if kn["unroll_k"]:
            sch.unroll(ki)
        sch.unroll(s)
        sch.unroll(mi)
        return sch.mod

    def features(self, workload, target, knobs):
        d = workload.dim
        return gemm_tile_features(d["m"], 2 * d["f"], d["k"], knobs["tm"], 2 * knobs["tn"], knobs["tk"],
                                  target.num_cores, dtype_bytes(workload.dtype))


register(GegluLLVM())
