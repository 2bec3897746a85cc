"""One GEMM per forward for the K/V projections of a UNet's cross-attentions: every cross-attention of
a diffusers UNet projects the same encoder_hidden_states (the prompt's text embeddings) with its own
to_k and to_v, so the first one called in a forward computes them all, linear(ctx, W_all, b_all) ->
[B, S, sum 2C_i], and each attention takes its k and v columns (strided views, which SDPA takes as they
are). SD 1.5: 16 launch-bound [B*77 x 768] GEMMs (one per cross-attention after kernels/qkv.py's k/v
packing) become one.

    pack(unet)                 # at patch time, after kernels/qkv.py packed each attention's k/v
    kv = shared(attn, ctx)     # in kernels/patch.AttnProcessor, before kernels/qkv.projections: (k, v) or None

As kernels/qkv.py and kernels/temb.py: the Parameters are re-pointed at rows of one storage (each
attention's qkv packing now views its rows of it), so in-place writes reach the GEMM, and nothing
derived from a weight outlives one forward: the output is cached only within a forward of the packed
model (hooks open and drop it), keyed by the context tensor itself (a weak reference and its version;
identity alone for an inference tensor). The shared GEMM runs only while every member's to_k / to_v
still is a plain patched Linear holding its rows; a member's own call checks again before taking its
columns. A PEFT LoRA layer around a to_k / to_v keeps the packing (its base Linear holds the rows): the
group's GEMM adds each such member's deltas to its columns (kernels/qkv.add_lora_deltas), and a member
takes its columns only while its adapters' state is the one its deltas were added for. Anything else
(a replaced Parameter, a LoRA layer whose forward kernels/lora.py does not restate, autograd with
trainable projections, torch.compile tracing, a call with no context) returns None, and the attention
projects by its own packing or as diffusers does. Which attentions join is shapetune/fusions.py's `ctx_kv_groups`, the rule
workload extraction records the shared GEMM by.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from shapetune.fusions import KV, ctx_kv_groups

from . import qkv
from .custom_op import call_op
from .packing import ModelGroup, base_linear, holds_rows, regroup, stack_rows

_ATTR = "_shapetune_ctxkv"  # on each member attention: (its Group, its first row, its width C)


@dataclass(eq=False)
class Group(ModelGroup):
    """weight: [sum 2C, K], each member's to_k rows, then its to_v rows, in member order."""

    attr: ClassVar[str] = _ATTR

    def member_intact(self, attn: nn.Module, off: int, n: int) -> bool:
        return holds_rows(base_linear(attn.to_k), self.weight, self.bias, off, n) and \
            holds_rows(base_linear(attn.to_v), self.weight, self.bias, off + n, n)

    def compute(self, ctx: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The GEMM's output for ctx with each member's LoRA deltas added to its columns, and by member's
        first row the adapters' state those deltas are (qkv.lora_states; None: its columns are not served)."""
        out = call_op("linear", ctx, self.weight, self.bias)
        states = {}
        for ref, off in zip(self.members, self.offsets):
            a = ref()
            n = a.__dict__[_ATTR][2]
            st = qkv.lora_states(a, KV, ctx)
            if st is not None and any(st):
                qkv.add_lora_deltas(a, KV, ctx, (out[..., off:off + n], out[..., off + n:off + 2 * n]), st)
            states[off] = st
        return out, states


def pack(model: nn.Module) -> int:
    """Pack the k/v projections of each group of `model`'s cross-attentions (fusions.ctx_kv_groups over
    the attentions kernels/qkv.py packed as k/v), served within `model`'s forward; returns how many
    attentions this call packed (0: already packed)."""
    packed = 0
    for attns, old in regroup(dict(model.named_modules()), ctx_kv_groups(model, _packed_kv), _ATTR):
        w, b, offs = stack_rows([base_linear(p) for a in attns for p in (a.to_k, a.to_v)])
        if old is not None:
            old.remove_hooks()
        offsets = offs[0::2]
        group = Group(w, b, [weakref.ref(a) for a in attns], offsets)
        group.attach(model)
        for a, off in zip(attns, offsets):
            n = a.to_k.weight.shape[0]
            a.__dict__[_ATTR] = (group, off, n)
            # the attention's own k/v packing now views its rows of the shared storage
            a.__dict__[qkv._ATTR] = qkv.Packed(w[off:off + 2 * n], None if b is None else b[off:off + 2 * n],
                                               KV, (n, n), None)
        packed += len(attns)
    return packed


def _packed_kv(attn: nn.Module) -> bool:
    p = attn.__dict__.get(qkv._ATTR)
    return p is not None and p.names == KV and p.intact(attn)


def unpack(attn: nn.Module) -> None:
    """Forget this attention's shared packing and its group's hooks (kernels/qkv.unpack then gives its
    projections their own storage again)."""
    entry = attn.__dict__.pop(_ATTR, None)
    if entry is not None:
        entry[0].remove_hooks()


def shared(attn: nn.Module, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(to_k(ctx), to_v(ctx)) of this attention from its group's one GEMM; None where the packing does
    not hold (the caller projects by itself)."""
    entry = attn.__dict__.get(_ATTR)
    if entry is None or ctx is None:
        return None
    group, off, n = entry
    if not group.serve(attn, ctx, 3, itertools.chain(attn.to_k.parameters(), attn.to_v.parameters()), group.compute):
        return None
    out, states = group.out
    st = states[off]
    if st is None or st != qkv.lora_states(attn, KV, ctx):
        return None
    return out[..., off:off + n], out[..., off + n:off + 2 * n]
