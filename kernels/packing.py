"""Weights of several nn.Linear stacked into one storage, each Parameter re-pointed at its rows: the
same Parameter objects and values, now views of one [sum N, K] matrix (and one [sum N] bias), so one
GEMM computes all their outputs and in-place writes to any of them reach it. kernels/qkv.py and
kernels/temb.py pack this way; each checks the aliasing on every call before it trusts it.
"""

from __future__ import annotations

import torch
from torch import nn


MARK = "_shapetune_patched"  # kernels.patch's instance attribute: the kind of patch applied


def plain_linear(m) -> bool:
    """m is an nn.Linear (exactly) that kernels.patch routed to shapetune::linear."""
    return type(m) is nn.Linear and m.__dict__.get(MARK) == "linear"


def holds_rows(linear: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, off: int, n: int) -> bool:
    """`linear` is a plain patched Linear whose weight is exactly rows off..off+n of `weight` (data
    pointer, shape, dtype, strides) and whose bias is those of `bias` (or both are None)."""
    if not plain_linear(linear):
        return False
    k, es = weight.shape[1], weight.element_size()
    w = linear.weight
    if w.data_ptr() != weight.data_ptr() + off * k * es or w.shape != (n, k) or w.dtype != weight.dtype \
            or w.stride() != (k, 1):
        return False
    b = linear.bias
    if bias is None:
        return b is None
    return b is not None and b.data_ptr() == bias.data_ptr() + off * es and b.shape == (n,) and b.dtype == bias.dtype


def stack_rows(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """Pack `linears` (one width, dtype and device; all with a bias or none) in order; returns the
    stacked weight, bias (or None) and each one's first row."""
    with torch.inference_mode(False), torch.no_grad():  # not inference tensors: the params stay writable
        w = torch.cat([m.weight.detach() for m in linears])
        b = torch.cat([m.bias.detach() for m in linears]) if linears[0].bias is not None else None
        offsets, off = [], 0
        for m in linears:
            n = m.weight.shape[0]
            m.weight.data = w[off:off + n]
            if b is not None:
                m.bias.data = b[off:off + n]
            offsets.append(off)
            off += n
    return w, b, offsets


def own_storage(linear: nn.Module | None, *packed: torch.Tensor | None) -> None:
    """Give `linear`'s weight and bias (or those of the Linear a PEFT layer wraps) their own storage
    again wherever they still live in one of the `packed` tensors."""
    if linear is not None and not isinstance(linear, nn.Linear):
        linear = getattr(linear, "base_layer", None)
    if not isinstance(linear, nn.Linear):
        return
    ptrs = {t.untyped_storage().data_ptr() for t in packed if t is not None}
    with torch.inference_mode(False), torch.no_grad():
        for t in (linear.weight, linear.bias):
            if t is not None and t.data.untyped_storage().data_ptr() in ptrs:
                t.data = t.data.clone()
