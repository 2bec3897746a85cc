"""conv2d on channels-last activations: an implicit GEMM over (n, ho, wo) x co x (kh, kw, ci).

  y[n, ho, wo, co] = cast(epilogue(sum_{kh, kw, ci} xp[n, ho*s + kh, wo*s + kw, ci] * w[co, kh, kw, ci]))
  xp = x zero-padded by p on both sides of h and w;  Ho = (H + 2p - KH) // s + 1 (likewise Wo)

Layouts: x [N, H, W, Ci] (NHWC: the memory of a channels_last NCHW tensor), w [Co, KH, KW, Ci]
(OHWI: K = KH*KW*Ci contiguous per output channel, like linear's w[n, k]), y [N, Ho, Wo, Co].
Stride and padding are compile-time constants and part of the workload key, in `layout`
("nhwc ohwi s2 p1"). Dilation 1, groups 1.
Epilogue steps, in order, on the fp32 accumulator: "bias" + b[co]; "residual" + r[n, ho, wo, co]
(extra inputs after x and w in that order). The result is cast to the output dtype once.
Calling convention (destination-passing): (x, w[, b][, r], y).

Dynamic dims (shapetune/buckets.py): the batch n, on the BATCH edges (1, 2, 3-4, 5-8, ...): the
implicit GEMM's rows M = n*Ho*Wo stay symbolic (the row -> (n, ho, wo) index arithmetic divides by
the constant Ho*Wo), so one kernel serves batch 3 and 4, and since every image is >= 64 rows at
SD's smallest level, the tile and wave choice barely moves inside a bucket. Spatial h and w stay
exact: they are compile-time constants of the im2col index arithmetic and the padding predicate
(bucketing them needs predicated edges on both spatial dims), and a pipeline runs a handful of
resolutions, each worth its own record.
"""

from __future__ import annotations

import re

import torch

from shapetune.workload import Workload

from . import TORCH_DTYPE, f64, ModuleRule, OpDef, call_arg, register_module_rule, register_op

CONV_EPILOGUE_STEPS = ("bias", "residual")


def conv2d_workload(n: int, h: int, w: int, ci: int, co: int, kh: int = 3, kw: int = 3, stride: int = 1,
                    padding: int = 1, dtype: str = "float16", bias: bool = True,
                    residual: bool = False, n_range: tuple[int, int] | None = None) -> Workload:
    """conv2d of x[n, h, w, ci] by w[co, kh, kw, ci] (stride, padding), + b[co], + r[n, ho, wo, co];
    n_range makes the batch dynamic (h and w stay exact: the module docstring says why)."""
    epi = (("bias",) if bias else ()) + (("residual",) if residual else ())
    wl = Workload(
        op="conv2d",
        dims=(("n", n), ("h", h), ("w", w), ("ci", ci), ("co", co), ("kh", kh), ("kw", kw)),
        dtype=dtype,
        acc_dtype="float32" if dtype in ("float16", "bfloat16", "float32") else dtype,
        layout=f"nhwc ohwi s{int(stride)} p{int(padding)}",
        epilogue=epi,
        dynamic=(("n", *n_range),) if n_range else (),
    )
    out_hw(wl)  # validates
    return wl


def stride_padding(wl: Workload) -> tuple[int, int]:
    m = re.fullmatch(r"nhwc ohwi s(\d+) p(\d+)", wl.layout)
    if not m:
        raise ValueError(f"{wl.name}: conv2d layout {wl.layout!r} is not 'nhwc ohwi s<stride> p<padding>'")
    return int(m.group(1)), int(m.group(2))


def out_hw(wl: Workload) -> tuple[int, int]:
    d = wl.dim
    s, p = stride_padding(wl)
    ho, wo = (d["h"] + 2 * p - d["kh"]) // s + 1, (d["w"] + 2 * p - d["kw"]) // s + 1
    if s < 1 or ho < 1 or wo < 1:
        raise ValueError(f"{wl.name}: empty output ({ho}x{wo})")
    return ho, wo


def gemm_dims(wl: Workload) -> tuple[int, int, int]:
    """(M, N, K) of the implicit GEMM: N*Ho*Wo, Co, KH*KW*Ci."""
    d = wl.dim
    ho, wo = out_hw(wl)
    return d["n"] * ho * wo, d["co"], d["kh"] * d["kw"] * d["ci"]


def conv2d_flops(wl: Workload) -> float:
    m, n, k = gemm_dims(wl)
    return 2.0 * m * n * k


def _check_epilogue(epi):
    if epi not in ((), ("bias",), ("residual",), ("bias", "residual")):
        raise ValueError(f"conv2d epilogue {epi!r}: a subsequence of {CONV_EPILOGUE_STEPS}")


# -- TE definition --------------------------------------------------------------------------------
def conv2d_prim_func(wl: Workload):
    from tvm import te, tirx

    _check_epilogue(wl.epilogue)
    d = wl.dim
    n, h, w_, ci, co, kh, kw = (d[k] for k in ("n", "h", "w", "ci", "co", "kh", "kw"))
    if "n" in wl.ranges:
        n = te.var("n")
    s, p = stride_padding(wl)
    ho, wo = out_hw(wl)
    acc = wl.acc_dtype
    x = te.placeholder((n, h, w_, ci), wl.dtype, name="x")
    wt = te.placeholder((co, kh, kw, ci), wl.dtype, name="w")
    if p:
        xp = te.compute(
            (n, h + 2 * p, w_ + 2 * p, ci),
            lambda b, i, j, c: tirx.if_then_else(
                tirx.all(i >= p, i < h + p, j >= p, j < w_ + p), x[b, i - p, j - p, c],
                tirx.const(0, wl.dtype)),
            name="pad")
    else:
        xp = x
    rh = te.reduce_axis((0, kh), name="rh")
    rw = te.reduce_axis((0, kw), name="rw")
    rc = te.reduce_axis((0, ci), name="rc")
    out = te.compute(
        (n, ho, wo, co),
        lambda b, i, j, c: te.sum(xp[b, i * s + rh, j * s + rw, rc].astype(acc) * wt[c, rh, rw, rc].astype(acc),
                                  axis=[rh, rw, rc]),
        name="conv")
    args = [x, wt]
    for step in wl.epilogue:  # one elementwise block per step; the templates inline them all
        prev = out
        if step == "bias":
            b_ = te.placeholder((co,), wl.dtype, name="b")
            args.append(b_)
            out = te.compute((n, ho, wo, co), lambda b, i, j, c: prev[b, i, j, c] + b_[c].astype(acc),
                             name="bias_add")
        else:
            r = te.placeholder((n, ho, wo, co), wl.dtype, name="r")
            args.append(r)
            out = te.compute((n, ho, wo, co), lambda b, i, j, c: prev[b, i, j, c] + r[b, i, j, c].astype(acc),
                             name="residual_add")
    final = out
    y = te.compute((n, ho, wo, co), lambda b, i, j, c: final[b, i, j, c].astype(wl.dtype), name="y")
    return te.create_prim_func(args + [y]).with_attr("global_symbol", "main")


# -- operands, reference, vendor ------------------------------------------------------------------
def conv2d_inputs(wl: Workload, device, generator: torch.Generator) -> list[torch.Tensor]:
    """x [N, H, W, Ci], w [Co, KH, KW, Ci] scaled by 1/sqrt(K) (outputs O(1)), b [Co], r [N, Ho, Wo, Co]."""
    d = wl.dim
    ho, wo = out_hw(wl)
    gd = generator.device
    k = d["kh"] * d["kw"] * d["ci"]
    out = [torch.randn(d["n"], d["h"], d["w"], d["ci"], generator=generator, device=gd),
           torch.randn(d["co"], d["kh"], d["kw"], d["ci"], generator=generator, device=gd) / k ** 0.5]
    for step in wl.epilogue:
        shape = (d["co"],) if step == "bias" else (d["n"], ho, wo, d["co"])
        out.append(torch.randn(*shape, generator=generator, device=gd))
    return [t.to(device=device, dtype=TORCH_DTYPE[wl.dtype]) for t in out]


def conv2d_output(wl: Workload, device) -> torch.Tensor:
    d = wl.dim
    ho, wo = out_hw(wl)
    return torch.empty(d["n"], ho, wo, d["co"], device=device, dtype=TORCH_DTYPE[wl.dtype])


def _nchw(t: torch.Tensor) -> torch.Tensor:
    """The NCHW view of an NHWC (or OHWI) tensor: channels_last memory, no copy."""
    return t.permute(0, 3, 1, 2)


def conv2d_reference(wl: Workload, inputs: list[torch.Tensor]) -> torch.Tensor:
    """float64 where the inputs are, through F.conv2d on NCHW; returned as [N, Ho, Wo, Co]."""
    s, p = stride_padding(wl)
    x, wt, *rest = f64(inputs)
    extra = iter(rest)
    b = next(extra) if "bias" in wl.epilogue else None
    y = torch.nn.functional.conv2d(_nchw(x).contiguous(), _nchw(wt).contiguous(), b, s, p)
    if "residual" in wl.epilogue:
        y = y + _nchw(next(extra))
    return y.permute(0, 2, 3, 1)


def conv2d_vendor(wl: Workload):
    """torch as a channels_last model runs it: F.conv2d on the NCHW views of the NHWC/OHWI operands
    (channels_last memory, so cuDNN needs no layout transposes; torch adds the bias in a broadcast
    kernel of its own after cuDNN's), then `+ r` as a separate op. Returns the NHWC view of its
    channels_last output."""
    s, p = stride_padding(wl)
    epi = wl.epilogue

    def run(x, wt, *extra):
        extra = list(extra)
        y = torch.nn.functional.conv2d(_nchw(x), _nchw(wt), extra.pop(0) if "bias" in epi else None, s, p)
        if "residual" in epi:
            y = y + _nchw(extra.pop(0))
        return y.permute(0, 2, 3, 1)

    return run


register_op("conv2d", OpDef(conv2d_prim_func, conv2d_inputs, conv2d_output, conv2d_reference, conv2d_vendor,
                            "torch.nn.functional.conv2d (channels_last)", flops=conv2d_flops))


# -- module rule: nn.Conv2d -------------------------------------------------------------------------
def conv2d_unsupported(module: torch.nn.Conv2d) -> str | None:
    """Square stride and padding, dilation 1, groups 1, zero padding only."""
    pad = module.padding
    if (module.groups != 1 or tuple(module.dilation) != (1, 1) or module.stride[0] != module.stride[1]
            or isinstance(pad, str) or pad[0] != pad[1] or module.padding_mode != "zeros"):
        return "conv2d: grouped/dilated/non-square/non-zero padding"
    return None


def conv2d_module_workloads(module: torch.nn.Conv2d, args: tuple, kwargs: dict, dtype: str) -> list[Workload]:
    """x [N, Ci, H, W] -> conv2d(n, h, w, ci, co, kh, kw, stride, padding), channels-last; a residual
    added after it is a fusion (shapetune.fusions), applied by the caller."""
    x = call_arg(args, kwargs, 0, "input")
    if x.dim() != 4:
        return []
    n, ci, h, w = x.shape
    co, _, kh, kw = module.weight.shape
    return [conv2d_workload(n, h, w, ci, co, kh, kw, module.stride[0], module.padding[0], dtype,
                            module.bias is not None)]


register_module_rule(ModuleRule("conv2d", lambda: torch.nn.Conv2d, conv2d_unsupported, conv2d_module_workloads))
