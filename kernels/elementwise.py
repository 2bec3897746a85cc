"""The elementwise passes the ops run around a vendor GEMM / convolution (shapetune/ops/elementwise.py):
not custom ops of their own but steps inside shapetune::geglu and shapetune::conv2d where those take
torch's GEMM / cuDNN path:

  gelu_gate(p)                 GEGLU's h * gelu(g) on F.linear's [.., 2f] output: the tuned kernel,
                               or torch's chunk + F.gelu + product (counted under "gelu_gate")
  bias_add_resolve(...)        the tuned bias (+ residual | + time embedding) pass for a conv's output,
                               or None (counted under "bias_add"): the conv then keeps cuDNN's own
                               bias and torch's adds, exactly eager's path

Shapes whose element count reaches 2**31 take torch's path (counted "too_large"): the kernels index
with 32-bit integers.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from scheduler.loader import call_on_current_stream
from shapetune.ops.elementwise import bias_add_workload, gelu_gate_workload

from .dispatch import SUPPORTED, plan, resolve
from .registry import Resolution

INT32_ELEMENTS = 2**31


def _torch_gelu_gate(p: torch.Tensor) -> torch.Tensor:
    h, g = p.chunk(2, dim=-1)
    return h * F.gelu(g)


def _gelu_gate_plan(p: torch.Tensor) -> tuple:
    f2 = p.shape[-1]
    f = f2 // 2
    m = p.numel() // f2 if f2 else 0
    if p.numel() >= INT32_ELEMENTS:
        return ("gelu_gate", "too_large"), None, (m, f)
    sig = ("gelu_gate", m, f, p.dtype, p.device.type)
    return resolve("gelu_gate", sig, lambda: gelu_gate_workload(m, f, SUPPORTED[p.dtype]), p.dtype, p.is_cuda,
                   empty=m == 0 or f == 0) + ((m, f),)


def gelu_gate(p: torch.Tensor) -> torch.Tensor:
    """y[.., f] = p[.., :f] * gelu(p[.., f:]) (exact GELU in fp32) for a GEGLU projection p[.., 2f]."""
    _, res, (m, f) = plan(("gelu_gate", p.shape, p.dtype, p.device), _gelu_gate_plan, p)
    if res is None:
        return _torch_gelu_gate(p)
    out = torch.empty(m, f, dtype=p.dtype, device=p.device)
    call_on_current_stream(res.fn, [p.reshape(m, 2, f).contiguous(), out], p.is_cuda)
    return out.reshape(*p.shape[:-1], f)


def bias_add_resolve(n: int, hw: int, c: int, x: torch.Tensor,
                     epilogue: tuple[str, ...]) -> tuple[tuple[str, str], Optional[Resolution]]:
    """The tuned bias_add for a conv output [n, c, hw] in x's dtype and device: (("bias_add", outcome)
    for the caller to count per call, the Resolution or None)."""
    if n * hw * c >= INT32_ELEMENTS:
        return ("bias_add", "too_large"), None
    sig = ("bias_add", n, hw, c, x.dtype, epilogue, x.device.type)
    return resolve("bias_add", sig, lambda: bias_add_workload(n, hw, c, SUPPORTED[x.dtype], epilogue), x.dtype,
                   x.is_cuda, empty=n * hw * c == 0)


def run_bias_add(res: Resolution, y: torch.Tensor, bias: torch.Tensor, extra: Optional[torch.Tensor]) -> None:
    """y += bias (+ extra) in place, all in the kernel's layout: y [n, hw, c] contiguous, bias [c],
    extra the residual [n, hw, c] or the shift [n, c] (contiguous), or None.

    The kernel gets y as both its input x and its output (the signature marks them __restrict__ /
    noalias): each element is read and then written by the same thread / loop iteration and by no
    other, so no reordering the compiler may do across distinct addresses changes what is read. The
    verified kernel ran with separate buffers; tests/ops/test_elementwise.py checks the in-place call."""
    args = [y, bias.contiguous()] + ([extra.contiguous()] if extra is not None else [])
    call_on_current_stream(res.fn, args + [y], y.is_cuda)
