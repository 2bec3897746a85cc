"""One GEMM per forward for the K/V projections of a UNet's cross-attentions: every cross-attention of
a diffusers UNet projects the same encoder_hidden_states (the prompt's text embeddings) with its own
to_k and to_v, so the first one called in a forward computes them all, linear(ctx, W_all, b_all) ->
[B, S, sum 2C_i], and each attention takes its k and v columns (strided views, which SDPA takes as they
are). SD 1.5: 16 launch-bound [B*77 x 768] GEMMs (one per cross-attention after kernels/qkv.py's k/v
packing) become one.

    pack(unet)                 # at patch time, after kernels/qkv.py packed each attention's k/v
    kv = shared(attn, ctx)     # in kernels/qkv.projections: (k, v) or None

As kernels/qkv.py and kernels/temb.py: the Parameters are re-pointed at rows of one storage (each
attention's qkv packing now views its rows of it), so in-place writes reach the GEMM, and nothing
derived from a weight outlives one forward: the output is cached only within a forward of the packed
model (hooks open and drop it), keyed by the context tensor itself (a weak reference and its version;
identity alone for an inference tensor). The shared GEMM runs only while every member's to_k / to_v
still is a plain patched Linear holding its rows; a member's own call checks again before taking its
columns. Anything else (a replaced Parameter, a LoRA layer, autograd with trainable projections,
torch.compile tracing, a call with no context) returns None, and the attention projects by its own
packing or as diffusers does. Which attentions join is shapetune/fusions.py's `ctx_kv_groups`, the rule
workload extraction records the shared GEMM by.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from shapetune.fusions import KV, ctx_kv_groups

from . import qkv
from .custom_op import call_op
from .packing import holds_rows, stack_rows

_ATTR = "_shapetune_ctxkv"  # on each member attention: (its Group, its first row, its width C)


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version


@dataclass(eq=False)
class Group:
    weight: torch.Tensor  # [sum 2C, K]: each member's to_k rows, then its to_v rows, in member order
    bias: torch.Tensor | None
    members: list  # weak references to the member attentions
    offsets: list[int]
    key: tuple | None = None  # (weakref to the context it was computed for, its version)
    out: torch.Tensor | None = field(default=None, repr=False)
    active: bool = False  # inside a forward of the packed model
    hooks: list = field(default_factory=list)

    def open(self, *_args) -> None:
        self.active, self.key, self.out = True, None, None

    def close(self, *_args) -> None:
        self.active, self.key, self.out = False, None, None

    def remove_hooks(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        self.close()

    def member_intact(self, attn: nn.Module, off: int, n: int) -> bool:
        return holds_rows(attn.to_k, self.weight, self.bias, off, n) and \
            holds_rows(attn.to_v, self.weight, self.bias, off + n, n)

    def intact(self) -> bool:
        for ref, off in zip(self.members, self.offsets):
            a = ref()
            if a is None or a.__dict__.get(_ATTR) is None or not self.member_intact(a, off, a.__dict__[_ATTR][2]):
                return False
        return True


def pack(model: nn.Module) -> int:
    """Pack the k/v projections of each group of `model`'s cross-attentions (fusions.ctx_kv_groups over
    the attentions kernels/qkv.py packed as k/v), served within `model`'s forward; returns how many
    attentions this call packed (0: already packed)."""
    mods = dict(model.named_modules())
    groups = ctx_kv_groups(model, _packed_kv)
    members = {n for g in groups for n in g}
    for name, m in mods.items():  # an attention that left its group (e.g. a LoRA around to_k)
        if name not in members and _ATTR in m.__dict__:
            m.__dict__[_ATTR][0].remove_hooks()
            del m.__dict__[_ATTR]
    packed = 0
    for names in groups:
        attns = [mods[n] for n in names]
        g0 = attns[0].__dict__.get(_ATTR)
        if g0 is not None and all(a.__dict__.get(_ATTR, (None,))[0] is g0[0] for a in attns) and g0[0].intact() \
                and len(g0[0].members) == len(attns):
            continue
        w, b, offs = stack_rows([p for a in attns for p in (a.to_k, a.to_v)])
        if g0 is not None:
            g0[0].remove_hooks()
        offsets = offs[0::2]
        group = Group(w, b, [weakref.ref(a) for a in attns], offsets)
        group.hooks = [model.register_forward_pre_hook(group.open),
                       model.register_forward_hook(group.close, always_call=True)]
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
    if entry is None or ctx is None or torch.compiler.is_compiling():
        return None
    group, off, n = entry
    if not group.active:
        return None
    if torch.is_grad_enabled() and (ctx.requires_grad or any(
            p.requires_grad for m in (attn.to_k, attn.to_v) for p in m.parameters())):
        return None
    key = group.key
    if key is None or key[0]() is not ctx or key[1] != _version(ctx):
        if not group.intact() or ctx.dim() != 3 or ctx.dtype != group.weight.dtype \
                or ctx.shape[-1] != group.weight.shape[1] or ctx.device != group.weight.device:
            return None
        group.out = call_op("linear", ctx, group.weight, group.bias)
        group.key = (weakref.ref(ctx), _version(ctx))
    elif not group.member_intact(attn, off, n):
        return None
    return group.out[..., off:off + n], group.out[..., off + n:off + 2 * n]
