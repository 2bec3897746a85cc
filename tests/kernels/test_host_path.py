"""The host path of a patched module run eagerly (issue 10 item 3): under no_grad / inference_mode a
call with the module's own nn.Parameter weights runs the op's implementation directly, not through
the custom-op dispatcher (~60 µs more per call on the CPU dev box: every patched module call took
that path because an nn.Parameter is not `type(x) is torch.Tensor`)."""

from __future__ import annotations

import torch
from torch import nn

import kernels
from kernels import custom_op
from shapetune.target import detect


def test_parameters_take_the_direct_path_without_autograd():
    lin = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert custom_op.direct_ok((x, lin.weight, lin.bias))
    with torch.inference_mode():
        assert custom_op.direct_ok((x, lin.weight, lin.bias))
    assert not custom_op.direct_ok((x, lin.weight, lin.bias))  # autograd must record: the dispatcher
    lin.requires_grad_(False)
    assert custom_op.direct_ok((x, lin.weight, lin.bias))


class _Sub(torch.Tensor):
    pass


def test_tensor_subclasses_still_go_through_the_dispatcher():
    x = torch.randn(3, 8).as_subclass(_Sub)
    with torch.no_grad():
        assert not custom_op.direct_ok((x, torch.randn(4, 8), None))


def test_a_patched_module_calls_the_implementation_directly(tmp_path, monkeypatch):
    prev = kernels.set_registry(kernels.Registry(db_path=tmp_path / "e.db", target=detect("llvm")))
    try:
        lin = nn.Linear(8, 4)
        kernels.patch(lin)
        seen = []
        raw = custom_op._RAW["linear"]
        monkeypatch.setitem(custom_op._RAW, "linear", lambda *a: seen.append(1) or raw(*a))
        with torch.no_grad():
            y = lin(torch.randn(3, 8))
        assert seen == [1] and y.shape == (3, 4)
    finally:
        kernels.set_registry(prev)
