"""On an NVIDIA GPU: tune -> DB -> registry -> shapetune::group_norm / layer_norm in fp16.

Tolerance fp16: 1e-2 elementwise against torch on the same fp16 inputs in float64 (see
tests/ops/test_norm.py: one fp16 output rounding, fp32 statistics).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs an NVIDIA GPU", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402
from shapetune.ops.norm import group_norm_workload, layer_norm_workload  # noqa: E402
from kernels.registry import Registry, set_registry  # noqa: E402
from scheduler.tuner import TuneOptions, tune  # noqa: E402
from shapetune.target import detect  # noqa: E402

GN = (2, 40, 24, 640, 32, True)  # n, h, w, c, groups, silu: 960 positions, 20 channels per group
LN = (300, 320)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu-norm") / "tuning.db"
    n, h, w, c, g, silu = GN
    ws = [group_norm_workload(n, h * w, c, g, "float16", silu=silu), layer_norm_workload(*LN, "float16")]
    reps = tune(ws, detect("cuda"), path, TuneOptions(trials=6, batch=6))
    assert all(r.best is not None for r in reps), [r.by_status for r in reps]
    reg = Registry(db_path=path, target=detect("cuda"), require_faster=False)
    prev = set_registry(reg)
    yield reg
    set_registry(prev)


def test_tuned_fp16_group_norm_matches_torch(registry):
    n, h, w, c, g, silu = GN
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(n, c, h, w, device="cuda", generator=gen) + 0.5).half()
    x = x.contiguous(memory_format=torch.channels_last)
    wt = (1 + 0.25 * torch.randn(c, device="cuda", generator=gen)).half()
    b = (0.25 * torch.randn(c, device="cuda", generator=gen)).half()
    y = kernels.group_norm(x, g, wt, b, silu=silu)
    ref = F.silu(F.group_norm(x.double(), g, wt.double(), b.double(), 1e-5))
    torch.testing.assert_close(y.double(), ref, atol=1e-2, rtol=1e-2)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert registry.calls[("group_norm", "tuned")] == 1


def test_tuned_fp16_layer_norm_matches_torch(registry):
    m, c = LN
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = (torch.randn(m, c, device="cuda", generator=gen) + 0.5).half()
    wt = (1 + 0.25 * torch.randn(c, device="cuda", generator=gen)).half()
    b = (0.25 * torch.randn(c, device="cuda", generator=gen)).half()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y = kernels.layer_norm(x, wt, b)
    s.synchronize()
    ref = F.layer_norm(x.double(), (c,), wt.double(), b.double(), 1e-5)
    torch.testing.assert_close(y.double(), ref, atol=1e-2, rtol=1e-2)
    assert registry.calls[("layer_norm", "tuned")] == 1
