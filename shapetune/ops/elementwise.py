"""Elementwise ops between the big ones (memory-bound): what torch runs as separate kernels after a
vendor GEMM or convolution, as one pass each.

gelu_gate  diffusers GEGLU's activation on the projection p = x·Wᵀ + b that cuBLAS wrote, seen as
           p[m, 2, f] (the same memory as [m, 2f]: half 0 is h, half 1 the gate):
             y[m, f] = p[m, 0, :] * gelu(p[m, 1, :])               (exact erf GELU, in fp32)
           torch runs F.gelu on the strided gate and a multiply: two kernels, 5 passes of [m, f];
           this reads p once and writes y once (3 passes).
bias_add   a convolution's bias and what diffusers adds to the conv's output, on the NHWC memory
           of a channels_last tensor x[n, hw, c] (cuDNN's output without its bias):
             y = x + b[c]                      epilogue ()
             y = x + b[c] + r[n, hw, c]        epilogue ("residual",): ResnetBlock2D.conv2 + shortcut,
                                               Transformer2DModel proj_out + input
             y = x + b[c] + t[n, c]            epilogue ("shift",): ResnetBlock2D.conv1 + time embedding
           torch adds a conv's bias in a broadcast kernel of its own after cuDNN's (not vectorized on
           channels_last), then the residual / time embedding in another: one pass instead of two,
           sums in fp32, rounded once.

Dynamic dims (shapetune/buckets.py): gelu_gate m; bias_add n and hw. Channels (f, c) stay exact: they
come from the weights. Calling conventions (destination-passing): gelu_gate (p[m, 2, f], y[m, f]);
bias_add (x, b[, r | t], y). Elementwise with the same index in and out, so y may be x itself
(the conv path writes its sum in place).
"""

from __future__ import annotations

import torch

from shapetune.workload import Workload

from . import TORCH_DTYPE, f64, OpDef, register_op
from .linear import te_gelu

BIAS_ADD_EPILOGUES = ((), ("residual",), ("shift",))


def _acc(dtype: str) -> str:
    return "float32" if dtype in ("float16", "bfloat16", "float32") else dtype


def gelu_gate_workload(m: int, f: int, dtype: str = "float16", m_range: tuple[int, int] | None = None) -> Workload:
    """y[m, f] = p[m, :f] * gelu(p[m, f:]) of a GEGLU projection p[m, 2f]; m_range makes m dynamic."""
    return Workload(op="gelu_gate", dims=(("m", m), ("f", f)), dtype=dtype, acc_dtype=_acc(dtype),
                    layout="p[m,2,f] -> y[m,f]", dynamic=(("m", *m_range),) if m_range else ())


def bias_add_workload(n: int, hw: int, c: int, dtype: str = "float16", epilogue: tuple[str, ...] = (),
                      n_range: tuple[int, int] | None = None,
                      hw_range: tuple[int, int] | None = None) -> Workload:
    """y[n, hw, c] = x + b[c] (+ r[n, hw, c] | + t[n, c]) on NHWC memory; ranges make n / hw dynamic."""
    epilogue = tuple(epilogue)
    if epilogue not in BIAS_ADD_EPILOGUES:
        raise ValueError(f"bias_add epilogue {epilogue!r}: one of {BIAS_ADD_EPILOGUES}")
    dynamic = ((("n", *n_range),) if n_range else ()) + ((("hw", *hw_range),) if hw_range else ())
    return Workload(op="bias_add", dims=(("n", n), ("hw", hw), ("c", c)), dtype=dtype, acc_dtype=_acc(dtype),
                    layout="x[n,hw,c] b[c] nhwc", epilogue=epilogue, dynamic=dynamic)


# -- TE definitions ------------------------------------------------------------------------------
def gelu_gate_prim_func(w: Workload):
    from tvm import te

    m, f = w.dim["m"], w.dim["f"]
    if "m" in w.ranges:
        m = te.var("m")
    a = w.acc_dtype
    p = te.placeholder((m, 2, f), w.dtype, name="p")
    y = te.compute((m, f), lambda i, j: (p[i, 0, j].astype(a) * te_gelu(p[i, 1, j].astype(a), a)).astype(w.dtype),
                   name="y")
    return te.create_prim_func([p, y]).with_attr("global_symbol", "main")


def bias_add_prim_func(w: Workload):
    from tvm import te

    d = w.dim
    n = te.var("n") if "n" in w.ranges else d["n"]
    hw = te.var("hw") if "hw" in w.ranges else d["hw"]
    c = d["c"]
    a = w.acc_dtype
    x = te.placeholder((n, hw, c), w.dtype, name="x")
    b = te.placeholder((c,), w.dtype, name="b")
    args = [x, b]
    if w.epilogue == ("residual",):
        r = te.placeholder((n, hw, c), w.dtype, name="r")
        args.append(r)
        extra = lambda i, s, k: r[i, s, k].astype(a)  # noqa: E731
    elif w.epilogue == ("shift",):
        t = te.placeholder((n, c), w.dtype, name="t")
        args.append(t)
        extra = lambda i, s, k: t[i, k].astype(a)  # noqa: E731
    else:
        extra = None

    def body(i, s, k):
        v = x[i, s, k].astype(a) + b[k].astype(a)
        return (v + extra(i, s, k) if extra else v).astype(w.dtype)

    y = te.compute((n, hw, c), body, name="y")
    return te.create_prim_func(args + [y]).with_attr("global_symbol", "main")


# -- operands, references, vendor paths -----------------------------------------------------------
def _cast(ts, w: Workload, device) -> list[torch.Tensor]:
    return [t.to(device=device, dtype=TORCH_DTYPE[w.dtype]) for t in ts]


def gelu_gate_inputs(w: Workload, device, generator: torch.Generator) -> list[torch.Tensor]:
    """p ~ N(0, 1) [m, 2, f]: gates on both sides of GELU's bend."""
    d = w.dim
    return _cast([torch.randn(d["m"], 2, d["f"], generator=generator, device=generator.device)], w, device)


def gelu_gate_output(w: Workload, device) -> torch.Tensor:
    return torch.empty(w.dim["m"], w.dim["f"], device=device, dtype=TORCH_DTYPE[w.dtype])


def gelu_gate_reference(w: Workload, inputs: list[torch.Tensor]) -> torch.Tensor:
    """float64 where the inputs are, as diffusers' GEGLU.forward after its projection."""
    (p,) = f64(inputs[:1])
    return p[:, 0] * torch.nn.functional.gelu(p[:, 1])


def gelu_gate_vendor(w: Workload):
    """diffusers' GEGLU after F.linear: chunk (views), F.gelu on the strided gate, then the product."""

    def run(p):
        h, g = p.reshape(p.shape[0], -1).chunk(2, dim=-1)
        return h * torch.nn.functional.gelu(g)

    return run


def bias_add_inputs(w: Workload, device, generator: torch.Generator) -> list[torch.Tensor]:
    """x, r ~ N(0, 1) [n, hw, c]; b, t ~ N(0, 1) ([c], [n, c])."""
    d = w.dim
    gd = generator.device
    ts = [torch.randn(d["n"], d["hw"], d["c"], generator=generator, device=gd),
          torch.randn(d["c"], generator=generator, device=gd)]
    if w.epilogue == ("residual",):
        ts.append(torch.randn(d["n"], d["hw"], d["c"], generator=generator, device=gd))
    elif w.epilogue == ("shift",):
        ts.append(torch.randn(d["n"], d["c"], generator=generator, device=gd))
    return _cast(ts, w, device)


def bias_add_output(w: Workload, device) -> torch.Tensor:
    d = w.dim
    return torch.empty(d["n"], d["hw"], d["c"], device=device, dtype=TORCH_DTYPE[w.dtype])


def bias_add_reference(w: Workload, inputs: list[torch.Tensor]) -> torch.Tensor:
    x, b, *rest = f64(inputs)
    y = x + b
    if w.epilogue == ("residual",):
        y = y + rest[0]
    elif w.epilogue == ("shift",):
        y = y + rest[0][:, None, :]
    return y


def _nchw(t: torch.Tensor) -> torch.Tensor:
    """[n, hw, c] NHWC memory as the NCHW channels_last tensor [n, c, hw, 1] a model holds."""
    return t.permute(0, 2, 1).unsqueeze(-1)


def bias_add_vendor(w: Workload):
    """What a channels_last model pays after cuDNN: the conv's broadcast bias add (torch adds a conv
    bias in a kernel of its own), then `+ r` / `+ t[:, :, None, None]` as diffusers writes them, on the
    NCHW channels_last views."""
    epi = w.epilogue

    def run(x, b, *extra):
        y = _nchw(x) + b.view(1, -1, 1, 1)
        if epi == ("residual",):
            y = y + _nchw(extra[0])
        elif epi == ("shift",):
            y = y + extra[0][:, :, None, None]
        return y.squeeze(-1).permute(0, 2, 1)

    return run


register_op("gelu_gate", OpDef(gelu_gate_prim_func, gelu_gate_inputs, gelu_gate_output, gelu_gate_reference,
                               gelu_gate_vendor, "diffusers GEGLU after F.linear: h * F.gelu(g)"))
register_op("bias_add", OpDef(bias_add_prim_func, bias_add_inputs, bias_add_output, bias_add_reference,
                              bias_add_vendor, "torch conv bias add (+ residual | + time embedding)"))
