"""CUDA conv2d (NHWC x OHWI) as an implicit GEMM on tensor cores (WMMA 16x16x16, fp16 in, fp32 acc).

The conv block y[n, ho, wo, co] = sum_{kh, kw, ci} xp[n, ho*s + kh, wo*s + kw, ci] w[co, kh, kw, ci]
is rewritten (reindex + transform_layout + transform_block_layout) into the GEMM
C[m, co] = sum_k A[m, k] B[co, k] with m = (n*Ho + ho)*Wo + wo and k = (kh*KW + kw)*Ci + ci.
A is never materialized: its producers (the im2col gather and the zero padding) are inlined into
the global -> shared tile loads, B is w's free [Co, KH*KW*Ci] view. From there on the schedule is
gemm_cuda's (the same knobs, tiles, pipeline and fused epilogue: bias, residual, cast).
"""

from __future__ import annotations

from shapetune.ops import opdef
from shapetune.ops.conv import gemm_dims, out_hw

from .base import Template, register
from .gemm_cuda import GemmCudaWMMA, schedule_wmma_gemm, wmma_features


def to_gemm(sch, workload):
    """Rewrite the "conv" block of the conv2d PrimFunc into a three-loop GEMM block; returns it."""
    from tvm.tirx import IndexMap

    d = workload.dim
    ho, wo = out_hw(workload)
    kw, ci = d["kw"], d["ci"]
    blk = sch.get_sblock("conv")
    a = sch.reindex(blk, ("read", 0))  # [n, ho, wo, kh, kw, ci]: the im2col matrix
    b = sch.reindex(blk, ("read", 1))  # [co, kh, kw, ci]
    c = sch.reindex(blk, ("write", 0))  # [n, ho, wo, co]

    def gemm_index(v):
        """(row, col) of the GEMM from the conv's iteration variables by role (absent ones: 0)."""
        g = lambda r: v.get(r, 0)  # noqa: E731
        return (g("n") * ho + g("ho")) * wo + g("wo"), g("co"), (g("kh") * kw + g("kw")) * g("ci_n") + g("ci")

    # Which conv iterators index each reindexed buffer (extent-1 ones may be simplified away).
    block = sch.get(blk)
    role = dict(zip((iv.var for iv in block.iter_vars), ("n", "ho", "wo", "co", "kh", "kw", "ci")))
    roles = [[role[r.min] for r in acc.region] for acc in (block.reads[0], block.reads[1], block.writes[0])]

    def index_map(names, pick):
        def fn(*args):
            v = dict(zip(names, args), ci_n=ci)
            row, co, col = gemm_index(v)
            return [(row, col), (co, col), (row, co), (row, co, col)][pick]
        return IndexMap.from_func(fn, ndim=len(names), index_dtype="int32")

    sch.transform_layout(a, ("write", 0), index_map(roles[0], 0))
    sch.transform_layout(b, ("write", 0), index_map(roles[1], 1))
    sch.transform_layout(c, ("read", 0), index_map(roles[2], 2))
    sch.transform_block_layout(blk, index_map(["n", "ho", "wo", "co", "kh", "kw", "ci"], 3))
    return blk


class ConvCudaWMMA(Template):
    name = "conv_cuda_wmma"
    ops = ("conv2d",)
    kinds = ("cuda",)
    knob_choices = GemmCudaWMMA.knob_choices

    def applies(self, workload, target):
        return super().applies(workload, target) and workload.dtype == "float16"

    def valid(self, workload, target, kn):
        m, n, k = gemm_dims(workload)
        return GemmCudaWMMA.valid(self, _GemmView(m, n, k), target, kn)

    def apply(self, workload, target, candidate):
        import tvm
        from tvm import s_tir

        sch = s_tir.Schedule(tvm.IRModule({"main": opdef(workload.op).prim_func(workload)}))
        schedule_wmma_gemm(sch, to_gemm(sch, workload), candidate.knob)
        return sch.mod

    def features(self, workload, target, kn):
        m, n, k = gemm_dims(workload)
        f = wmma_features(workload, target, kn, m, n, k)
        f["im2col_reuse"] = float(workload.dim["kh"] * workload.dim["kw"])  # reads of each x element
        return f


class _GemmView:
    """What GemmCudaWMMA.valid reads of a workload: .dim with m, n, k."""

    def __init__(self, m, n, k):
        self.dim = {"m": m, "n": n, "k": k}


register(ConvCudaWMMA())
