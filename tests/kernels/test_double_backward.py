"""Second-order gradients through the shapetune ops (create_graph=True: a gradient penalty, a Hessian-vector
product). The ops' backward recomputes torch's expression and differentiates it (kernels/custom_op.py
register_recompute_autograd). Defect before: it differentiated detached copies without create_graph, so the
gradient it returned was a constant; every second-order term through the op was silently dropped (the
penalty's part of P.grad missing, x.grad None). Float32 on the CPU against the same loss in torch, float64;
the calls run torch's path (an empty registry): the op's autograd is the same on every path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels

C = 12
g = torch.Generator().manual_seed(0)
W_LN, B_LN = 1 + 0.25 * torch.randn(C, generator=g), 0.25 * torch.randn(C, generator=g)
W, B = torch.randn(10, C, generator=g) / 4, torch.randn(10, generator=g)

CASES = {  # name: (op, torch's expression, input shape)
    "layer_norm": (lambda x: kernels.layer_norm(x, W_LN, B_LN),
                   lambda x: F.layer_norm(x, (C,), W_LN.double(), B_LN.double()), (6, C)),
    "group_norm+silu": (lambda x: kernels.group_norm(x, 4, W_LN, B_LN, 1e-5, True),
                        lambda x: F.silu(F.group_norm(x, 4, W_LN.double(), B_LN.double(), 1e-5)), (2, C, 3, 5)),
    "linear_gelu": (lambda x: kernels.linear_gelu(x, W, B), lambda x: F.gelu(F.linear(x, W.double(), B.double())),
                    (6, C)),
}


def _penalized(fn, x0: torch.Tensor, p0: torch.Tensor, dtype):
    """grad of sum(fn(x) * P) w.r.t. x with create_graph, then its squared norm plus sum(P) backward:
    (x.grad, P.grad)."""
    x = x0.to(dtype, copy=True).requires_grad_()
    p = p0.to(dtype, copy=True).requires_grad_()
    (gx,) = torch.autograd.grad((fn(x) * p).sum(), x, create_graph=True)
    assert gx.requires_grad
    (gx.square().sum() + p.sum()).backward()
    return x.grad, p.grad


@pytest.mark.parametrize("name", sorted(CASES))
def test_second_order_terms_through_an_op(empty_registry, name):
    op, ref, shape = CASES[name]
    gen = torch.Generator().manual_seed(1)
    x0, p0 = torch.randn(shape, generator=gen), torch.randn(op(torch.randn(shape)).shape, generator=gen)
    gx, gp = _penalized(op, x0, p0, torch.float32)
    rx, rp = _penalized(ref, x0, p0, torch.float64)
    assert gx is not None and (rp - p0.double().new_ones(())).abs().max() > 1e-2  # the penalty's term matters
    torch.testing.assert_close(gp.double(), rp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx.double(), rx, atol=1e-4, rtol=1e-4)
