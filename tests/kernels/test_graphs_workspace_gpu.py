"""On an NVIDIA GPU: tuned GroupNorm bucket kernels whose statistics live in global scratch buffers
(norm_cuda_split_bucket, norm_cuda_rows) under CUDA graphs of two batch sizes of one bucket, replayed in
turns, each against float64 on fresh inputs.

The scratch buffers are the kernels' arguments, allocated per call by scheduler/workspaces.py's wrapper
(inside a capture: from the graph's pool), not pages of TVM's workspace pool, which frees a page to grow
it and so could pull memory from under a graph captured at the smaller size.

Tolerance fp16: 1e-2 elementwise (one fp16 output rounding, fp32 statistics; tests/ops/test_norm.py).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs an NVIDIA GPU", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import kernels  # noqa: E402
from kernels.graphs import GraphedCall  # noqa: E402
from kernels.registry import Registry, set_registry  # noqa: E402
from scheduler.tuner import TuneOptions, tune  # noqa: E402
from scheduler.workspaces import WithWorkspaces  # noqa: E402
from shapetune.buckets import DEFAULT  # noqa: E402
from shapetune.ops.norm import group_norm_workload  # noqa: E402
from shapetune.target import detect  # noqa: E402

C, G, H, W = 320, 32, 32, 32


@pytest.fixture(scope="module", params=["norm_cuda_split_bucket", "norm_cuda_rows"])
def registry(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu-ws") / "tuning.db"
    bucket = DEFAULT.bucket_of(group_norm_workload(3, H * W, C, G, "float16", silu=True))
    assert bucket.ranges.get("n") == (3, 4), bucket.name
    (rep,) = tune([bucket], detect("cuda"), path, TuneOptions(trials=3, batch=3, templates=(request.param,)))
    assert rep.best is not None, rep.by_status
    reg = Registry(db_path=path, target=detect("cuda"), require_faster=False)
    prev = set_registry(reg)
    yield reg
    set_registry(prev)


class Norm(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter((1 + 0.25 * torch.randn(C, generator=g)).half())
        self.bias = nn.Parameter((0.25 * torch.randn(C, generator=g)).half())

    def forward(self, x):
        return kernels.group_norm(x, G, self.weight, self.bias, silu=True)


def test_graphs_of_two_batch_sizes_replayed_in_turns_match_float64(registry):
    m = Norm().cuda()
    graphed = GraphedCall(m)
    gen = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        for n in (3, 4, 3, 4, 3):  # capture at 3, capture at 4 (larger scratch), then replays in turns
            x = (torch.randn(n, C, H, W, device="cuda", generator=gen) + 0.5).half()
            x = x.contiguous(memory_format=torch.channels_last)
            y = m(x)
            ref = F.silu(F.group_norm(x.double(), G, m.weight.double(), m.bias.double(), 1e-5))
            torch.testing.assert_close(y.double(), ref, atol=1e-2, rtol=1e-2)
    assert graphed.stats["captured"] == 2 and graphed.stats["replayed"] >= 5, graphed.stats
    assert registry.calls[("group_norm", "tuned")] >= 2
    res = [r for r in registry._cache.values() if getattr(r, "fn", None) is not None]
    assert res and all(isinstance(r.fn, WithWorkspaces) for r in res)  # the scratch buffers are arguments
