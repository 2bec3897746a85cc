"""Op definitions: what every floor above needs to know about one op family, one file per family.

    shapetune/ops/<family>.py   linear (+ the fused linear epilogues), geglu, norm (group_norm,
                                layer_norm), conv (conv2d), attention, elementwise
                                (gelu_gate, bias_add: the passes between the big ops)

Each family file holds, for its ops:
  - the workload constructor from the op's call arguments (`conv2d_workload(n, h, w, ...)`),
  - the compute definition (TVM TE -> PrimFunc), whose parameter order is the kernel's calling
    convention: inputs first, output last (destination-passing style), as the registry passes them,
  - fresh random inputs, the empty output, the float64 reference, torch's own path as models call it
    (the vendor baseline) and its variants, and the useful flops: one frozen `OpDef`,
  - the rule that maps a module and its call to workloads (`ModuleRule`), read by both
    scheduler.extract (which extracts what a model runs) and kernels.patch (which serves it).

This package imports torch but not TVM (compute definitions import it when called), and nothing above
the ground floor: build and measure workers load op definitions without the custom ops.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from shapetune.workload import Workload

TORCH_DTYPE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
               "float64": torch.float64}
SUPPORTED = {torch.float16: "float16", torch.float32: "float32"}  # torch dtype -> workload dtype served


def f64(inputs) -> tuple[torch.Tensor, ...]:
    """The operands in float64 where they are: a reference is computed on the device of its inputs (the
    GPU in a tuning run, where a bucket's largest members, 10^7-10^8 elements, took seconds each
    on the CPU) and returned there. float64 on either device: the same ground truth."""
    return tuple(t.detach().to(torch.float64) for t in inputs)


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


@dataclass(frozen=True)
class OpDef:
    """What the tuner, runner and registry need to know about one op.

    prim_func(w) -> TIR PrimFunc (inputs..., output); inputs(w, device, generator) -> fresh random
    operands; output(w, device) -> empty output; reference(w, inputs) -> float64 truth, computed and returned where the inputs are (f64);
    vendor(w) -> callable(*inputs) -> output, torch's own implementation as models call it, on the
    op's own layout (the default baseline, named vendor_name); vendor_variants[v](w) -> a VendorPath,
    another way torch runs the op that a model may pay instead (e.g. group_norm's "nchw"), named
    baseline_name(v). The runner measures the default as scheduler.runner.VENDOR and variant v as
    vendor_artifact(v), both verified against the reference. flops(w) -> useful flops (None for
    memory-bound ops, judged by bytes: scheduler.runner.min_traffic_bytes). version: of the compute
    definition; bump it when a change alters what prim_func computes or how (every template's kernels
    for the op then change): the op's records are re-verified and re-timed, never served as measured
    (shapetune.records.version_of, scheduler.reverify).
    """

    prim_func: Callable
    inputs: Callable
    output: Callable
    reference: Callable
    vendor: Callable
    vendor_name: str
    vendor_variants: Mapping[str, Callable[[Workload], VendorPath]] = field(default_factory=dict)
    flops: Callable[[Workload], float] | None = None
    version: int = 1

    def __post_init__(self):
        object.__setattr__(self, "vendor_variants", MappingProxyType(dict(self.vendor_variants)))

    def baseline_name(self, variant: str = "") -> str:
        """vendor_name for the default vendor path, "vendor_name[variant]" for a variant."""
        if variant and variant not in self.vendor_variants:
            raise ValueError(f"{self.vendor_name} has no vendor variant {variant!r}; "
                             f"known: {sorted(self.vendor_variants)}")
        return f"{self.vendor_name}[{variant}]" if variant else self.vendor_name


@dataclass(frozen=True)
class ModuleRule:
    """How one module type maps to an op family's workloads: the rule scheduler.extract records calls
    with and kernels.patch patches by (kernels.patch.REPLACEMENTS gives the replacement per kind).

    kind : the patch kind ("linear", "conv2d", "group_norm", "layer_norm", "geglu", "attention")
    module_type : () -> the module class, or None where its library is absent (diffusers types are
        imported on first use, not with `import shapetune`)
    unsupported : module -> why this instance is not served (a "kind: reason" string), or None
    workloads : (module, args, kwargs, dtype) -> the workloads of one call of a supported instance
    subclasses : the rule also covers subclasses (it reads attributes only, and the replacement
        keeps the class's own behaviour where it does not apply); else exact type only
    """

    kind: str
    module_type: Callable[[], type | None]
    unsupported: Callable[[torch.nn.Module], str | None]
    workloads: Callable[[torch.nn.Module, tuple, dict, str], list[Workload]]
    subclasses: bool = False


def call_arg(args: tuple, kwargs: dict, i: int, name: str, default=None):
    """Argument i of a module call, positional or by keyword."""
    return args[i] if len(args) > i else kwargs.get(name, default)


OPS: dict[str, OpDef] = {}


def register_op(name: str, op: OpDef) -> OpDef:
    OPS[name] = op
    return op


MODULE_RULES: list[ModuleRule] = []


def register_module_rule(rule: ModuleRule) -> ModuleRule:
    MODULE_RULES.append(rule)
    return rule


_FAMILIES = ("linear", "geglu", "norm", "conv", "attention", "elementwise")


def _load_families():
    """Import every family file: each registers its ops and module rules on import."""
    import importlib

    for f in _FAMILIES:
        importlib.import_module(f"shapetune.ops.{f}")


def module_rules() -> dict[type, ModuleRule]:
    """{module class: its rule} of every family whose module's library is importable."""
    _load_families()
    out = {}
    for r in MODULE_RULES:
        t = r.module_type()
        if t is not None:
            out[t] = r
    return out


def by_type(table: dict, module: torch.nn.Module, covers_subclasses: Callable[[object], bool]):
    """table's entry for module's exact type, else for its nearest base class in the table if that
    entry covers subclasses (covers_subclasses(entry)); None otherwise."""
    v = table.get(type(module))
    if v is not None:
        return v
    for cls in type(module).__mro__[1:]:
        v = table.get(cls)
        if v is not None:
            return v if covers_subclasses(v) else None
    return None


def rule_for(module: torch.nn.Module, rules: dict[type, ModuleRule] | None = None) -> ModuleRule | None:
    """The rule that covers this module: its exact type's, else the nearest base class's that covers
    subclasses; None if none does."""
    return by_type(module_rules() if rules is None else rules, module, lambda r: r.subclasses)


def known_ops() -> frozenset[str]:
    """The name of every op this shapetune defines."""
    _load_families()
    return frozenset(OPS)


def opdef(op: str) -> OpDef:
    if op not in OPS:
        _load_families()
    try:
        return OPS[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}; known: {sorted(OPS)}") from None
