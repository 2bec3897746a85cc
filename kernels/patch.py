"""patch(model): make a PyTorch / diffusers model's modules call the shapetune ops.

    import kernels
    report = kernels.patch(pipe.unet)        # or any nn.Module; returns what was patched
    image = pipe(prompt).images[0]           # tuned kernels where faster, torch's ops elsewhere
    kernels.fallback_summary()               # per op: tuned calls and fallbacks by cause
    kernels.unpatch(pipe.unet)               # back to the module's own forward

What is patched is one table, `patch_table()` = {module type: (rule, replacement)}: the rules are the
op families' (shapetune/ops: which instances are served, and the workloads of a call; the same rules
scheduler.extract extracts with), the replacements are REPLACEMENTS below. Per module instance its
`forward` is replaced, or for diffusers Attention its processor; the module's class, Parameter objects
and values are untouched, so weights are read at call time — a LoRA fused into a weight, or a PEFT
layer wrapped around a Linear, takes effect without re-patching:

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

Fusions (`fuse=True`), where shapetune/fusions.py says diffusers runs an elementwise op right after
a patched module — the same table scheduler/extract.py reads, so the fused workloads the tuning
scripts extract are the ones dispatched here:

  GroupNorm + SiLU     ResnetBlock2D's norm1 (always) and norm2 (time_embedding_norm "default"), the
                       UNet's conv_norm_out -> conv_act: the norm computes SiLU in the same kernel and
                       the SiLU module passes that one tensor through (checked by identity; any other
                       input, e.g. the block's time embedding, still gets its SiLU)
  conv2d + residual    ResnetBlock2D: its forward (diffusers' own, restated) calls
                       conv2d(h, conv2, residual=shortcut(input)), then divides by
                       output_scale_factor where it is not 1 (the eager (input + conv2(h)) / factor,
                       the add fused); Transformer2DModel (continuous input, conv proj_out): its
                       `_get_output_for_continuous_inputs` calls conv2d(h, proj_out, residual=input)
                       on the channels_last view of the blocks' output (no copy)
  conv2d + shift       ResnetBlock2D (time_embedding_norm "default"): conv1(h) + temb as one
                       conv2d(shift=temb) call; where cuDNN runs conv1 and group_norm has a tuned kernel
                       with the shift for the shape, conv1 without its bias and norm2 adding bias + temb as
                       it reads instead (`fuse_norm_shift`)
  bias passes          where cuDNN runs a conv (nothing tuned faster), its bias and residual / shift
                       are one tuned bias_add pass after it; where cuBLAS runs GEGLU's projection,
                       h * gelu(g) is one tuned gelu_gate pass (kernels/elementwise.py)
  linear + residual    diffusers Attention with residual_connection: our processor calls
                       linear_residual(o, to_out[0], residual=input), then / rescale_output_factor;
                       BasicTransformerBlock (norm_type "layer_norm"): its forward (diffusers' own,
                       restated) adds each residual inside attn1's and attn2's to_out[0] and the
                       FeedForward's output Linear (three linear_residual calls per block)
  LoRA delta + add     a PEFT LoRA Linear (vanilla adapters): lora_B's GEMM accumulates the scaled delta
                       into the base layer's output (cuBLAS beta = 1, kernels/lora.py) instead of a GEMM,
                       a scale pass and an add pass per adapter; the base layer keeps its fusions
                       (q/k/v packing, linear + residual), the deltas added to its columns or sum
  add + LayerNorm      BasicTransformerBlock: where add_layer_norm has a tuned kernel for the shape,
                       attn1's and attn2's residual adds go with the LayerNorm that reads their sum
                       (norm2, norm3) into one kernel instead (kernels.norm.add_layer_norm: s = o + h
                       and norm(s) in one pass; to_out[0] then plain, its bias in cuBLAS's epilogue)
  linear + gelu        diffusers GELU (approximate "none", FeedForward "gelu"): linear_gelu(x, proj)
  time embedding       the ResnetBlock2Ds' time_emb_proj(silu(temb)) (`fuse_temb`): one SiLU and one
                       GEMM per forward over their weights packed into one storage, each resnet
                       taking its columns (kernels/temb.py)
  q/k/v projections    diffusers Attention (`fuse_qkv`): to_q/to_k/to_v (self-attention) or to_k/to_v
                       (cross-attention) as one linear call over weights packed into one storage, each
                       Parameter a view of its rows (kernels/qkv.py; in-place weight writes reach the
                       packed GEMM, a replaced Parameter runs the projections apart, a LoRA layer's
                       base Linear stays packed);
                       a UNet's cross-attentions' k/v, which all read the same context, as one GEMM
                       per forward (kernels/ctxkv.py)
  (each keeps diffusers' unfused path where its conv / proj is not a plain patched module (or a vanilla
  LoRA layer around one), or shapes/dtypes would broadcast or promote)

Weights: nothing derived from a weight's values is cached anywhere on the call path (audited for
issue 8: conv2d's converted-weight cache is gone; the registry caches per shape signature, the
ops' plans per call metadata (shapes, dtypes, devices: a replaced parameter of another shape or
dtype is checked and resolved again), the runtime per artifact path; the SiLU pass-through holds a weak reference to one output, not a weight),
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
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from shapetune.fusions import attention_covered, sites_of
from shapetune.ops import ModuleRule, module_rules, rule_for

from . import ctxkv, lora, qkv
from . import temb as temb_
from .attention import attention
from .custom_op import _any_autocast, autocast_on, call_op
from .dispatch import count
from .elementwise import gelu_gate
from .conv import conv2d_tuned
from .norm import add_layer_norm_tuned, group_norm_shift_tuned
from .packing import MARK as _MARK  # instance attribute: the kind of patch applied
from .packing import PerThread, base_linear, hooked, plain_linear, replace_method



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
# They call the ops through call_op with the arguments in the ops' own types, not through the public
# functions (kernels.linear, ...), which normalize what a module already holds.
def _linear_forward(self, x):
    return call_op("linear", x, self.weight, self.bias)


def _conv_forward(self, x):
    if x.dim() != 4:  # an unbatched [C, H, W] input, valid for nn.Conv2d: torch's conv, counted
        count("conv2d", "unsupported_input")
        return type(self).forward(self, x)
    return call_op("conv2d", x, self.weight, self.bias, self.stride[0], self.padding[0], None, None)


def _conv_weight_channels_last(conv: nn.Conv2d) -> None:
    """Store the conv's weight in channels_last memory, the kernel's OHWI layout, in place on the
    same Parameter (optimizers and PEFT keep seeing it); remembered so unpatch can restore it."""
    w = conv.weight
    if not w.is_contiguous(memory_format=torch.channels_last):
        w.data = w.data.contiguous(memory_format=torch.channels_last)
        conv._shapetune_relaid = True


_SILU_ACT = "_shapetune_silu_act"  # on a GroupNorm whose SiLU is fused: (the SiLU module that passes it through,
#   a weak reference to their parent, the parent's attribute names of the norm and of the SiLU)


def _silu_after(norm: nn.Module) -> _FusedSiLU | None:
    """The pass-through of the SiLU module fused into this patched GroupNorm, or None where it is not fused
    or, on this call, the norm or that SiLU has hooks (then the norm's hooks see its own output and the
    SiLU's see their input, as in eager: both run unfused), or the parent no longer holds both where patch
    found them (an activation replaced after patch, e.g. `resnet.nonlinearity = nn.Mish()`: the norm's
    output is its own again and the new module applies itself to it)."""
    silu, site = norm.__dict__.get("_shapetune_silu"), norm.__dict__.get(_SILU_ACT)
    if silu is None or site is None or hooked(norm):
        return None
    act, parent, norm_name, act_name = site
    mods = getattr(parent(), "_modules", None)
    if mods is None or mods.get(act_name) is not act or mods.get(norm_name) is not norm or hooked(act):
        return None
    return silu


def _group_norm_forward(self, x):
    """nn.GroupNorm's semantics, [N, C, *] with C second: 4-D NCHW goes to group_norm as is, 3-D [N, C, L]
    (diffusers' spatial Attention passes [N, L, C].transpose(1, 2)) as its [N, L, C] view, zero-copy
    for that case; any other rank runs torch's F.group_norm."""
    silu = _silu_after(self)
    dim = x.dim()
    if dim == 3:
        y = call_op("group_norm", x.transpose(1, 2), self.num_groups, self.weight, self.bias, float(self.eps),
                    silu is not None).transpose(1, 2)
    elif dim == 4:
        y = call_op("group_norm", x, self.num_groups, self.weight, self.bias, float(self.eps), silu is not None)
    else:
        y = torch.nn.functional.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        if silu is not None:
            y = torch.nn.functional.silu(y)
    if silu is not None:
        silu.last = weakref.ref(y)  # the SiLU module that follows passes exactly this tensor through
    return y


def _layer_norm_forward(self, x):
    return call_op("layer_norm", x, self.weight, self.bias, float(self.eps))


class _FusedSiLU(PerThread):
    """Shared by a GroupNorm (which applied SiLU already) and the SiLU module right after it: a weak
    reference to the norm's last output, per thread. (Shared by threads, one thread's norm output replaced
    the other's between its norm and its SiLU, and that SiLU applied SiLU a second time.)"""

    last = None


def _silu_forward(self, x):
    fused = self._shapetune_fused
    if fused.last is not None and fused.last() is x:
        fused.last = None
        return x
    return torch.nn.functional.silu(x)


def _geglu_forward(self, hidden_states, *args, **kwargs):
    """diffusers GEGLU: one geglu call (proj's GEMM with h * gelu(g) in its epilogue) where proj is a patched
    plain Linear with a bias; where proj is a PEFT LoRA layer around a patched Linear (kernels/lora.py adds
    its deltas) or has no bias, its output then h * gelu(g) as one pass (kernels.elementwise.gelu_gate, tuned
    where one serves the shape) instead of diffusers' chunk, gelu and multiply. Else (e.g. a proj with hooks,
    which patch leaves unpatched) diffusers' forward, which calls proj as a module."""
    proj = self.proj
    if plain_linear(proj) and proj.bias is not None:
        return call_op("geglu", hidden_states, proj.weight, proj.bias)
    if (base_linear(proj) is not None and not args and not kwargs and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()):
        return gelu_gate(proj(hidden_states))
    return type(self).forward(self, hidden_states, *args, **kwargs)


def _gelu_forward(self, hidden_states):
    """diffusers GELU: gelu(proj(x)) as one linear_gelu (exact erf GELU)."""
    proj = self.proj
    # a patched plain proj only: not a LoRA layer, nor one with hooks
    if not plain_linear(proj) or self.approximate != "none":
        return type(self).forward(self, hidden_states)
    return call_op("linear_gelu", hidden_states, proj.weight, proj.bias)


def _conv_out_shape(conv: nn.Conv2d, x: torch.Tensor) -> tuple[int, ...]:
    (kh, kw), s, p = conv.kernel_size, conv.stride[0], conv.padding[0]
    return (x.shape[0], conv.out_channels, (x.shape[2] + 2 * p - kh) // s + 1, (x.shape[3] + 2 * p - kw) // s + 1)


def _conv_residual(conv: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """conv(x) + residual: one conv2d(residual=) where conv is a patched plain Conv2d and residual has
    the output's exact shape and x's dtype (no broadcast, no promotion); else the eager expression."""
    if (type(conv) is nn.Conv2d and conv.__dict__.get(_MARK) == "conv2d" and x.dim() == 4 and not hooked(conv)
            and residual.dtype == x.dtype and tuple(residual.shape) == _conv_out_shape(conv, x)):
        return call_op("conv2d", x, conv.weight, conv.bias, conv.stride[0], conv.padding[0], residual, None)
    return residual + conv(x)


_NORM_SHIFT = "_shapetune_norm_shift"  # on a patched ResnetBlock2D: kernels.patch's fuse_norm_shift


def _conv_shift_norm(resnet: nn.Module, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """norm2(conv1(x) + shift[:, :, None, None]) of a ResnetBlock2D (time_embedding_norm "default"; diffusers
    reads the sum only there), shift [N, Co] its projected time embedding. Where conv1 is a patched plain
    Conv2d and shift has x's dtype and the output's N, Co: one conv2d(shift=) call, then norm2; or, where
    conv1 has a bias but no tuned conv serves it (cuDNN runs it), norm2 is a patched GroupNorm and
    group_norm has a tuned kernel with the shift for the shape (and fuse_norm_shift is on), conv1 without
    its bias, then one group_norm normalizing x + bias[c] + shift[n, c] as it reads (one pass of the
    activation less: kernels.norm). Else the eager expression; where only x or shift kept the fusion from
    applying, counted ("group_norm+shift", "unsupported_input"). Bias and shift are read on every call.
    While torch.compile traces: conv2d(shift=) and norm2 (the plans are the ops', found at run time)."""
    conv, norm = resnet.conv1, resnet.norm2
    plain = type(conv) is nn.Conv2d and conv.__dict__.get(_MARK) == "conv2d" and not hooked(conv)
    fuse = (plain and conv.bias is not None and resnet.__dict__.get(_NORM_SHIFT, True) and type(norm) is nn.GroupNorm
            and norm.__dict__.get(_MARK) == "group_norm" and not hooked(norm))
    if not (plain and x.dim() == 4 and shift.dim() == 2 and shift.dtype == x.dtype and shift.shape[0] == x.shape[0]
            and shift.shape[1] == conv.out_channels):
        if fuse:
            count("group_norm+shift", "unsupported_input")
        return norm(conv(x) + shift[:, :, None, None])
    w, b, stride, pad = conv.weight, conv.bias, conv.stride[0], conv.padding[0]
    # (under autocast the eager expression, which autocast casts op by op: kernels.custom_op)
    if (fuse and not torch.compiler.is_compiling() and not (_any_autocast() and autocast_on(x))
            and not conv2d_tuned(x, w, b, stride, pad, shift)):
        silu = _silu_after(norm)
        if group_norm_shift_tuned(_conv_out_shape(conv, x), x.dtype, x.device, norm.num_groups, norm.weight,
                                  norm.bias, float(norm.eps), silu is not None, b, shift):
            y = call_op("conv2d", x, w, None, stride, pad, None, None)
            out = call_op("group_norm", y, norm.num_groups, norm.weight, norm.bias, float(norm.eps), silu is not None,
                          b, shift)
            if silu is not None:
                silu.last = weakref.ref(out)  # the SiLU after norm2 passes it through, as _group_norm_forward's
            return out
    return norm(call_op("conv2d", x, w, b, stride, pad, None, shift))


def _resnet_forward(self, input_tensor, temb, *args, **kwargs):
    """diffusers ResnetBlock2D.forward (0.2x-0.4x), restated so conv2 and the residual add are one
    conv2d(residual=) call: output = (shortcut(input) + conv2(h)) / output_scale_factor, the factor
    dividing the fused sum (the same expression; skipped where it is 1); and conv1 with the time
    embedding's add one conv2d(shift=) call (time_embedding_norm "default": h = conv1(h) + temb). The
    time embedding is projected before conv1 runs instead of after (independent values), and kept
    [N, C] where diffusers takes its [N, C, 1, 1] view (the view only where an expression needs it); where
    cuDNN runs conv1, its bias and the time embedding may go into norm2's kernel instead (_conv_shift_norm)."""
    if args or kwargs:  # the deprecated `scale` argument: diffusers' own forward warns about it
        return type(self).forward(self, input_tensor, temb, *args, **kwargs)
    h = self.nonlinearity(self.norm1(input_tensor))
    if self.upsample is not None:
        if h.shape[0] >= 64:  # diffusers: upsample_nearest_nhwc fails with large batches
            input_tensor, h = input_tensor.contiguous(), h.contiguous()
        input_tensor, h = self.upsample(input_tensor), self.upsample(h)
    elif self.downsample is not None:
        input_tensor, h = self.downsample(input_tensor), self.downsample(h)
    shift = None  # the projected time embedding, [N, C]: diffusers' temb is shift[:, :, None, None]
    if self.time_emb_proj is not None:
        shift = temb_.projected(self, temb)  # the UNet's resnets share one GEMM where packed
        if shift is None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            shift = self.time_emb_proj(temb)
    if self.time_embedding_norm == "default":
        if shift is not None:
            h = _conv_shift_norm(self, h, shift)
        else:
            h = self.norm2(self.conv1(h) if temb is None else self.conv1(h) + temb)
    elif self.time_embedding_norm == "scale_shift":
        h = self.conv1(h)
        if shift is not None:
            temb = shift[:, :, None, None]
        if temb is None:
            raise ValueError(f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}")
        time_scale, time_shift = torch.chunk(temb, 2, dim=1)
        h = self.norm2(h)
        h = h * (1 + time_scale) + time_shift
    else:
        h = self.norm2(self.conv1(h))
    h = self.dropout(self.nonlinearity(h))
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor.contiguous() if self.training else input_tensor)
    out = _conv_residual(self.conv2, h, input_tensor)
    return out if self.output_scale_factor == 1 else out / self.output_scale_factor


def _transformer_2d_output(self, hidden_states, residual, batch_size, height, width, inner_dim):
    """diffusers Transformer2DModel's continuous-input output, conv proj_out: proj_out(h) + input as one
    conv2d(residual=) on the [B, C, H, W] channels_last view of the blocks' [B, H*W, C] output."""
    if self.use_linear_projection:
        return type(self)._get_output_for_continuous_inputs(self, hidden_states, residual, batch_size, height,
                                                            width, inner_dim)
    h = hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
    return _conv_residual(self.proj_out, h, residual)


def _identity_dropout(m: nn.Module) -> bool:
    """m computes the identity and has no hooks: a fused path may skip its call."""
    return type(m) is nn.Dropout and (not m.training or m.p == 0) and not hooked(m)


def _linear_residual(proj: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor | None:
    """proj(x) + residual as one linear_residual where proj is a patched plain Linear, or a PEFT LoRA layer
    around one (kernels/lora.py then adds its adapters' deltas to the sum), and residual has the output's
    exact shape and x's dtype (no broadcast, no promotion); None where it does not apply."""
    base = base_linear(proj)
    if (base is None or residual.dtype != x.dtype or x.shape[-1] != base.in_features
            or tuple(residual.shape) != (*x.shape[:-1], base.out_features)):
        return None
    active = [] if base is proj else lora.served(proj, x)
    if active is None:
        return None
    out = call_op("linear_residual", x, base.weight, base.bias, residual)
    if base is not proj:
        count("lora_linear", "fused" if active else "base")
        lora.add_deltas(proj, x, out, active)
    return out


class AttnProcessor:
    """diffusers attention processor: q/k/v projections, then shapetune::attention on their
    [B, S, H*D] outputs, then to_out (with `fuse_residual` and the module's residual_connection,
    to_out[0] and the residual add as one linear_residual). Anything it does not cover goes to
    `fallback`, the processor the module had (so LoRA-aware or masked paths keep diffusers' own
    behaviour). `plus_residual` serves a caller that adds a residual to the module's output
    (BasicTransformerBlock)."""

    def __init__(self, fallback, fuse_residual: bool = False):
        self.fallback = fallback
        self.fuse_residual = fuse_residual
        # the scale of the processor restated (patch serves diffusers' two defaults only): SDPA's default,
        # 1/sqrt(head_dim), for AttnProcessor2_0; the module's `scale` for the classic AttnProcessor (1 where
        # the module was made with scale_qk=False, which selects that processor)
        self.module_scale = type(fallback).__name__ == "AttnProcessor"

    covers = staticmethod(attention_covered)

    def _attend(self, attn, hidden_states, encoder_hidden_states):
        kv = None if encoder_hidden_states is None else ctxkv.shared(attn, encoder_hidden_states)
        # the UNet's cross-attentions' k/v: one GEMM per forward; else this attention's q/k/v (or k/v) as one
        qkv_ = (attn.to_q(hidden_states), *kv) if kv is not None else \
            qkv.projections(attn, hidden_states, encoder_hidden_states)
        if qkv_ is None:
            ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            qkv_ = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)
        q, k, v = qkv_
        head_dim = k.shape[-1] // attn.heads
        return attention(q, k, v, heads=attn.heads, scale=attn.scale if self.module_scale else head_dim ** -0.5)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if args or kwargs or not self.covers(attn, hidden_states, encoder_hidden_states, attention_mask):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        o = self._attend(attn, hidden_states, encoder_hidden_states)
        proj, drop = attn.to_out[0], attn.to_out[1]
        fused = (_linear_residual(proj, o, hidden_states)  # dropout is the identity here
                 if self.fuse_residual and attn.residual_connection and _identity_dropout(drop) else None)
        if fused is not None:
            o = fused
        else:
            o = drop(proj(o))
            if attn.residual_connection:
                o = o + hidden_states
        # o is a fresh tensor (a projection's output, or a sum): dividing by 1 would copy it unchanged
        return o if attn.rescale_output_factor == 1 else o / attn.rescale_output_factor

    def projected(self, attn, hidden_states, encoder_hidden_states):
        """to_out[0](attention(...)) without the residual add (the caller fuses it into what follows:
        kernels.norm.add_layer_norm), or None where that is not the module's expression (as
        plus_residual)."""
        if (not self.covers(attn, hidden_states, encoder_hidden_states) or attn.residual_connection
                or attn.rescale_output_factor != 1 or not _identity_dropout(attn.to_out[1])):
            return None
        return attn.to_out[0](self._attend(attn, hidden_states, encoder_hidden_states))

    def plus_residual(self, attn, hidden_states, encoder_hidden_states, residual):
        """attn(hidden_states, encoder_hidden_states) + residual with the add fused into to_out[0] (one
        linear_residual) where it is a plain patched Linear and the shapes match, else to_out[0]'s output
        plus residual; None where the processor's call is not that expression (masks and other uncovered
        calls, residual_connection, a rescale factor, dropout in training): the caller then runs the
        module. (Once computed, the attention is never discarded: a LoRA-wrapped to_out[0] used to make
        the caller run it a second time.)"""
        if (not self.covers(attn, hidden_states, encoder_hidden_states) or attn.residual_connection
                or attn.rescale_output_factor != 1 or not _identity_dropout(attn.to_out[1])):
            return None
        o = self._attend(attn, hidden_states, encoder_hidden_states)
        fused = _linear_residual(attn.to_out[0], o, residual)
        return fused if fused is not None else attn.to_out[0](o) + residual


def _attn_plus(attn: nn.Module, x, ctx, mask, cross_kwargs: dict, residual):
    """attn(x, ctx, mask, **cross_kwargs) + residual, fused where our processor serves the call."""
    proc = attn.processor
    if mask is None and not cross_kwargs and isinstance(proc, AttnProcessor) and not hooked(attn):
        out = proc.plus_residual(attn, x, ctx, residual)
        if out is not None:
            return out
    return attn(x, encoder_hidden_states=ctx, attention_mask=mask, **cross_kwargs) + residual


def _attn_add_norm(attn: nn.Module, x, ctx, mask, cross_kwargs: dict, residual, norm: nn.Module,
                   add_norm: bool = True):
    """(h, norm(h)) with h = attn(x, ctx, mask, **cross_kwargs) + residual. Where `add_norm`, our processor
    serves the call, `norm` is a patched LayerNorm and add_layer_norm has a tuned kernel for the shape: the
    output projection (its bias in cuBLAS's epilogue), then the add and the LayerNorm as one kernel. Else the
    add fused into to_out[0] (_attn_plus) and the LayerNorm on its own, as before."""
    proc = attn.processor
    if (add_norm and mask is None and not cross_kwargs and isinstance(proc, AttnProcessor) and type(norm) is nn.LayerNorm
            and norm.__dict__.get(_MARK) == "layer_norm" and norm.weight is not None and norm.bias is not None
            and add_layer_norm_tuned(residual, residual, norm.weight, norm.bias, float(norm.eps))
            and not hooked(attn) and not hooked(norm)):
        o = proc.projected(attn, x, ctx)
        if o is not None and o.shape == residual.shape and o.dtype == residual.dtype:
            out = call_op("add_layer_norm", o, residual, norm.weight, norm.bias, float(norm.eps))
            return out[0], out[1]
        if o is not None:  # a shape the add broadcasts: torch's add, then the norm
            h = o + residual
            return h, norm(h)
    h = _attn_plus(attn, x, ctx, mask, cross_kwargs, residual)
    return h, norm(h)


def _ff_plus(ff: nn.Module, x, residual):
    """ff(x) + residual with the add fused into the FeedForward's output Linear (net: act, Dropout,
    Linear[, Dropout]) where it is a patched plain Linear (or a LoRA layer around one) and the dropouts
    are the identity."""
    net = ff.net
    if (len(net) in (3, 4) and _identity_dropout(net[1]) and (len(net) == 3 or _identity_dropout(net[3]))
            and base_linear(net[2]) is not None and not hooked(ff)):
        h = net[1](net[0](x))
        out = _linear_residual(net[2], h, residual)
        return out if out is not None else net[2](h) + residual  # (a residual that broadcasts)
    return ff(x) + residual


_ADD_NORM = "_shapetune_add_norm"  # on a patched BasicTransformerBlock: kernels.patch's fuse_add_norm


def _transformer_block_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                               encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None,
                               class_labels=None, added_cond_kwargs=None):
    """diffusers BasicTransformerBlock.forward for norm_type "layer_norm" (what shapetune/fusions.py
    lists: no positional embedding, no chunked feed-forward), restated so that each residual add is
    fused into the linear that produces the added output: attn1's and attn2's to_out[0] and the
    FeedForward's output Linear become linear_residual calls. The same expressions in the same order:
    h = attn1(norm1(h)) + h; h = attn2(norm2(h), ctx) + h; h = ff(norm3(h)) + h. GLIGEN, a deprecated
    `scale`, 4-D inputs and any other norm type run diffusers' own forward."""
    ck = cross_attention_kwargs
    if (ck and ("gligen" in ck or ck.get("scale") is not None)) or hidden_states.ndim != 3:
        return type(self).forward(self, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                  timestep, ck, class_labels, added_cond_kwargs)
    ck = dict(ck) if ck else {}
    h = hidden_states
    # each residual add with the LayerNorm that reads its sum: one add_layer_norm kernel where one is tuned
    # (and kernels.patch's fuse_add_norm left it on)
    an = self.__dict__.get(_ADD_NORM, True)
    after1 = self.norm2 if self.attn2 is not None else self.norm3
    h, n = _attn_add_norm(self.attn1, self.norm1(h), encoder_hidden_states if self.only_cross_attention else None,
                          attention_mask, ck, h, after1, an)
    if self.attn2 is not None:
        h, n = _attn_add_norm(self.attn2, n, encoder_hidden_states, encoder_attention_mask, ck, h, self.norm3, an)
    return _ff_plus(self.ff, n, h)


# -- the patch table ---------------------------------------------------------------------------------
def _replace_forward(fn, kind: str):
    def install(m: nn.Module, fuse: bool, report: PatchReport) -> None:
        _set_forward(m, fn, kind, report)

    return install


def _install_conv(m: nn.Conv2d, fuse: bool, report: PatchReport) -> None:
    _conv_weight_channels_last(m)
    _set_forward(m, _conv_forward, "conv2d", report)


def _install_attention(m: nn.Module, fuse: bool, report: PatchReport) -> None:
    prev = m.get_processor()
    fuse_residual = fuse and sites_of(m).get("to_out.0") is not None
    m.set_processor(AttnProcessor(prev, fuse_residual))
    setattr(m, _MARK, "attention")
    report.patched["attention"] += 1
    if fuse_residual:
        report.patched["linear+residual"] += 1


#: module rule kind (shapetune.ops.ModuleRule.kind) -> install(module, fuse, report): the replacement
REPLACEMENTS = {
    "linear": _replace_forward(_linear_forward, "linear"),
    "conv2d": _install_conv,
    "group_norm": _replace_forward(_group_norm_forward, "group_norm"),
    "layer_norm": _replace_forward(_layer_norm_forward, "layer_norm"),
    "geglu": _replace_forward(_geglu_forward, "geglu"),
    "attention": _install_attention,
}


def patch_table() -> dict[type, tuple[ModuleRule, Callable]]:
    """{module type: (its rule, its replacement)}: the one table patch is driven by. The rules
    (shapetune.ops: which instances are served, and the workloads of a call) are the ones
    scheduler.extract extracts with; every rule kind has a replacement here."""
    return {t: (r, REPLACEMENTS[r.kind]) for t, r in module_rules().items()}


def _fuse_silu(parent: nn.Module, norm_name: str, act_name: str) -> bool:
    """Make the parent's GroupNorm `norm_name` apply SiLU and its SiLU module `act_name` (the one diffusers
    calls right after it) pass the norm's output through. Only for a GroupNorm we patched and a plain nn.SiLU;
    a norm fused with a module its parent no longer holds is unfused first (True: fused now, not before)."""
    norm, act = parent._modules.get(norm_name), parent._modules.get(act_name)
    if getattr(norm, _MARK, None) != "group_norm":
        return False
    site = norm.__dict__.get(_SILU_ACT)
    if site is not None:
        if site[0] is act and site[1]() is parent and site[2] == norm_name:
            return False  # fused already
        _unfuse_silu(norm)
    if type(act) is not nn.SiLU or hooked(act):
        return False
    fused = act.__dict__.get("_shapetune_fused") or _FusedSiLU()
    act._shapetune_fused = fused
    act.forward = types.MethodType(_silu_forward, act)
    setattr(act, _MARK, "silu_passthrough")
    norm._shapetune_silu = fused
    # (plain references, not registered submodules; the parent's weakly: the norm may outlive it)
    norm.__dict__[_SILU_ACT] = (act, weakref.ref(parent), norm_name, act_name)
    return True


def _unfuse_silu(norm: nn.Module) -> None:
    """The norm computes its own output again (its former SiLU keeps passing through only what a norm fused
    with it returned)."""
    norm.__dict__.pop("_shapetune_silu", None)
    norm.__dict__.pop(_SILU_ACT, None)


def patch(model: nn.Module, fuse: bool = True, fuse_qkv: bool = True, fuse_temb: bool = True,
          fuse_ctxkv: bool = True, fuse_add_norm: bool = True, fuse_lora_add: bool = True,
          fuse_norm_shift: bool = True) -> PatchReport:
    """Route `model`'s supported modules to the shapetune ops (idempotent; see the module docstring).

    Parameters
    ----------
    model : nn.Module, e.g. a diffusers UNet2DConditionModel (or a pipeline's `.unet`)
    fuse : bool, apply the fusions of shapetune/fusions.py (GroupNorm+SiLU, conv/linear + residual,
        linear + gelu; see the module docstring)
    fuse_qkv : bool (with `fuse`), pack each patched Attention's to_q/to_k/to_v (or to_k/to_v) weights
        into one storage so they run as one GEMM (kernels/qkv.py); a later patch call packs again where
        the packing was broken (e.g. a projection's Parameter replaced)
    fuse_ctxkv : bool (with `fuse_qkv`), the model's cross-attentions' k/v packed further into one storage
        served by one GEMM per forward (kernels/ctxkv.py)
    fuse_temb : bool (with `fuse`), pack the time-embedding projections of the model's ResnetBlock2Ds
        into one storage so one GEMM per forward serves them all (kernels/temb.py)
    fuse_add_norm : bool (with `fuse`), each transformer block's attention residual add and the LayerNorm
        that reads its sum as one add_layer_norm kernel where one is tuned (False: the add fused into the
        attention's output projection, the LayerNorm on its own); every patch call sets it anew
    fuse_lora_add : bool (with `fuse`), each PEFT LoRA Linear's scaled delta accumulated into its base
        output by lora_B's GEMM (kernels/lora.py) instead of PEFT's GEMM, scale and add; every patch
        call sets it anew
    fuse_norm_shift : bool (with `fuse`), where cuDNN runs a ResnetBlock2D's conv1, its bias and the time
        embedding added in the norm2 GroupNorm kernel where one is tuned with the shift (False: one
        conv2d(shift=) call, then norm2); every patch call sets it anew

    Returns
    -------
    PatchReport: modules patched per kind, and those left on torch's forward with the reason.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"kernels.patch: expected an nn.Module (e.g. pipe.unet), got {type(model).__name__}")
    table = patch_table()
    rules = {t: r for t, (r, _) in table.items()}
    report = PatchReport()
    for m in model.modules():
        if getattr(m, _MARK, None):
            continue
        rule = rule_for(m, rules)
        if rule is None:
            continue
        why = rule.unsupported(m) or (f"{rule.kind}: hooks on the module" if hooked(m) else None)
        if why is not None:
            report.skipped[why] += 1
        else:
            REPLACEMENTS[rule.kind](m, fuse, report)
    if fuse:
        for m in model.modules():
            _fuse_sites(m, report)
            if m.__dict__.get(_MARK) == "linear+residual" and type(m).__name__ == "BasicTransformerBlock":
                m.__dict__[_ADD_NORM] = fuse_add_norm
            if m.__dict__.get(_MARK) == "conv2d+residual" and type(m).__name__ == "ResnetBlock2D":
                m.__dict__[_NORM_SHIFT] = fuse_norm_shift
            if lora.is_lora_linear(m) and not hooked(m):
                if _MARK not in m.__dict__:
                    _set_forward(m, lora.forward, "lora_linear", report)
                m.__dict__[lora.ATTR] = fuse_lora_add
            if fuse_qkv and m.__dict__.get(_MARK) == "attention" and qkv.pack(m):
                report.patched["qkv_packed"] += 1
        if fuse_qkv and fuse_ctxkv and (n := ctxkv.pack(model)):
            report.patched["ctxkv_packed"] += n
        if fuse_temb and (n := temb_.pack(model)):
            report.patched["temb_packed"] += n
    return report


def _install_resnet(m: nn.Module, report: PatchReport) -> None:
    _set_forward(m, _resnet_forward, "conv2d+residual", report)


def _install_transformer_2d(m: nn.Module, report: PatchReport) -> None:
    if hasattr(type(m), "_get_output_for_continuous_inputs"):  # diffusers >= 0.28
        m._get_output_for_continuous_inputs = types.MethodType(_transformer_2d_output, m)
        setattr(m, _MARK, "conv2d+residual")
        report.patched["conv2d+residual"] += 1


def _install_gelu(m: nn.Module, report: PatchReport) -> None:
    _set_forward(m, _gelu_forward, "linear+gelu", report)


def _install_transformer_block(m: nn.Module, report: PatchReport) -> None:
    _set_forward(m, _transformer_block_forward, "linear+residual", report)


#: parent class name -> how patch fuses its shapetune/fusions.py residual / gelu sites (the
#: Attention's own to_out.0 residual is the AttnProcessor's, set when the Attention is patched)
_INSTALL = {"ResnetBlock2D": _install_resnet, "Transformer2DModel": _install_transformer_2d, "GELU": _install_gelu,
            "BasicTransformerBlock": _install_transformer_block}


def _fuse_sites(m: nn.Module, report: PatchReport) -> None:
    """Apply shapetune/fusions.py's sites inside module m."""
    sites = sites_of(m)
    for name, child in m._modules.items():  # fused where a SiLU followed it, no longer (the activation replaced)
        site = None if child is None else child.__dict__.get(_SILU_ACT)
        if site is not None and site[1]() is m and getattr(sites.get(name), "kind", None) != "silu":
            _unfuse_silu(child)
    for path, site in sites.items():
        if site.kind == "silu":
            report.patched["group_norm+silu"] += _fuse_silu(m, path, site.act)
    install = _INSTALL.get(type(m).__name__)
    if (install is not None and _MARK not in m.__dict__ and any(s.kind != "silu" for s in sites.values())
            and not hooked(m)):
        install(m, report)


def _ours(fn) -> bool:
    """fn is a forward kernels.patch bound to a module (kernels/patch.py's or kernels/lora.py's)."""
    return isinstance(fn, types.MethodType) and getattr(fn.__func__, "__module__", None) in (__name__, lora.__name__)


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
            ctxkv.unpack(m)
            qkv.unpack(m)
            proc = m.get_processor()
            m.set_processor(proc.fallback if isinstance(proc, AttnProcessor) else proc)
            continue
        temb_.unpack(m)
        # the class's forward back, also inside a library's wrapper put on the patched one after patch
        # (its hooks stay: popping the wrapper dropped them, a crash or a silently different output)
        replace_method(m, "forward", _ours, None)
        m.__dict__.pop("_get_output_for_continuous_inputs", None)
        if m.__dict__.pop("_shapetune_relaid", False):
            m.weight.data = m.weight.data.contiguous()
        for attr in ("_shapetune_silu", _SILU_ACT, "_shapetune_fused", _ADD_NORM, _NORM_SHIFT, lora.ATTR):
            m.__dict__.pop(attr, None)
    return n
