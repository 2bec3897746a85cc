"""Fused linear ops: shapetune::linear_gelu, shapetune::linear_residual, shapetune::geglu.

Each runs the tuned kernel for its shape (shapetune.ops.linear epilogues, shapetune.ops.geglu) or,
without one, torch's own unfused ops, counting the reason like shapetune::linear. Inference only:
no autograd formula is registered (backward through them raises).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from shapetune.ops.linear import linear_workload

from shapetune.ops.geglu import geglu_workload

from .dispatch import SUPPORTED, count, tuned
from .elementwise import gelu_gate
from .linear import _check
from scheduler.loader import call_on_current_stream

from .custom_op import call_op, register_recompute_autograd, shapetune_op


def _run(op: str, x: torch.Tensor, n_out: int, k: int, sig_extra: tuple, make_workload: Callable,
         kernel_args: Callable, fallback: Callable) -> torch.Tensor:
    """The tuned kernel for this call's signature, else fallback() (the reason counted under op).
    x [..., k] -> [..., n_out]; make_workload(m, dtype name), kernel_args(m) -> the tensors between
    x [m, k] and out [m, n_out]."""
    m = x.numel() // k if k else 0
    is_gpu = x.is_cuda
    sig = (op, m, n_out, k, x.dtype, x.device.type) + sig_extra
    res = tuned(op, sig, lambda: make_workload(m, SUPPORTED[x.dtype]), x.dtype, is_gpu, empty=m == 0 or n_out == 0)
    if res is None:
        return fallback()
    out = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    call_on_current_stream(res.fn, [x.reshape(m, k).contiguous()] + kernel_args(m) + [out], is_gpu)
    return out.reshape(*x.shape[:-1], n_out)


# -- linear_gelu: gelu(x·Wᵀ + b) ---------------------------------------------------------------------
@shapetune_op("linear_gelu")
def _linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    _check(x, weight, bias)
    n, k = weight.shape
    epi = ("bias", "gelu") if bias is not None else ("gelu",)
    return _run("linear_gelu", x, n, k, (bias is not None,),
                lambda m, dt: linear_workload(m, n, k, dt, epilogue=epi),
                lambda m: [weight.contiguous()] + ([bias.contiguous()] if bias is not None else []),
                lambda: F.gelu(F.linear(x, weight, bias)))


@_linear_gelu.register_fake
def _(x, weight, bias):
    _check(x, weight, bias)
    return x.new_empty(*x.shape[:-1], weight.shape[0])


# -- linear_residual: x·Wᵀ + b + r --------------------------------------------------------------------
def _check_residual(x, weight, residual):
    want = (*x.shape[:-1], weight.shape[0])
    if tuple(residual.shape) != want:
        raise ValueError(f"shapetune.linear_residual: residual must be {want}, got {tuple(residual.shape)}")
    if residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError("shapetune.linear_residual: residual must have x's dtype and device")


@shapetune_op("linear_residual")
def _linear_residual(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     residual: torch.Tensor) -> torch.Tensor:
    _check(x, weight, bias)
    _check_residual(x, weight, residual)
    n, k = weight.shape
    epi = ("bias", "residual") if bias is not None else ("residual",)
    return _run("linear_residual", x, n, k, (bias is not None,),
                lambda m, dt: linear_workload(m, n, k, dt, epilogue=epi),
                lambda m: [weight.contiguous()] + ([bias.contiguous()] if bias is not None else [])
                + [residual.reshape(m, n).contiguous()],
                lambda: F.linear(x, weight, bias) + residual)


@_linear_residual.register_fake
def _(x, weight, bias, residual):
    _check(x, weight, bias)
    _check_residual(x, weight, residual)
    return x.new_empty(*x.shape[:-1], weight.shape[0])


# -- geglu: h, g = (x·Wᵀ + b).chunk(2, -1); h * gelu(g) -------------------------------------------------
def _check_geglu(x, weight, bias):
    _check(x, weight, bias)
    if weight.shape[0] % 2:
        raise ValueError(f"shapetune.geglu: weight rows must be even (2 * f), got {weight.shape[0]}")


def _geglu_unfused(x, weight, bias):
    h, g = F.linear(x, weight, bias).chunk(2, dim=-1)
    return h * F.gelu(g)


def _geglu_split(x, weight, bias):
    """Without a tuned geglu kernel: torch's GEMM, then h * gelu(g) as one tuned pass where one serves
    this shape (kernels.elementwise.gelu_gate), else torch's two kernels."""
    return gelu_gate(F.linear(x, weight, bias))


@shapetune_op("geglu")
def _geglu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    _check_geglu(x, weight, bias)
    f2, k = weight.shape
    f = f2 // 2
    if bias is None:  # the tuned kernel's epilogue adds a bias: torch's ops, counted
        count("geglu", "no_bias")
        return _geglu_split(x, weight, bias)
    return _run("geglu", x, f, k, (),
                lambda m, dt: geglu_workload(m, f, k, dt),
                lambda m: [weight.contiguous().view(2, f, k), bias.contiguous().view(2, f)],
                lambda: _geglu_split(x, weight, bias))


@_geglu.register_fake
def _(x, weight, bias):
    _check_geglu(x, weight, bias)
    return x.new_empty(*x.shape[:-1], weight.shape[0] // 2)


# Backward through torch's unfused ops, recomputed.
register_recompute_autograd("linear_gelu", lambda x, w, b: F.gelu(F.linear(x, w, b)))
register_recompute_autograd("linear_residual", lambda x, w, b, r: F.linear(x, w, b) + r)
register_recompute_autograd("geglu", _geglu_unfused)


# -- public -----------------------------------------------------------------------------------------
def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = gelu(x·Wᵀ + b), exact (erf) GELU computed in fp32, in one kernel.

    x [..., in] float16 (GPU) / float32 (CPU); weight [out, in]; bias [out] or None; same dtype and
    device. Returns [..., out] in x's dtype.
    """
    return call_op("linear_gelu", x, weight, bias)


def linear_residual(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    residual: torch.Tensor) -> torch.Tensor:
    """y = x·Wᵀ + b + residual in one kernel (the add happens on the fp32 accumulator).

    x [..., in]; weight [out, in]; bias [out] or None; residual [..., out] (exactly the output's
    shape, no broadcasting); one dtype (float16 GPU / float32 CPU) and device. Returns [..., out].
    """
    return call_op("linear_residual", x, weight, bias, residual)


def geglu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """diffusers' GEGLU in one kernel: h, g = (x·Wᵀ + b).chunk(2, -1); y = h * gelu(g).

    x [..., in]; weight [2f, in] (GEGLU.proj.weight: rows [0, f) give h, [f, 2f) the gate);
    bias [2f] or None (torch's unfused ops then, counted ("geglu", "no_bias")); one dtype (float16 GPU /
    float32 CPU) and device. Returns [..., f]; the [.., 2f]
    projection is never materialized.
    """
    return call_op("geglu", x, weight, bias)
