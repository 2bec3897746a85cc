"""shapetune::attention: softmax(q kᵀ · scale) v through the tuned kernel for the shape, or torch SDPA.

Tensors are "bshd": q [B, Sq, H, D], k and v [B, Skv, H, D], the output [B, Sq, H, D] contiguous —
the memory of the to_q/to_k/to_v projections' outputs ([B, S, H*D]) as they come, and what to_out
takes back with no copy. `attention()` also accepts those 3-D [B, S, H*D] tensors with `heads`.
Inputs that are not contiguous (e.g. slices of a fused QKV projection) are copied first, counted as
("attention", "relayout_copy") in `fallback_summary()`. No mask, no dropout, no causal flag: SD's
attention has none; callers with a mask use torch's path (diffusers' processor decides, see patch).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from shapetune.ops.attention import attention_workload
from .dispatch import SUPPORTED, count, plan, resolve
from scheduler.loader import call_on_current_stream

from .custom_op import call_op, register_recompute_autograd, shapetune_op


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"shapetune.attention: q, k, v must be [B, S, H, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, _, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2:] != (h, d):
        raise ValueError(f"shapetune.attention: k and v must be [{b}, Skv, {h}, {d}], got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"shapetune.attention: q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/"
                         f"{v.dtype} on {q.device}/{k.device}/{v.device}")


def _torch(q, k, v, scale):
    """torch SDPA on the [B, H, S, D] views, as diffusers' AttnProcessor2_0 calls it."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return o.transpose(1, 2).contiguous()


def _plan(q, k, v, scale) -> tuple:
    _check(q, k, v)
    b, sq, h, d = q.shape
    skv = k.shape[1]
    sig = ("attention", b, sq, skv, h, d, q.dtype, scale, q.device.type)
    return resolve("attention", sig, lambda: attention_workload(b, sq, skv, h, d, SUPPORTED[q.dtype], scale),
                   q.dtype, q.is_cuda, empty=q.numel() == 0 or skv == 0)


@shapetune_op("attention")
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    _, res = plan(("attention", q.shape, q.dtype, q.device, k.shape, k.dtype, k.device, v.shape, v.dtype, v.device,
                   scale), _plan, q, k, v, scale)
    if res is None:
        return _torch(q, k, v, scale)
    if not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
        count("attention", "relayout_copy")
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    call_on_current_stream(res.fn, [q, k, v, out], q.is_cuda)
    return out


@_attention.register_fake
def _(q, k, v, scale):
    _check(q, k, v)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


# Backward through torch SDPA, recomputed (the forward kernel keeps no softmax statistics).
register_recompute_autograd("attention", _torch)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: Optional[int] = None,
              scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) v per batch and head, with the tuned kernel for this shape and GPU.

    Parameters
    ----------
    q : Tensor [B, Sq, H, D], or [B, Sq, H*D] with `heads`; float16 (GPU) or float32 (CPU), other
        dtypes fall back to torch SDPA
    k, v : Tensor [B, Skv, H, D] (or [B, Skv, H*D]), q's dtype and device
    heads : int, required for 3-D inputs
    scale : float, default 1/sqrt(D)

    Returns
    -------
    Tensor of q's shape (3-D in, 3-D out), contiguous.
    """
    flat = q.dim() == 3
    if flat:
        if not heads or q.shape[-1] % heads:
            raise ValueError(f"shapetune.attention: 3-D inputs need heads dividing {q.shape[-1]}, got {heads}")
        q = q.unflatten(-1, (heads, q.shape[-1] // heads))
        k = k.unflatten(-1, (heads, k.shape[-1] // heads))
        v = v.unflatten(-1, (heads, v.shape[-1] // heads))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out = call_op("attention", q, k, v, scale)
    return out.flatten(-2) if flat else out
