"""geglu: diffusers' GEGLU (linear -> chunk -> h * gelu(g)) as one GEMM with a gated epilogue.

    h, g = (x[m, k] @ W[2f, k]^T + b[2f]).chunk(2, dim=-1)      (diffusers.models.activations.GEGLU)
    y[m, f] = h * gelu(g)                                         (exact erf GELU, torch's default)

The kernel sees W through its free view w[2, f, k] (w[0] = the h rows, w[1] = the gate rows) and b as
b[2, f], and computes acc[s, m, f] = x @ w[s]^T for both halves s in one reduction: the templates
tile (s, i, j) together, so a thread block holds h and g of the same output columns and the
[m, 2f] projection never reaches memory. Bias, GELU (fp32) and the product happen in the epilogue.
"""

from __future__ import annotations

import math

import torch

from shapetune.workload import Workload, acc_dtype

from . import TORCH_DTYPE, f64, ModuleRule, OpDef, call_arg, register_module_rule, register_op
from .linear import te_gelu


def geglu_workload(m: int, f: int, k: int, dtype: str = "float16",
                   m_range: tuple[int, int] | None = None) -> Workload:
    """diffusers' GEGLU: h, g = (x[m, k] @ W[2f, k]^T + b[2f]).chunk(2, -1); y[m, f] = h * gelu(g).

    The kernel takes W as its free view [2, f, k] and b as [2, f] (half 0: h, half 1: the gate)."""
    return Workload(
        op="geglu",
        dims=(("m", m), ("f", f), ("k", k)),
        dtype=dtype,
        acc_dtype=acc_dtype(dtype),
        layout="x[m,k] w[2,f,k] b[2,f] -> y[m,f]",
        epilogue=("bias", "gelu_gate"),
        dynamic=(("m", *m_range),) if m_range else (),
    )


def geglu_flops(w: Workload) -> float:
    """One GEMM with 2f outputs per row."""
    d = w.dim
    return 2.0 * d["m"] * 2 * d["f"] * d["k"]


def geglu_prim_func(w: Workload):
    from tvm import te

    d = w.dim
    m, f, k = d["m"], d["f"], d["k"]
    if "m" in w.ranges:
        m = te.var("m")
    x = te.placeholder((m, k), w.dtype, name="x")
    wt = te.placeholder((2, f, k), w.dtype, name="w")
    b = te.placeholder((2, f), w.dtype, name="b")
    r = te.reduce_axis((0, k), name="r")
    acc = te.compute(
        (2, m, f),
        lambda s, i, j: te.sum(x[i, r].astype(w.acc_dtype) * wt[s, j, r].astype(w.acc_dtype), axis=r),
        name="matmul",
    )
    a = w.acc_dtype

    def gated(i, j):
        h = acc[0, i, j] + b[0, j].astype(a)
        g = acc[1, i, j] + b[1, j].astype(a)
        return (h * te_gelu(g, a)).astype(w.dtype)

    y = te.compute((m, f), gated, name="y")
    return te.create_prim_func([x, wt, b, y]).with_attr("global_symbol", "main")


def geglu_inputs(w: Workload, device, generator: torch.Generator) -> list[torch.Tensor]:
    """x [m, k], w [2, f, k] (the view of diffusers' proj.weight [2f, k]), b [2, f]."""
    d = w.dim
    gd = generator.device
    x = torch.randn(d["m"], d["k"], generator=generator, device=gd)
    wt = torch.randn(2, d["f"], d["k"], generator=generator, device=gd) / d["k"] ** 0.5
    b = torch.randn(2, d["f"], generator=generator, device=gd)
    return [t.to(device=device, dtype=TORCH_DTYPE[w.dtype]) for t in (x, wt, b)]


def geglu_output(w: Workload, device) -> torch.Tensor:
    d = w.dim
    return torch.empty(d["m"], d["f"], device=device, dtype=TORCH_DTYPE[w.dtype])


def geglu_reference(w: Workload, inputs: list[torch.Tensor]) -> torch.Tensor:
    """float64 where the inputs are, written as diffusers' GEGLU.forward."""
    x, wt, b = f64(inputs)
    proj = torch.nn.functional.linear(x, wt.reshape(-1, wt.shape[-1]), b.reshape(-1))
    h, g = proj.chunk(2, dim=-1)
    return h * torch.nn.functional.gelu(g)


def geglu_vendor(w: Workload):
    """diffusers' unfused path: F.linear ([m, 2f] written to memory), chunk, h * F.gelu(g)."""

    def run(x, wt, b):
        h, g = torch.nn.functional.linear(x, wt.reshape(-1, wt.shape[-1]), b.reshape(-1)).chunk(2, dim=-1)
        return h * torch.nn.functional.gelu(g)

    return run


register_op("geglu", OpDef(geglu_prim_func, geglu_inputs, geglu_output, geglu_reference, geglu_vendor,
                           "diffusers GEGLU: F.linear + chunk + h * F.gelu(g)", flops=geglu_flops))


# -- module rule: diffusers GEGLU -------------------------------------------------------------------
def _geglu_type():
    try:
        from diffusers.models.activations import GEGLU
    except ImportError:  # pragma: no cover
        return None
    return GEGLU


def geglu_module_workloads(module, args: tuple, kwargs: dict, dtype: str) -> list[Workload]:
    """proj = Linear(dim_in, 2 * dim_out); y = h * gelu(g), (h, g) = proj(x).chunk(2):
    geglu(m = product of x's leading dims, f = dim_out, k = dim_in). Without a bias: nothing."""
    x = call_arg(args, kwargs, 0, "hidden_states")
    proj = module.proj
    if proj.bias is None or proj.out_features % 2:
        return []
    return [geglu_workload(math.prod(x.shape[:-1]), proj.out_features // 2, proj.in_features, dtype)]


register_module_rule(ModuleRule("geglu", _geglu_type, lambda m: None, geglu_module_workloads))
