"""On an NVIDIA GPU: tune -> DB -> registry -> shapetune::conv2d, fp16 implicit GEMM on tensor cores.

Tolerance: fp16 output vs an fp32 torch reference on the same fp16 inputs: 1e-2 (fp16 rounding of
O(1) outputs; accumulation is fp32 on both sides).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs an NVIDIA GPU", allow_module_level=True)

import kernels  # noqa: E402
from shapetune.ops.conv import conv2d_workload  # noqa: E402
from kernels.registry import Registry, set_registry  # noqa: E402
from scheduler.tuner import TuneOptions, tune  # noqa: E402
from shapetune.target import detect  # noqa: E402

# (n, h, w, ci, co, kh, kw, stride, padding, bias, residual): a 3x3 with the residual fused, odd
# spatial size and channels that are not tile multiples (padding paths), and a strided 3x3
SHAPES = [(2, 24, 20, 64, 96, 3, 3, 1, 1, True, True), (1, 17, 15, 32, 48, 3, 3, 2, 1, True, False)]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu") / "tuning.db"
    ws = [conv2d_workload(*s[:9], dtype="float16", bias=s[9], residual=s[10]) for s in SHAPES]
    reps = tune(ws, detect("cuda"), path, TuneOptions(trials=6, batch=6, templates=("conv_cuda_wmma",)))
    assert all(r.best is not None for r in reps), [r.by_status for r in reps]
    reg = Registry(db_path=path, target=detect("cuda"), require_faster=False)
    prev = set_registry(reg)
    yield reg
    set_registry(prev)


def _operands(s, seed):
    n, h, w, ci, co, kh, kw, stride, pad, bias, res = s
    ho, wo = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
    g = torch.Generator(device="cuda").manual_seed(seed)
    cl = torch.channels_last
    x = torch.randn(n, ci, h, w, device="cuda", generator=g).half().contiguous(memory_format=cl)
    wt = (torch.randn(co, ci, kh, kw, device="cuda", generator=g) / (ci * kh * kw) ** 0.5).half()
    b = torch.randn(co, device="cuda", generator=g).half() if bias else None
    r = torch.randn(n, co, ho, wo, device="cuda", generator=g).half().contiguous(memory_format=cl) if res else None
    return x, wt, b, r


@pytest.mark.parametrize("s", SHAPES)
def test_tuned_fp16_conv_matches_reference(registry, s):
    for seed in (0, 1):
        x, wt, b, r = _operands(s, seed)
        y = kernels.conv2d(x, wt, b, s[7], s[8], r)
        ref = torch.nn.functional.conv2d(x.float(), wt.float(), b.float() if b is not None else None, s[7], s[8])
        if r is not None:
            ref = ref + r.float()
        assert y.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y.float(), ref, atol=1e-2, rtol=1e-2)
    assert registry.calls[("conv2d", "tuned")] >= 2, registry.calls


def test_runs_on_current_stream(registry):
    s = SHAPES[0]
    x, wt, b, r = _operands(s, 2)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        y = kernels.conv2d(x, wt, b, s[7], s[8], r)
        ref = torch.nn.functional.conv2d(x.float(), wt.float(), b.float(), s[7], s[8]) + r.float()
    stream.synchronize()
    torch.testing.assert_close(y.float(), ref, atol=1e-2, rtol=1e-2)


def test_opcheck_cuda(registry):
    s = SHAPES[1]
    x, wt, b, r = _operands(s, 3)
    torch.library.opcheck(torch.ops.shapetune.conv2d.default, (x, wt, b, s[7], s[8], r))
