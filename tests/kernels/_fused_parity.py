"""What the GPU tests of a block with a fused kernel share (test_add_norm_gpu.py, test_norm_shift_gpu.py):
each patched call against the same block in float64, within twice eager fp16's error plus 1e-4, eagerly
and under CUDA graphs of a sequence of inputs."""

from __future__ import annotations

import torch

from kernels.graphs import GraphedCall


def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


def checker(ref_block: torch.nn.Module, eager: torch.nn.Module):
    """check(out, x): `out`, the patched block's output on the inputs x (a dict of keyword arguments), is
    within twice `eager`'s relative L2 error (fp16) plus 1e-4 of `ref_block` (the block in float64)."""

    def check(out: torch.Tensor, x: dict) -> None:
        with torch.no_grad():
            ref = ref_block(**{k: v.double() for k, v in x.items()})
            bound = 2 * rel_l2(eager(**x), ref) + 1e-4
        assert rel_l2(out, ref) <= bound, (rel_l2(out, ref), bound)

    return check


def graphed_calls(opt: torch.nn.Module, xs: list[dict], check) -> GraphedCall:
    """`opt` under a GraphedCall (one CUDA graph per call signature), called on each of `xs` and each output
    checked; the GraphedCall, whose stats say what was captured and replayed."""
    graphed = GraphedCall(opt)
    with torch.no_grad():
        for x in xs:
            check(opt(**x), x)
    return graphed
