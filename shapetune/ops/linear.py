"""linear: y[m, n] = epilogue(x[m, k] · w[n, k]ᵀ), the GEMM of nn.Linear, and its fused epilogues
(bias, exact gelu, + residual) that kernels.linear_gelu / linear_residual serve."""

from __future__ import annotations

import math

import torch

from shapetune.workload import Workload, acc_dtype

from . import TORCH_DTYPE, f64, ModuleRule, OpDef, call_arg, register_module_rule, register_op


def linear_workload(m: int, n: int, k: int, dtype: str = "float16", bias: bool = True,
                    m_range: tuple[int, int] | None = None,
                    epilogue: tuple[str, ...] | None = None) -> Workload:
    """y[m, n] = x[m, k] @ w[n, k]^T (+ b[n]); fp16 accumulates in fp32. m_range makes m dynamic.

    epilogue, when given, replaces the one `bias` implies, e.g. ("bias", "gelu") or
    ("bias", "residual") (LINEAR_EPILOGUE_STEPS).
    """
    return Workload(
        op="linear",
        dims=(("m", m), ("n", n), ("k", k)),
        dtype=dtype,
        acc_dtype=acc_dtype(dtype),
        layout="x[m,k] w[n,k] -> y[m,n]",
        epilogue=tuple(epilogue) if epilogue is not None else (("bias",) if bias else ()),
        dynamic=(("m", *m_range),) if m_range else (),
    )


# -- compute definition: y[m, n] = epilogue(sum_k x[m, k] * w[n, k])  ------------------------------------------
# Epilogue steps, applied in order to the fp32 accumulator (each at most once):
#   "bias"      + b[n]
#   "gelu"      exact GELU, 0.5 v (1 + erf(v / sqrt 2)) (torch's default approximate="none")
#   "residual"  + r[m, n]  (an extra input of the output's dtype)
# Extra inputs follow x and w in epilogue order. The result is cast to the output dtype once.
LINEAR_EPILOGUE_STEPS = ("bias", "gelu", "residual")
_EPI_BLOCK = {"bias": "bias_add", "gelu": "gelu", "residual": "residual_add"}


def check_linear_epilogue(epilogue: tuple[str, ...]) -> None:
    bad = [e for e in epilogue if e not in LINEAR_EPILOGUE_STEPS]
    if bad or len(set(epilogue)) != len(epilogue):
        raise ValueError(f"linear epilogue {epilogue!r}: steps must be distinct, from {LINEAR_EPILOGUE_STEPS}")


def te_gelu(v, dtype: str):
    """Exact GELU of a TE expression of type dtype (erf form, as torch.nn.functional.gelu)."""
    from tvm import te

    c = lambda x: te.const(x, dtype)  # noqa: E731
    return c(0.5) * v * (c(1.0) + te.erf(v * c(0.7071067811865476)))


def linear_prim_func(w: Workload):
    from tvm import te

    check_linear_epilogue(w.epilogue)
    d = w.dim
    m, n, k = d["m"], d["n"], d["k"]
    if "m" in w.ranges:
        m = te.var("m")  # one kernel for every m in the bucket: buffers take their size at call time
    x = te.placeholder((m, k), w.dtype, name="x")
    wt = te.placeholder((n, k), w.dtype, name="w")
    r = te.reduce_axis((0, k), name="r")
    acc = te.compute(
        (m, n),
        lambda i, j: te.sum(x[i, r].astype(w.acc_dtype) * wt[j, r].astype(w.acc_dtype), axis=r),
        name="matmul",
    )
    args = [x, wt]
    out = acc
    for step in w.epilogue:  # one elementwise block per step; the templates inline them all
        prev = out
        if step == "bias":
            b = te.placeholder((n,), w.dtype, name="b")
            args.append(b)
            out = te.compute((m, n), lambda i, j: prev[i, j] + b[j].astype(w.acc_dtype), name="bias_add")
        elif step == "gelu":
            out = te.compute((m, n), lambda i, j: te_gelu(prev[i, j], w.acc_dtype), name="gelu")
        else:
            res = te.placeholder((m, n), w.dtype, name="r")
            args.append(res)
            out = te.compute((m, n), lambda i, j: prev[i, j] + res[i, j].astype(w.acc_dtype),
                             name="residual_add")
    final = out
    y = te.compute((m, n), lambda i, j: final[i, j].astype(w.dtype), name="y")
    return te.create_prim_func(args + [y]).with_attr("global_symbol", "main")


def linear_inputs(w: Workload, device, generator: torch.Generator) -> list[torch.Tensor]:
    """Fresh random operands, scaled so that outputs are O(1) whatever k is."""
    d = w.dim
    dt = TORCH_DTYPE[w.dtype]
    gd = generator.device
    x = torch.randn(d["m"], d["k"], generator=generator, device=gd, dtype=torch.float32)
    wt = torch.randn(d["n"], d["k"], generator=generator, device=gd, dtype=torch.float32) / d["k"] ** 0.5
    out = [x, wt]
    for step in w.epilogue:
        if step == "bias":
            out.append(torch.randn(d["n"], generator=generator, device=gd, dtype=torch.float32))
        elif step == "residual":
            out.append(torch.randn(d["m"], d["n"], generator=generator, device=gd, dtype=torch.float32))
    return [t.to(device=device, dtype=dt) for t in out]


def linear_output(w: Workload, device) -> torch.Tensor:
    d = w.dim
    return torch.empty(d["m"], d["n"], device=device, dtype=TORCH_DTYPE[w.dtype])


def linear_reference(w: Workload, inputs: list[torch.Tensor]) -> torch.Tensor:
    """float64 where the inputs are: the ground truth every candidate is checked against."""
    x, wt, *rest = f64(inputs)
    y = x @ wt.T
    extra = iter(rest)
    for step in w.epilogue:
        y = torch.nn.functional.gelu(y) if step == "gelu" else y + next(extra)
    return y


def linear_vendor(w: Workload):
    """torch's own op, exactly as models call it: F.linear (cuBLAS/cuBLASLt with the bias fused
    on the GPU, oneDNN/MKL on the CPU), then F.gelu / `+ r` as separate ops. Returns its output
    instead of writing a given buffer: an `out=` variant takes other code paths (addmm copies the
    bias into out first) and would time something no model runs."""
    epi = w.epilogue
    if epi in (("bias",), ()):
        def run(x, wt, *bias):
            return torch.nn.functional.linear(x, wt, bias[0] if bias else None)

        return run

    def run_epilogue(x, wt, *extra):
        extra = list(extra)
        y = torch.nn.functional.linear(x, wt, extra.pop(0) if epi[0] == "bias" else None)
        for step in epi[1:] if epi[0] == "bias" else epi:
            y = torch.nn.functional.gelu(y) if step == "gelu" else y + extra.pop(0)
        return y

    return run_epilogue



def linear_flops(w: Workload) -> float:
    d = w.dim
    return 2.0 * d["m"] * d["n"] * d["k"]


register_op("linear", OpDef(linear_prim_func, linear_inputs, linear_output, linear_reference, linear_vendor,
                            "torch.nn.functional.linear", flops=linear_flops))



# -- module rule: nn.Linear -------------------------------------------------------------------------
def linear_module_workloads(module: torch.nn.Linear, args: tuple, kwargs: dict, dtype: str) -> list[Workload]:
    """y = x @ W^T (+ b): m = product of x's leading dims, n = out_features, k = in_features."""
    x = call_arg(args, kwargs, 0, "input")
    return [linear_workload(math.prod(x.shape[:-1]), module.out_features, module.in_features, dtype,
                            module.bias is not None)]


register_module_rule(ModuleRule("linear", lambda: torch.nn.Linear, lambda m: None, linear_module_workloads))
