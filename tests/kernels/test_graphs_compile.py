"""kernels/graphs.py and torch.compile in one process: the module-tree hooks GraphedCall installs are
global, so they must not make another, compiled model recompile.

Found on an H100 (2026-12-07, scripts/bench_e2e.py): torch.compile(mode="reduce-overhead") of an SD 1.5
UNet took 5.7 s per call when kernels.optimize had run earlier in the process, against 7.2 ms when it
had not. Dynamo traced the registration hook inside the UNet's forward, guarded on the tree epoch and
bumped it, so each call failed its own guard.
"""

from __future__ import annotations

import pytest

import kernels

diffusers = pytest.importorskip("diffusers")

TINY = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=24, attention_head_dim=2, norm_num_groups=8)


def test_a_compiled_model_compiles_once_after_optimize(empty_registry):
    import torch._dynamo
    from torch._dynamo.utils import counters

    x = dict(sample=torch.randn(2, 4, 8, 8), timestep=torch.tensor(500), encoder_hidden_states=torch.randn(2, 7, 24))
    opt = diffusers.UNet2DConditionModel(**TINY).eval()
    kernels.optimize(opt)  # installs the global registration hooks (for good)
    with torch.no_grad():
        opt(**x)
    kernels.restore(opt)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(diffusers.UNet2DConditionModel(**TINY).eval(), backend="eager", dynamic=False)
    with torch.no_grad():
        for _ in range(4):
            compiled(**x)
    assert counters["frames"]["total"] == 1, dict(counters["frames"])
    torch._dynamo.reset()
