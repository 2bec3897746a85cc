"""On an NVIDIA GPU: a diffusers UNet (SD-like widths, 4 cross-attentions over a 77 x 768 context) in fp16,
optimized with its packings (kernels/qkv.py, kernels/temb.py, kernels/ctxkv.py: every cross-attention's
k/v from one GEMM per forward, SDPA on strided views of it), against a float64 reference of the same
weights, eagerly and under a CUDA graph; then one cross-attention's to_v changed in place: the graph's
replay sees it.

Tolerance: relative L2 <= 1e-2 on the UNet output against float64 (eager fp16 differs from float64 by
~1e-3 at these sizes; the packed GEMMs round like the unpacked ones, cuBLAS picking algorithms by size).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs an NVIDIA GPU", allow_module_level=True)

import kernels  # noqa: E402
from kernels import ctxkv  # noqa: E402

diffusers = pytest.importorskip("diffusers")

TINY = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(320, 640),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
BOUND = 1e-2


@pytest.fixture(autouse=True)
def registry(empty_cuda_registry):
    return empty_cuda_registry


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def test_shared_cross_kv_matches_float64_eager_and_graphed():
    torch.manual_seed(0)
    base = diffusers.UNet2DConditionModel(**TINY).eval()
    ref = copy.deepcopy(base).to("cuda", torch.float64)
    opt = copy.deepcopy(base).to("cuda", torch.float16).to(memory_format=torch.channels_last)
    rep = kernels.optimize(opt)
    assert rep.components["model"].patched.patched["ctxkv_packed"] == 4
    g = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(2):  # fresh inputs each round
        x = dict(sample=torch.randn(2, 4, 16, 16, generator=g, device="cuda"), timestep=torch.tensor(500, device="cuda"),
                 encoder_hidden_states=torch.randn(2, 77, 768, generator=g, device="cuda"))
        with torch.no_grad():
            want = ref(**{k: v.double() if v.is_floating_point() else v for k, v in x.items()}).sample
            half = {k: v.half() if v.is_floating_point() else v for k, v in x.items()}
            got = opt(**half).sample
            again = opt(**half).sample  # a replay
        assert _rel(got, want) <= BOUND and _rel(again, got) <= 1e-3
    assert rep.graph_stats()["model"]["replayed"] >= 1
    attn = [m for n, m in opt.named_modules() if n.endswith("attn2")][1]
    assert ctxkv._ATTR in attn.__dict__
    ref_attn = [m for n, m in ref.named_modules() if n.endswith("attn2")][1]
    with torch.no_grad():
        for m in (attn, ref_attn):
            m.to_v.weight.data.mul_(-1)
        want = ref(**{k: v.double() if v.is_floating_point() else v for k, v in x.items()}).sample
        after = opt(**half).sample
    assert _rel(after, want) <= BOUND and _rel(after, got) > 1e-2
