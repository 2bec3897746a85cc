"""A patched float32 model run under torch.autocast (a common way to run a float32 pipeline in half precision).
On the CPU, autocast to bfloat16, a tiny UNet patched against its eager twin.

Defect before (found on an H100: tests/kernels/test_graphs_gpu.py's autocast test): the shapetune ops have no
autocast rule, so under autocast they met a float32 weight with a half-precision activation (an output of an
op autocast had cast) and raised "shapetune.linear: dtypes differ" (under kernels.optimize: the graph was not
captured, the eager patched path raised the same). Now, under autocast, an op whose floating inputs already have
the dtype autocast would compute it in (its lower precision for GEMMs, convs and attention; float32 for the
norms) runs as without autocast (tuned where served); any other call runs torch's own expression of the op,
which autocast casts as in eager, counted (op, "autocast"); the fused paths patch chooses per call (add +
LayerNorm, the conv's bias and time embedding inside the GroupNorm) stay off under autocast.
"""

from __future__ import annotations

import pytest
import torch

import kernels

pytest.importorskip("diffusers")

from ._tiny_unet import inputs, pair  # noqa: E402


def _run(m, x):
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        return m(**x).sample


def test_a_patched_float32_unet_under_autocast_matches_eager(empty_registry):
    eager, opt = pair()
    kernels.patch(opt)
    x = inputs()
    ref = _run(eager, x)
    empty_registry.calls.clear()
    out = _run(opt, x)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    with torch.no_grad():
        full = eager(**x).sample
    assert (ref.float() - full).abs().max() > 1e-3  # autocast changed the eager result: the check can fail
    for op in ("linear", "conv2d", "group_norm", "layer_norm"):
        assert empty_registry.calls[(op, "autocast")] > 0, op


def test_autocast_outputs_have_eagers_dtypes(empty_registry):
    """Per op: the output dtype autocast gives torch's op (a GEMM's in bfloat16, a norm's in float32)."""
    from kernels import conv2d, group_norm, layer_norm, linear

    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(5, generator=g)
    xc = torch.randn(2, 4, 6, 6, generator=g).to(memory_format=torch.channels_last)
    wc, bc = torch.randn(8, 4, 3, 3, generator=g), torch.randn(8, generator=g)
    gw, gb = torch.randn(8, generator=g), torch.randn(8, generator=g)
    with torch.autocast("cpu", torch.bfloat16):
        cases = [(linear(x, w, b), torch.nn.functional.linear(x, w, b)),
                 (conv2d(xc, wc, bc, 1, 1), torch.nn.functional.conv2d(xc, wc, bc, 1, 1)),
                 (group_norm(xc.bfloat16(), 2, gw[:4], gb[:4], 1e-5),
                  torch.nn.functional.group_norm(xc.bfloat16(), 2, gw[:4], gb[:4], 1e-5)),
                 (layer_norm(x.bfloat16(), gw, gb), torch.nn.functional.layer_norm(x.bfloat16(), (8,), gw, gb))]
    for got, ref in cases:
        assert got.dtype == ref.dtype
        torch.testing.assert_close(got, ref, atol=1e-2, rtol=1e-2)
