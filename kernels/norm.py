"""shapetune::group_norm and shapetune::layer_norm through the tuned kernel for the shape, or torch's.

group_norm takes activations channels-last: a 4-D NCHW tensor in torch.channels_last memory format
(what diffusers passes once the model is channels_last: x.permute(0, 2, 3, 1) is then a contiguous
[N, H, W, C]) or a contiguous [N, HW, C]. Any other layout is first copied to channels-last; those
copies are counted as ("group_norm", "relayout_copy") in `fallback_summary()` (an extra count next
to the call's own outcome, not a fallback).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from shapetune.ops.norm import group_norm_workload, layer_norm_workload
from .dispatch import SUPPORTED, count, tuned
from scheduler.loader import call_on_current_stream

from .custom_op import call_op, register_recompute_autograd, shapetune_op


# -- group_norm -------------------------------------------------------------------------------------
def _check_gn(x: torch.Tensor, num_groups: int, weight, bias):
    if x.dim() not in (3, 4):
        raise ValueError(f"shapetune.group_norm: x must be [N, C, H, W] or [N, HW, C], got {tuple(x.shape)}")
    c = x.shape[1] if x.dim() == 4 else x.shape[2]
    if num_groups <= 0 or c % num_groups:
        raise ValueError(f"shapetune.group_norm: {c} channels not divisible by num_groups={num_groups}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.shape != (c,) or t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"shapetune.group_norm: {name} must be [{c}] {x.dtype} on {x.device}, "
                             f"got {tuple(t.shape)} {t.dtype} on {t.device}")


def _gn_torch(x, num_groups, weight, bias, eps, silu):
    """torch's own path, in the layout the op returns."""
    if x.dim() == 3:
        y = F.group_norm(x.permute(0, 2, 1), num_groups, weight, bias, eps).permute(0, 2, 1)
        y = y.contiguous()
    else:
        y = F.group_norm(x, num_groups, weight, bias, eps).contiguous(memory_format=torch.channels_last)
    return F.silu(y) if silu else y


def _gn_out_like(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 3:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    return torch.empty_like(x, memory_format=torch.channels_last)


@shapetune_op("group_norm")
def _group_norm(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                eps: float, silu: bool) -> torch.Tensor:
    _check_gn(x, num_groups, weight, bias)
    if x.dim() == 4:
        n, c, h, w = x.shape
        hw = h * w
    else:
        n, hw, c = x.shape
    is_gpu = x.is_cuda
    sig = ("group_norm", n, hw, c, num_groups, x.dtype, eps, silu, x.device.type)
    res = tuned("group_norm", sig, lambda: group_norm_workload(n, hw, c, num_groups, SUPPORTED[x.dtype], eps, silu),
                x.dtype, is_gpu, empty=x.numel() == 0, no_affine=weight is None or bias is None)
    if res is None:
        return _gn_torch(x, num_groups, weight, bias, eps, silu)
    if x.dim() == 4:
        if not x.is_contiguous(memory_format=torch.channels_last):
            count("group_norm", "relayout_copy")
            x = x.contiguous(memory_format=torch.channels_last)
        x3 = x.permute(0, 2, 3, 1).reshape(n, hw, c)  # a view: channels-last memory is [N, H, W, C]
    else:
        if not x.is_contiguous():
            count("group_norm", "relayout_copy")
        x3 = x.contiguous()
    out = _gn_out_like(x)
    out3 = out.permute(0, 2, 3, 1).reshape(n, hw, c) if x.dim() == 4 else out
    call_on_current_stream(res.fn, [x3, weight.contiguous(), bias.contiguous(), out3], is_gpu)
    return out


@_group_norm.register_fake
def _(x, num_groups, weight, bias, eps, silu):
    _check_gn(x, num_groups, weight, bias)
    return _gn_out_like(x)


# Backward through torch's own ops, recomputed (the forward kernel keeps no statistics).
register_recompute_autograd("group_norm", _gn_torch)


def group_norm(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """GroupNorm (optionally followed by SiLU, fused) with the tuned kernel for this shape and GPU.

    Parameters
    ----------
    x : Tensor [N, C, H, W] (best in torch.channels_last memory format) or [N, HW, C] contiguous,
        float16 (GPU) or float32 (CPU); other dtypes fall back to torch
    num_groups : int, dividing C
    weight, bias : Tensor [C], x's dtype and device (None: torch's path, counted "no_affine")
    eps : float
    silu : bool, apply y * sigmoid(y) after the affine transform

    Returns
    -------
    Tensor of x's shape and dtype: channels_last for a 4-D x, contiguous for a 3-D x.
    """
    return call_op("group_norm", x, num_groups, weight, bias, float(eps), bool(silu))


# -- layer_norm -------------------------------------------------------------------------------------
def _check_ln(x: torch.Tensor, weight, bias):
    if x.dim() < 1:
        raise ValueError("shapetune.layer_norm: x must have at least one dim")
    c = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.shape != (c,) or t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"shapetune.layer_norm: {name} must be [{c}] {x.dtype} on {x.device}, "
                             f"got {tuple(t.shape)} {t.dtype} on {t.device}")


@shapetune_op("layer_norm")
def _layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                eps: float) -> torch.Tensor:
    _check_ln(x, weight, bias)
    c = x.shape[-1]
    m = x.numel() // c if c else 0
    is_gpu = x.is_cuda
    sig = ("layer_norm", m, c, x.dtype, eps, x.device.type)
    res = tuned("layer_norm", sig, lambda: layer_norm_workload(m, c, SUPPORTED[x.dtype], eps),
                x.dtype, is_gpu, empty=m == 0, no_affine=weight is None or bias is None)
    if res is None:
        return F.layer_norm(x, (c,), weight, bias, eps).contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    call_on_current_stream(res.fn, [x.reshape(m, c).contiguous(), weight.contiguous(), bias.contiguous(),
                                    out.view(m, c)], is_gpu)
    return out


@_layer_norm.register_fake
def _(x, weight, bias, eps):
    _check_ln(x, weight, bias)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


register_recompute_autograd("layer_norm", lambda x, w, b, eps: F.layer_norm(x, (x.shape[-1],), w, b, eps))


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim with the tuned kernel for this shape and GPU.

    Parameters
    ----------
    x : Tensor [..., C], float16 (GPU) or float32 (CPU); other dtypes fall back to torch
    weight, bias : Tensor [C], x's dtype and device (None: torch's path, counted "no_affine")
    eps : float

    Returns
    -------
    Tensor [..., C], x's dtype, contiguous. Non-contiguous inputs are copied to contiguous first.
    """
    return call_op("layer_norm", x, weight, bias, float(eps))
