"""Compute definitions (TVM TE -> PrimFunc) and PyTorch references, one pair per op family.

The PrimFunc's parameter order is the kernel's calling convention: inputs first, output last
(destination-passing style), matching what the registry passes at run time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from shapetune.workload import Workload

TORCH_DTYPE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
               "float64": torch.float64}


# -- linear: y[m, n] = epilogue(sum_k x[m, k] * w[n, k])  ------------------------------------------
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
    """float64 on the CPU: the ground truth every candidate is checked against."""
    x, wt, *rest = (t.detach().to("cpu", torch.float64) for t in inputs)
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


# -- table -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VendorPath:
    """A vendor call that takes its operands in another layout than the op's calling convention
    (e.g. NCHW-contiguous where the op is channels-last): prepare(inputs) -> operands in that
    layout, run(*operands) -> output in that layout, restore(output) -> the op's layout. The runner
    times `run` only; calling the object does all three (inputs and output in the op's layout)."""

    prepare: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    run: Callable[..., torch.Tensor]
    restore: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.restore(self.run(*self.prepare(list(inputs))))


class OpDef:
    """What the tuner, runner and registry need to know about one op family.

    prim_func(w) -> TIR PrimFunc (inputs..., output); inputs(w, device, generator) -> fresh random
    operands; output(w, device) -> empty output; reference(w, inputs) -> float64 truth on the CPU;
    vendor(w) -> callable(*inputs) -> output, torch's own implementation as models call it, on the
    op's own layout (the default baseline, named vendor_name); vendor_variants[v](w) -> a VendorPath,
    another way torch runs the op that a model may pay instead (e.g. group_norm's "nchw"), named
    baseline_name(v). The runner measures the default as scheduler.runner.VENDOR and variant v as
    vendor_artifact(v), both verified against the reference.
    """

    def __init__(self, prim_func, inputs, output, reference, vendor, vendor_name,
                 vendor_variants: dict[str, Callable[[Workload], VendorPath]] | None = None):
        self.prim_func = prim_func
        self.inputs = inputs
        self.output = output
        self.reference = reference
        self.vendor = vendor
        self.vendor_name = vendor_name
        self.vendor_variants = dict(vendor_variants or {})

    def baseline_name(self, variant: str = "") -> str:
        """vendor_name for the default vendor path, "vendor_name[variant]" for a variant."""
        if variant and variant not in self.vendor_variants:
            raise ValueError(f"{self.vendor_name} has no vendor variant {variant!r}; "
                             f"known: {sorted(self.vendor_variants)}")
        return f"{self.vendor_name}[{variant}]" if variant else self.vendor_name


OPS: dict[str, OpDef] = {}


def register_op(name: str, op: OpDef) -> OpDef:
    OPS[name] = op
    return op


register_op("linear", OpDef(linear_prim_func, linear_inputs, linear_output, linear_reference, linear_vendor,
                            "torch.nn.functional.linear"))


def _load_families():
    """Import every kernels/defs_<family>.py: each registers its ops on import."""
    import importlib
    import pkgutil

    import kernels

    for m in pkgutil.iter_modules(kernels.__path__):
        if m.name.startswith("defs_"):
            importlib.import_module(f"kernels.{m.name}")


def opdef(op: str) -> OpDef:
    if op not in OPS:
        _load_families()
    try:
        return OPS[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}; known: {sorted(OPS)}") from None
