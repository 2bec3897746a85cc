"""Odd calls of the serving ops on tuned shapes (issue 11 item 8): meta tensors get meta outputs
(the tuned kernel was handed them: a C++ stack trace), and a 3-D group_norm input, which torch reads
as [N, C, L] and the kernel as [N, HW, C], needs its layout named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from scheduler.tuner import TuneOptions, tune
from shapetune.ops.linear import linear_workload
from shapetune.ops.norm import group_norm_workload, layer_norm_workload
from shapetune.target import detect

N, C, L, G = 2, 8, 6, 4


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """linear, layer_norm and group_norm tuned on llvm (one trial each), served whatever their speed."""
    db = tmp_path_factory.mktemp("bad_input") / "t.db"
    ws = [linear_workload(16, 8, 16, "float32", bias=True), layer_norm_workload(16, 8, "float32"),
          group_norm_workload(N, L, C, G, "float32")]
    tune(ws, detect("llvm"), db, TuneOptions(trials=1, batch=1))
    reg = kernels.Registry(db_path=db, target=detect("llvm"), require_faster=False)
    prev = kernels.set_registry(reg)
    yield reg
    kernels.set_registry(prev)


def _served(reg, op):
    return reg.calls[(op, "tuned")]


def test_meta_tensors_get_meta_outputs(registry):
    meta = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
    y = kernels.linear(meta(2, 8, 16), meta(8, 16), meta(8))
    assert y.is_meta and y.shape == (2, 8, 8)
    y = kernels.layer_norm(meta(16, 8), meta(8), meta(8))
    assert y.is_meta and y.shape == (16, 8)
    y = kernels.group_norm(meta(N, L, C), G, meta(C), meta(C), layout="NLC")
    assert y.is_meta and y.shape == (N, L, C)
    # the same calls with data run the tuned kernels
    before = _served(registry, "linear")
    kernels.linear(torch.randn(2, 8, 16), torch.randn(8, 16), torch.randn(8))
    assert _served(registry, "linear") == before + 1


def test_a_3d_group_norm_input_needs_its_layout(registry):
    x = torch.randn(N, C, L)
    with pytest.raises(ValueError, match="layout='NCL' or layout='NLC'"):
        kernels.group_norm(x.transpose(1, 2).contiguous(), G, torch.ones(C), torch.zeros(C))
    with pytest.raises(ValueError, match="layout is for a 3-D x"):
        kernels.group_norm(x.unsqueeze(-1), G, torch.ones(C), torch.zeros(C), layout="NCL")


@pytest.mark.parametrize("silu", [False, True])
def test_3d_group_norm_either_layout_matches_torch(registry, silu):
    """torch's [N, C, L] (layout='NCL') and the kernel's [N, L, C] (layout='NLC'), both on the tuned kernel."""
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(N, C, L, generator=g), torch.randn(C, generator=g), torch.randn(C, generator=g)
    want = F.group_norm(x, G, w, b)
    want = F.silu(want) if silu else want
    before = _served(registry, "group_norm")
    torch.testing.assert_close(kernels.group_norm(x, G, w, b, silu=silu, layout="NCL"), want, atol=1e-4, rtol=1e-4)
    nlc = kernels.group_norm(x.transpose(1, 2).contiguous(), G, w, b, silu=silu, layout="NLC")
    torch.testing.assert_close(nlc, want.transpose(1, 2), atol=1e-4, rtol=1e-4)
    assert _served(registry, "group_norm") == before + 2 - 2 * silu  # the tuned workload has no SiLU


def test_patched_group_norm_module_still_reads_3d_as_torch(registry):
    """nn.GroupNorm patched keeps torch's [N, C, L] (kernels/patch.py names the kernel's layout)."""
    m = torch.nn.GroupNorm(G, C)
    x = torch.randn(N, C, L)
    want = m(x)
    kernels.patch(m)
    try:
        before = _served(registry, "group_norm")
        torch.testing.assert_close(m(x), want, atol=1e-4, rtol=1e-4)
        assert _served(registry, "group_norm") == before + 1
    finally:
        kernels.unpatch(m)


def _offset(shape, off: int, seed: int) -> torch.Tensor:
    """A contiguous tensor `off` elements into a larger buffer: its memory starts off a 16-byte boundary."""
    n = torch.Size(shape).numel()
    return torch.randn(n + off, generator=torch.Generator().manual_seed(seed))[off:].view(shape)


@pytest.mark.parametrize("off", [1, 3])
def test_inputs_off_a_16_byte_boundary_are_served(registry, off):
    """Defect before: the llvm norm kernels (aligned vector loads) segfaulted on an x or a weight whose memory
    started off a 16-byte boundary (a view into a buffer: `.contiguous()` keeps the offset). The launch now
    hands the kernel an aligned copy of such an argument; the tuned kernels still serve the calls."""
    x, w, b = _offset((16, 8), off, 1), _offset((8,), off, 2), torch.randn(8)
    assert x.data_ptr() % 16 and w.data_ptr() % 16
    before = _served(registry, "layer_norm")
    torch.testing.assert_close(kernels.layer_norm(x, w, b), F.layer_norm(x, (8,), w, b), atol=1e-4, rtol=1e-4)
    assert _served(registry, "layer_norm") == before + 1
    xg = _offset((N, L, C), off, 3)
    before = _served(registry, "group_norm")
    want = F.group_norm(xg.transpose(1, 2), G, w, b).transpose(1, 2)
    torch.testing.assert_close(kernels.group_norm(xg, G, w, b, layout="NLC"), want, atol=1e-4, rtol=1e-4)
    assert _served(registry, "group_norm") == before + 1
