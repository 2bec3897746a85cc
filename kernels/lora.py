"""PEFT LoRA Linear layers on the patched path (kernels.patch, `fuse_lora_add`): each adapter's scaled
low-rank delta accumulated into the base layer's output by the GEMM that computes it.

PEFT computes, per active adapter, `result = result + lora_B(lora_A(dropout(x))) * scaling`: after
lora_A's GEMM, lora_B's GEMM writes a new [.., out] tensor, one pass scales it and another adds it to the
base output (three kernels and three passes over the output per adapter; SD 1.5 with a LoRA on every
attention projection has 128 such layers). Here lora_B's GEMM accumulates into the base output itself:

    result.view(-1, out).addmm_(lora_A(x).view(-1, r), lora_B.weight.t(), alpha=scaling)

cuBLAS with beta = 1: one kernel, one pass, the same sum rounded once after fp32 accumulation instead of
three times in fp16. The base layer (shapetune::linear) and lora_A (a patched nn.Linear) run as before.

Merged adapters (their deltas in the base weight: `fuse_lora`) and disabled ones run the base layer
alone, as PEFT does, with the fusions of a plain Linear (counted ("lora_linear", "base")), except disabled
ones still merged, which PEFT unmerges in its forward. Otherwise only PEFT's vanilla path is taken this
way: no mixed-batch `adapter_names` (or other arguments), each active adapter without a variant (DoRA,
...), its dropout the identity (eval, or p = 0), lora_A and lora_B plain nn.Linear without bias on B, a
Python number as its scaling, x in the adapters' dtype and device, no autograd, not under
torch.compile. Anything else runs PEFT's own forward, unchanged (counted ("lora_linear", "peft")).
Nothing is cached: weights, scales and active adapters are read on every call, so set_adapters, hotswaps
and in-place writes take effect as in PEFT.
"""

from __future__ import annotations

import torch
from torch import nn

from .dispatch import count

ATTR = "_shapetune_lora_add"  # on a patched LoRA layer: kernels.patch's fuse_lora_add

_lora_linear: type | None = None


def is_lora_linear(m: nn.Module) -> bool:
    """m is exactly a PEFT LoRA Linear (peft.tuners.lora.layer.Linear; not a quantized subclass)."""
    global _lora_linear
    if _lora_linear is None:
        if not type(m).__module__.startswith("peft."):
            return False
        try:
            from peft.tuners.lora.layer import Linear
        except ImportError:  # pragma: no cover
            return False
        _lora_linear = Linear
    return type(m) is _lora_linear


def _vanilla(layer: nn.Module, name: str, x: torch.Tensor) -> bool:
    """Adapter `name` of `layer` computes exactly `lora_B(lora_A(x)) * scaling` on x, as a GEMM can."""
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
        return False
    drop, a, b, s = layer.lora_dropout[name], layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
    if not (type(drop) is nn.Identity or (type(drop) is nn.Dropout and (not drop.training or drop.p == 0))):
        return False
    if not isinstance(s, (int, float)) or isinstance(s, bool):
        return False
    return (isinstance(a, nn.Linear) and isinstance(b, nn.Linear) and b.bias is None
            and a.weight.dtype == b.weight.dtype == x.dtype and b.weight.device == x.device)


def served(layer: nn.Module, x: torch.Tensor) -> list[str] | None:
    """The active adapters of `layer` whose deltas are added here for input x (none: the base layer alone,
    as PEFT runs it for merged adapters, whose deltas its weight holds, and for disabled ones), or None
    where PEFT's forward must run: fuse_lora_add off, adapters disabled while merged (PEFT's forward then
    unmerges, a side effect), autograd, torch.compile, or an active adapter that is not vanilla."""
    if not layer.__dict__.get(ATTR, True) or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    if layer.disable_adapters:
        return None if layer.merged else []
    if layer.merged:
        return []
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    return active if all(_vanilla(layer, a, x) for a in active) else None


def state(layer: nn.Module, x: torch.Tensor) -> tuple | None:
    """What `add_deltas` adds for x, as values: ((adapter, scaling), ...), or None (PEFT's forward)."""
    active = served(layer, x)
    return None if active is None else tuple((a, layer.scaling[a]) for a in active)


def add_deltas(layer: nn.Module, x: torch.Tensor, out: torch.Tensor, active: list[str]) -> None:
    """out += each adapter's `lora_B(lora_A(x)) * scaling`, accumulated by lora_B's GEMM (beta = 1).
    out: the base layer's output for x, [.., out_features] with its last dim contiguous; a column slice
    of a wider output (a packed projection's) works as well: its rows are one strided matrix."""
    if not active:
        return
    o = out.view(-1, out.shape[-1])
    for a in active:
        xa = layer.lora_A[a](x)
        o.addmm_(xa.reshape(-1, xa.shape[-1]), layer.lora_B[a].weight.t(), alpha=layer.scaling[a])


def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT LoRA Linear's forward with each adapter's delta accumulated by lora_B's GEMM (see the module
    docstring); PEFT's own forward wherever that is not the same expression."""
    active = None if args or kwargs else served(self, x)
    if active is None:
        count("lora_linear", "peft")
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    if not active:  # merged or disabled adapters (or none active): PEFT's forward is the base layer's
        count("lora_linear", "base")
        return result
    if result.dtype != x.dtype or not result.is_contiguous():
        count("lora_linear", "peft")
        for a in active:
            result = result + self.lora_B[a](self.lora_A[a](x)) * self.scaling[a]
        return result
    count("lora_linear", "fused")
    add_deltas(self, x, result, active)
    return result
