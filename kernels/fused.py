"""Fused linear ops: shapetune::linear_gelu, shapetune::linear_residual, shapetune::geglu.

Each runs the tuned kernel for its shape (shapetune.ops.linear epilogues, shapetune.ops.geglu) or,
without one, torch's own unfused ops, counting the reason like shapetune::linear. Inference only:
no autograd formula is registered (backward through them raises).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from shapetune.ops.linear import linear_workload

from shapetune.ops.geglu import geglu_workload

from .dispatch import SUPPORTED, plan, resolve
from .elementwise import gelu_gate
from .linear import _check
from scheduler.loader import call_on_current_stream

from .custom_op import call_op, register_recompute_autograd, shapetune_op


def _plan(op: str, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
          residual: Optional[torch.Tensor] = None) -> tuple:
    """The checks and the resolution of a fused GEMM call (dispatch.plan): ((op, outcome), the
    Resolution or None, (m, n_out, k)); x [..., k] -> [..., n_out]."""
    (_check_geglu if op == "geglu" else _check)(x, weight, bias)
    if op == "linear_residual":
        _check_residual(x, weight, residual)
    n, k = weight.shape
    n_out = n // 2 if op == "geglu" else n
    m = x.numel() // k if k else 0
    if op == "geglu":
        if bias is None:  # the tuned kernel's epilogue adds a bias: torch's ops, counted
            return ("geglu", "no_bias"), None, (m, n_out, k)
        extra, make = (), lambda: geglu_workload(m, n_out, k, SUPPORTED[x.dtype])
    else:
        epi = (("bias",) if bias is not None else ()) + (("gelu",) if op == "linear_gelu" else ("residual",))
        extra, make = (bias is not None,), lambda: linear_workload(m, n, k, SUPPORTED[x.dtype], epilogue=epi)
    sig = (op, m, n_out, k, x.dtype, x.device.type) + extra
    return resolve(op, sig, make, x.dtype, x.is_cuda, empty=m == 0 or n_out == 0) + ((m, n_out, k),)


def _key(op: str, x, weight, bias, residual=None) -> tuple:
    return (op, x.shape, x.dtype, x.device, weight.shape, weight.dtype, weight.device,
            None if bias is None else (bias.shape, bias.dtype, bias.device),
            None if residual is None else (residual.shape, residual.dtype, residual.device))


def _launch(res, x: torch.Tensor, m: int, n_out: int, k: int, middle: list) -> torch.Tensor:
    """The tuned kernel on x [m, k], `middle` (the tensors between x and out), out [m, n_out]."""
    out = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    call_on_current_stream(res.fn, [x.reshape(m, k).contiguous()] + middle + [out], x.is_cuda)
    return out.reshape(*x.shape[:-1], n_out)


def _weights(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> list:
    return [weight.contiguous()] + ([bias.contiguous()] if bias is not None else [])


# -- linear_gelu: gelu(x·Wᵀ + b) ---------------------------------------------------------------------
@shapetune_op("linear_gelu")
def _linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    _, res, (m, n, k) = plan(_key("linear_gelu", x, weight, bias), _plan, "linear_gelu", x, weight, bias)
    if res is None:
        return F.gelu(F.linear(x, weight, bias))
    return _launch(res, x, m, n, k, _weights(weight, bias))


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
    _, res, (m, n, k) = plan(_key("linear_residual", x, weight, bias, residual), _plan, "linear_residual", x, weight,
                             bias, residual)
    if res is None:
        return F.linear(x, weight, bias) + residual
    return _launch(res, x, m, n, k, _weights(weight, bias) + [residual.reshape(m, n).contiguous()])


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
    _, res, (m, f, k) = plan(_key("geglu", x, weight, bias), _plan, "geglu", x, weight, bias)
    if res is None:
        return _geglu_split(x, weight, bias)
    return _launch(res, x, m, f, k, [weight.contiguous().view(2, f, k), bias.contiguous().view(2, f)])


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
