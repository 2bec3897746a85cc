"""patch(model): make a PyTorch / diffusers model's modules call the shapetune ops.

    import kernels
    report = kernels.patch(pipe.unet)        # or any nn.Module; returns what was patched
    image = pipe(prompt).images[0]           # tuned kernels where faster, torch's ops elsewhere
    kernels.fallback_summary()               # per op: tuned calls and fallbacks by cause
    kernels.unpatch(pipe.unet)               # back to the module's own forward

What is patched (per module instance: its `forward`, or for diffusers Attention its processor; the
module's class, Parameter objects and values are untouched, so weights are read at call time — a LoRA
fused into a weight, or a PEFT layer wrapped around a Linear, takes effect without re-patching):

  nn.Linear                 -> shapetune::linear
  nn.Conv2d                 -> shapetune::conv2d (groups 1, dilation 1, zero padding, square
                               stride/padding; others keep torch's forward)
  nn.GroupNorm (affine)     -> shapetune::group_norm
  nn.LayerNorm (1-D, affine with bias) -> shapetune::layer_norm
  diffusers GEGLU           -> shapetune::geglu (one GEMM with the gated epilogue) while its proj is
                               a plain nn.Linear (a LoRA-wrapped proj runs diffusers' forward)
  diffusers Attention       -> a processor calling shapetune::attention on the q/k/v projections'
                               outputs (no transposes); masks, spatial/group norms, normalized q/k
                               and 4-D inputs go to the processor that was set before

GroupNorm + SiLU fusion (`fuse=True`): where diffusers applies SiLU right after a GroupNorm —
ResnetBlock2D's norm1 (always) and norm2 (with time_embedding_norm "default"), and the UNet's
conv_norm_out -> conv_act — the norm computes SiLU in the same kernel and the SiLU module passes
that one tensor through (checked by identity; any other input, e.g. the block's time embedding,
still gets its SiLU). That is the group_norm(+silu) workload the tuning scripts extract.

Weights: nothing derived from a weight's values is cached anywhere on the call path (audited for
issue 8: conv2d's converted-weight cache is gone; the registry caches per shape signature, the
runtime per artifact path; the SiLU pass-through holds a weak reference to one output, not a weight),
so any change — `.data` writes (how PEFT merges a LoRA), `copy_`, `param.data = t`,
`load_state_dict` — shows on the next call. The one thing patch changes on a parameter is a
Conv2d weight's memory layout: it is put in channels_last memory (same Parameter, same values),
which is the conv kernel's OHWI layout, so no call copies it; `unpatch` restores the layout. A conv
weight replaced later by a non-channels_last tensor still works, converted on each call (counted
as ("conv2d", "weight_relayout")).

Every op falls back to torch (counted) where nothing tuned is faster, so a patched model computes
what the eager one does up to the tolerances in scheduler/verify.py.
"""

from __future__ import annotations

import types
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from .attention import attention
from .conv import conv2d
from .fused import geglu
from .linear import linear
from .norm import group_norm, layer_norm

_MARK = "_shapetune_patched"  # instance attribute: the kind of patch applied


@dataclass
class PatchReport:
    patched: Counter = field(default_factory=Counter)  # kind -> modules
    skipped: Counter = field(default_factory=Counter)  # "kind: reason" -> modules

    def __str__(self) -> str:
        p = ", ".join(f"{k} {n}" for k, n in sorted(self.patched.items()))
        s = ", ".join(f"{k} {n}" for k, n in sorted(self.skipped.items()))
        return f"patched: {p or 'nothing'}" + (f"; kept torch's: {s}" if s else "")


def _set_forward(module: nn.Module, fn, kind: str, report: PatchReport) -> None:
    module.forward = types.MethodType(fn, module)
    setattr(module, _MARK, kind)
    report.patched[kind] += 1


# -- per-module forwards ----------------------------------------------------------------------------
def _linear_forward(self, x):
    return linear(x, self.weight, self.bias)


def _conv_forward(self, x):
    return conv2d(x, self.weight, self.bias, self.stride[0], self.padding[0])


def _conv_weight_channels_last(conv: nn.Conv2d) -> None:
    """Store the conv's weight in channels_last memory, the kernel's OHWI layout, in place on the
    same Parameter (optimizers and PEFT keep seeing it); remembered so unpatch can restore it."""
    w = conv.weight
    if not w.is_contiguous(memory_format=torch.channels_last):
        w.data = w.data.contiguous(memory_format=torch.channels_last)
        conv._shapetune_relaid = True


def _group_norm_forward(self, x):
    silu = self.__dict__.get("_shapetune_silu")
    y = group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=silu is not None)
    if silu is not None:
        silu.last = weakref.ref(y)  # the SiLU module that follows passes exactly this tensor through
    return y


def _layer_norm_forward(self, x):
    return layer_norm(x, self.weight, self.bias, self.eps)


class _FusedSiLU:
    """Shared by a GroupNorm (which applied SiLU already) and the SiLU module right after it."""

    last = None


def _silu_forward(self, x):
    fused = self._shapetune_fused
    if fused.last is not None and fused.last() is x:
        fused.last = None
        return x
    return torch.nn.functional.silu(x)


def _geglu_forward(self, hidden_states, *args, **kwargs):
    if type(self.proj) is not nn.Linear or self.proj.bias is None:  # e.g. a LoRA layer around proj
        return type(self).forward(self, hidden_states, *args, **kwargs)
    return geglu(hidden_states, self.proj.weight, self.proj.bias)


class AttnProcessor:
    """diffusers attention processor: q/k/v projections, then shapetune::attention on their
    [B, S, H*D] outputs, then to_out. Anything it does not cover goes to `fallback`, the processor
    the module had (so LoRA-aware or masked paths keep diffusers' own behaviour)."""

    def __init__(self, fallback):
        self.fallback = fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if (attention_mask is not None or hidden_states.ndim != 3 or args or kwargs
                or getattr(attn, "spatial_norm", None) is not None or getattr(attn, "group_norm", None) is not None
                or getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None
                or (encoder_hidden_states is not None and getattr(attn, "norm_cross", None))):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)
        head_dim = k.shape[-1] // attn.heads
        # diffusers' SDPA processor uses SDPA's default scale, 1/sqrt(head_dim): so do we
        o = attention(q, k, v, heads=attn.heads, scale=head_dim ** -0.5)
        o = attn.to_out[1](attn.to_out[0](o))
        if attn.residual_connection:
            o = o + hidden_states
        return o / attn.rescale_output_factor


# -- patch / unpatch --------------------------------------------------------------------------------
def _diffusers_types():
    try:
        from diffusers.models.activations import GEGLU
        from diffusers.models.attention_processor import Attention
        from diffusers.models.resnet import ResnetBlock2D
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    except ImportError:  # pragma: no cover
        return None, None, None, None
    return GEGLU, Attention, ResnetBlock2D, UNet2DConditionModel


def _fuse_silu(norm: nn.Module, act: nn.Module) -> bool:
    """Make `norm` apply SiLU and `act` (the SiLU module diffusers calls right after it) pass the
    norm's output through. Only for a GroupNorm we patched and a plain nn.SiLU."""
    if getattr(norm, _MARK, None) != "group_norm" or type(act) is not nn.SiLU or "_shapetune_silu" in norm.__dict__:
        return False
    fused = act.__dict__.get("_shapetune_fused") or _FusedSiLU()
    act._shapetune_fused = fused
    act.forward = types.MethodType(_silu_forward, act)
    setattr(act, _MARK, "silu_passthrough")
    norm._shapetune_silu = fused
    return True


def patch(model: nn.Module, fuse: bool = True) -> PatchReport:
    """Route `model`'s supported modules to the shapetune ops (idempotent; see the module docstring).

    Parameters
    ----------
    model : nn.Module, e.g. a diffusers UNet2DConditionModel (or a pipeline's `.unet`)
    fuse : bool, fuse SiLU into the GroupNorms diffusers follows with it

    Returns
    -------
    PatchReport: modules patched per kind, and those left on torch's forward with the reason.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"kernels.patch: expected an nn.Module (e.g. pipe.unet), got {type(model).__name__}")
    GEGLU, Attention, ResnetBlock2D, UNet2D = _diffusers_types()
    report = PatchReport()
    for name, m in model.named_modules():
        if getattr(m, _MARK, None):
            continue
        t = type(m)
        if t is nn.Linear:
            _set_forward(m, _linear_forward, "linear", report)
        elif t is nn.Conv2d:
            pad = m.padding
            if (m.groups != 1 or tuple(m.dilation) != (1, 1) or m.stride[0] != m.stride[1] or isinstance(pad, str)
                    or pad[0] != pad[1] or m.padding_mode != "zeros"):
                report.skipped["conv2d: grouped/dilated/non-square/non-zero padding"] += 1
            else:
                _conv_weight_channels_last(m)
                _set_forward(m, _conv_forward, "conv2d", report)
        elif t is nn.GroupNorm:
            if m.affine:
                _set_forward(m, _group_norm_forward, "group_norm", report)
            else:
                report.skipped["group_norm: no affine"] += 1
        elif t is nn.LayerNorm:
            if len(m.normalized_shape) == 1 and m.elementwise_affine and m.bias is not None:
                _set_forward(m, _layer_norm_forward, "layer_norm", report)
            else:
                report.skipped["layer_norm: not 1-D affine with bias"] += 1
        elif GEGLU is not None and t is GEGLU:
            _set_forward(m, _geglu_forward, "geglu", report)
        elif Attention is not None and isinstance(m, Attention):
            prev = m.get_processor()
            m.set_processor(AttnProcessor(prev))
            setattr(m, _MARK, "attention")
            report.patched["attention"] += 1
    if fuse and ResnetBlock2D is not None:
        for m in model.modules():
            if type(m) is ResnetBlock2D:
                report.patched["group_norm+silu"] += _fuse_silu(m.norm1, m.nonlinearity)
                if m.time_embedding_norm == "default":  # norm2 -> SiLU directly only in this mode
                    report.patched["group_norm+silu"] += _fuse_silu(m.norm2, m.nonlinearity)
            elif isinstance(m, UNet2D) and m.conv_norm_out is not None and m.conv_act is not None:
                report.patched["group_norm+silu"] += _fuse_silu(m.conv_norm_out, m.conv_act)
    return report


def unpatch(model: nn.Module) -> int:
    """Undo `patch`: every module back to its class's forward / its previous processor, conv
    weights back to contiguous memory where patch made them channels_last. Returns how many
    modules were restored."""
    n = 0
    for m in model.modules():
        kind = m.__dict__.pop(_MARK, None)
        if kind is None:
            continue
        n += 1
        if kind == "attention":
            proc = m.get_processor()
            m.set_processor(proc.fallback if isinstance(proc, AttnProcessor) else proc)
            continue
        m.__dict__.pop("forward", None)
        if m.__dict__.pop("_shapetune_relaid", False):
            m.weight.data = m.weight.data.contiguous()
        for attr in ("_shapetune_silu", "_shapetune_fused"):
            m.__dict__.pop(attr, None)
    return n
