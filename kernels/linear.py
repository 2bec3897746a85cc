"""shapetune::linear — y = x·Wᵀ + b through the tuned kernel for this shape, or torch's own."""

from __future__ import annotations

from typing import Optional

import torch

from shapetune.ops.linear import linear_workload

from .dispatch import SUPPORTED, plan, resolve
from scheduler.loader import call_on_current_stream

from .custom_op import TORCH_EXPR, call_op, shapetune_op


def _check(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    if weight.dim() != 2:
        raise ValueError(f"shapetune.linear: weight must be 2-D [out, in], got {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"shapetune.linear: x's last dim {tuple(x.shape)[-1:]} != weight in_features {weight.shape[1]}")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"shapetune.linear: dtypes differ (x {x.dtype}, weight {weight.dtype}"
                         f"{', bias ' + str(bias.dtype) if bias is not None else ''})")
    if x.device != weight.device or (bias is not None and bias.device != x.device):
        raise ValueError("shapetune.linear: x, weight and bias must be on one device")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"shapetune.linear: bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")


def _plan(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple:
    _check(x, weight, bias)
    n, k = weight.shape
    m = x.numel() // k if k else 0
    sig = ("linear", m, n, k, x.dtype, bias is not None, x.device.type)
    return resolve("linear", sig, lambda: linear_workload(m, n, k, SUPPORTED[x.dtype], bias is not None),
                   x.dtype, x.is_cuda, empty=m == 0 or n == 0) + ((m, n, k),)


@shapetune_op("linear")
def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    _, res, (m, n, k) = plan(("linear", x.shape, x.dtype, x.device, weight.shape, weight.dtype, weight.device,
                              None if bias is None else (bias.shape, bias.dtype, bias.device)), _plan, x, weight, bias)
    if res is None:
        return torch.nn.functional.linear(x, weight, bias)
    x2 = x.reshape(m, k).contiguous()
    args = [x2, weight.contiguous()] + ([bias.contiguous()] if bias is not None else [])
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    call_on_current_stream(res.fn, args + [out], x.is_cuda)
    return out.reshape(*x.shape[:-1], n)


@_linear.register_fake
def _(x, weight, bias):
    _check(x, weight, bias)
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    g2 = grad.reshape(-1, grad.shape[-1])
    gx = grad @ weight
    gw = g2.T @ x.reshape(-1, x.shape[-1])
    gb = g2.sum(0) if ctx.has_bias else None
    return gx, gw, gb


torch.library.register_autograd("shapetune::linear", _backward, setup_context=_setup_context)
TORCH_EXPR["linear"] = torch.nn.functional.linear


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x·Wᵀ + b with the tuned kernel for this shape and GPU (torch's op where none is faster).

    Parameters
    ----------
    x : Tensor [..., in_features], float16 (GPU) or float32 (CPU; other dtypes fall back)
    weight : Tensor [out_features, in_features], same dtype and device
    bias : Tensor [out_features] or None

    Returns
    -------
    Tensor [..., out_features], x's dtype. Non-contiguous inputs are copied to contiguous first.
    """
    return call_op("linear", x, weight, bias)
