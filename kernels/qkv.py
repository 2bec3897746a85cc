"""One GEMM for an attention's input projections: to_q, to_k and to_v (self-attention: all three read the
hidden states) or to_k and to_v (cross-attention: both read the context) as one linear call.

    pack(attn)                       # at patch time: the projections' weights become views of one storage
    q, k, v = projections(attn, x, ctx)   # per call: one linear over the packed rows, split (views)

Nothing is copied per call and nothing derived from a weight is kept. `pack` concatenates the weights
(and biases) once into one tensor and re-points each projection's Parameter at its rows (`param.data =
packed[rows]`: the same Parameter objects, the same values, now one storage). So an in-place write to
any projection (`copy_`, `load_state_dict`, a PEFT merge, `.data.add_`) writes into the packed storage
and the next fused call sees it, and a CUDA graph replaying the fused GEMM reads the same memory.

A PEFT LoRA layer wrapped around a projection (after patching or before) keeps the packing: its base
Linear holds the rows, the one GEMM computes the base outputs, and kernels/lora.py adds each active
adapter's delta into that projection's columns (lora_B's GEMM, beta = 1: what PEFT computes, counted
("lora_linear", "packed")). The adapters' state is read on every call.

On every call `projections` checks that each projection still is a plain patched nn.Linear, or a LoRA
layer around one, whose weight (and bias) is exactly its rows of the packed storage (data pointer,
shape, dtype, contiguity). Anything else — a replaced Parameter (`param.data = t`, `.to(...)` after
patching), a LoRA layer whose forward kernels/lora.py does not restate (merged, disabled, DoRA, ...),
autograd on with trainable projections, torch.compile tracing — returns None and the caller runs the
three projections as they are. `kernels.patch` packs again (a later patch call, or
the re-patch after a module-tree change) where the aliasing was broken; `unpack` gives every projection
its own storage back (safetensors refuses to save tensors that share memory).

Which projections pack, and which of them one call runs together, is shapetune/fusions.py's rule
(`qkv_group`, `qkv_members`), the one workload extraction reads too. The q/k/v it returns are strided
views of one [B, S, Nq + Nk + Nv] output (last dim contiguous), which torch SDPA takes as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import lora
from .custom_op import call_op
from .dispatch import count
from .packing import base_linear, holds_rows, own_storage, stack_rows

from shapetune.fusions import QKV, qkv_group, qkv_members

_ATTR = "_shapetune_qkv"


@dataclass
class Packed:
    """The packed storage of `names` (rows in that order) and where each projection's rows start."""

    weight: torch.Tensor  # [sum(sizes), in_features]
    bias: torch.Tensor | None  # [sum(sizes)] or None
    names: tuple[str, ...]
    sizes: tuple[int, ...]
    kv: tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...]] | None  # for QKV: the k/v rows alone

    def intact(self, attn: nn.Module) -> bool:
        """Each projection is a plain patched Linear, or a LoRA layer around one, whose weight (and bias) is
        its rows of the storage."""
        off = 0
        for name, n in zip(self.names, self.sizes):
            if not holds_rows(base_linear(getattr(attn, name, None)), self.weight, self.bias, off, n):
                return False
            off += n
        return True

    def trainable(self, attn: nn.Module) -> bool:
        return any(p.requires_grad for name in self.names for p in getattr(attn, name).parameters())


def pack(attn: nn.Module) -> bool:
    """Pack the projections of a diffusers Attention that share their input (q/k/v where all three take
    the same width, else k/v); True when this call packed them (False: already packed, or not packable)."""
    p = attn.__dict__.get(_ATTR)
    if p is not None and p.intact(attn):
        return False
    names = qkv_group(attn, lambda m: base_linear(m) is not None)
    if names is None:
        attn.__dict__.pop(_ATTR, None)
        return False
    w, b, _ = stack_rows([base_linear(getattr(attn, n)) for n in names])
    sizes = [getattr(attn, n).weight.shape[0] for n in names]
    kv = None
    if names == QKV:
        nq = sizes[0]
        kv = (w[nq:], None if b is None else b[nq:], tuple(sizes[1:]))
    attn.__dict__[_ATTR] = Packed(w, b, names, tuple(sizes), kv)
    return True


def unpack(attn: nn.Module) -> None:
    """Give each packed projection its own storage again (same values), and forget the packing."""
    p = attn.__dict__.pop(_ATTR, None)
    if p is None:
        return
    for name in p.names:
        own_storage(getattr(attn, name, None), p.weight, p.bias)


def lora_states(attn: nn.Module, names, x: torch.Tensor) -> tuple | None:
    """Per projection in `names` of a packing that holds (Packed.intact): () for a plain Linear,
    kernels/lora.state for a LoRA layer reading x (what its deltas add); None where one of them needs
    PEFT's own forward."""
    out = []
    for name in names:
        m = getattr(attn, name)
        st = () if type(m) is nn.Linear else lora.state(m, x)
        if st is None:
            return None
        out.append(st)
    return tuple(out)


def add_lora_deltas(attn: nn.Module, names, x: torch.Tensor, outs, states) -> None:
    """Add the deltas `states` (lora_states) describe to the projections' packed outputs `outs`."""
    for name, o, st in zip(names, outs, states):
        if st:
            lora.add_deltas(getattr(attn, name), x, o, [a for a, _ in st])
            count("lora_linear", "packed")


def projections(attn: nn.Module, x: torch.Tensor, ctx: torch.Tensor | None):
    """(to_q(x), to_k(c), to_v(c)) with c = ctx or x, the shared-input projections as one linear call (and
    LoRA layers' deltas added to their columns); None where the packing does not hold (the caller runs
    the projections as they are)."""
    p = attn.__dict__.get(_ATTR)
    if p is None or torch.compiler.is_compiling() or not p.intact(attn):
        return None
    if torch.is_grad_enabled() and p.trainable(attn):
        return None
    members = qkv_members(p.names, ctx is not None)
    c = x if ctx is None else ctx
    states = lora_states(attn, members, c)
    if states is None:
        return None
    if members == QKV:
        q, k, v = call_op("linear", x, p.weight, p.bias).split(p.sizes, -1)
        if any(states):
            add_lora_deltas(attn, members, x, (q, k, v), states)
        return q, k, v
    q = attn.to_q(x)
    w, b, sizes = p.kv if p.names == QKV else (p.weight, p.bias, p.sizes)
    k, v = call_op("linear", c, w, b).split(sizes, -1)
    if any(states):
        add_lora_deltas(attn, members, c, (k, v), states)
    return q, k, v
