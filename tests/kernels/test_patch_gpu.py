"""On an NVIDIA GPU: kernels.patch on a tiny diffusers UNet in fp16, with tuned CUDA kernels for its
attention and fused GroupNorm+SiLU workloads, against the same UNet run eagerly.

Tolerance: relative L2 <= 1e-2 on the UNet output. Each op is within fp16 rounding of float64
(scheduler/verify.py); eager fp16 itself differs from float64 by ~1e-3 here, and the two paths
round at different points (fused SiLU, P in fp16).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs an NVIDIA GPU", allow_module_level=True)

import kernels  # noqa: E402
from shapetune.ops.norm import eps_of, group_norm_workload  # noqa: E402
from kernels.registry import Registry, set_registry  # noqa: E402
from scheduler.extract import HANDLERS, extract_workloads  # noqa: E402
from scheduler.tuner import TuneOptions, tune  # noqa: E402
from shapetune.target import detect  # noqa: E402

diffusers = pytest.importorskip("diffusers")

TINY = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32)


def _unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(**TINY).to("cuda", torch.float16).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return dict(sample=torch.randn(2, 4, 16, 16, generator=g).to("cuda", torch.float16),
                timestep=torch.tensor(500, device="cuda"),
                encoder_hidden_states=torch.randn(2, 77, 64, generator=g).to("cuda", torch.float16))


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    unet = _unet()
    ops = extract_workloads(unet, _inputs(), "float16", handlers=HANDLERS)
    ws = [o.workload for o in ops if o.workload.op == "attention"]
    ws += [group_norm_workload(w.dim["n"], w.dim["hw"], w.dim["c"], w.dim["g"], "float16", eps_of(w), True)
           for w in (o.workload for o in ops if o.workload.op == "group_norm")][:2]
    path = tmp_path_factory.mktemp("gpu-patch") / "tuning.db"
    reps = tune(ws, detect("cuda"), path, TuneOptions(trials=3, batch=3,
                                                      templates=("attn_cuda_wmma", "norm_cuda")))
    assert all(r.best is not None for r in reps), [(r.workload.name, r.by_status) for r in reps]
    reg = Registry(db_path=path, target=detect("cuda"), require_faster=False)
    reg.prebuild()
    prev = set_registry(reg)
    yield reg
    set_registry(prev)


def test_patched_fp16_unet_matches_eager(registry):
    x = _inputs()
    eager = _unet()
    with torch.no_grad():
        ref = eager(**x).sample.double()
        unet = _unet().to(memory_format=torch.channels_last)
        kernels.patch(unet)
        out = unet(**{**x, "sample": x["sample"].contiguous(memory_format=torch.channels_last)}).sample.double()
    rel = float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))
    assert torch.isfinite(out).all() and rel < 1e-2, rel
    s = kernels.fallback_summary()
    assert s["attention"].get("tuned", 0) == 8, s["attention"]
    assert s["group_norm"].get("tuned", 0) >= 2, s["group_norm"]
