"""On an NVIDIA GPU: an SD 1.5-shaped diffusers Attention (8 heads of 40, 4096 query tokens; cross-attention
over 77 tokens of 768) in fp16 with its q/k/v (or k/v) projections packed into one GEMM (kernels/qkv.py):
SDPA then reads strided views of one [B, S, 3C] output. Checked against a float64 reference of the
same module and against the unpacked patched path, eagerly and under a CUDA graph, with fresh
random inputs.

Tolerance: relative L2 <= 2e-3 against float64 (fp16 storage of q/k/v/o and fp16 GEMM outputs give
~5e-4 here); the packed and unpacked paths agree to the same bound (cuBLAS picks its algorithm by
size: the [M, 3C] GEMM is not bit-identical to three [M, C] ones).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs an NVIDIA GPU", allow_module_level=True)

import kernels  # noqa: E402
from kernels import qkv  # noqa: E402
from kernels.graphs import GraphedCall  # noqa: E402

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_processor import Attention  # noqa: E402

BOUND = 2e-3


@pytest.fixture(autouse=True)
def registry(empty_cuda_registry):
    return empty_cuda_registry


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("cross", [None, 768])
def test_packed_projections_match_float64_eager_and_graphed(cross):
    torch.manual_seed(0)
    ref = Attention(320, cross_attention_dim=cross, heads=8, dim_head=40).eval()
    for p in ref.parameters():  # O(1) outputs: weights ~ 1/sqrt(fan_in)
        p.data.normal_(0, 1 / p.shape[-1] ** 0.5)
    fp16 = copy.deepcopy(ref).to("cuda", torch.float16)
    unpacked = copy.deepcopy(fp16)
    assert kernels.patch(fp16).patched["qkv_packed"] == 1
    kernels.patch(unpacked, fuse_qkv=False)
    ref = ref.to("cuda", torch.float64)
    g = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(2):  # fresh inputs each round
        x = torch.randn(2, 4096, 320, generator=g, device="cuda")
        ctx = torch.randn(2, 77, cross, generator=g, device="cuda") if cross else None
        with torch.no_grad():
            want = ref(x.double(), encoder_hidden_states=None if ctx is None else ctx.double())
            xh, ch = x.half(), None if ctx is None else ctx.half()
            got = fp16(xh, encoder_hidden_states=ch)
            apart = unpacked(xh, encoder_hidden_states=ch)
        assert fp16.__dict__[qkv._ATTR].intact(fp16)
        assert _rel(got, want) <= BOUND and _rel(apart, want) <= BOUND
        assert _rel(got, apart) <= BOUND
    # the packed GEMM under a CUDA graph, then a weight changed in place: the replay sees it
    graphed = GraphedCall(fp16, "forward")
    with torch.no_grad():
        assert _rel(fp16(xh, encoder_hidden_states=ch), got) <= 1e-4  # the capture's replay
        assert _rel(fp16(xh, encoder_hidden_states=ch), got) <= 1e-4  # a replay
        for m in (fp16, ref):
            m.to_v.weight.data.mul_(-1)
        want = ref(x.double(), encoder_hidden_states=None if ctx is None else ctx.double())
        after = fp16(xh, encoder_hidden_states=ch)
    assert graphed.stats["replayed"] >= 2 and graphed.stats["captured"] == 1
    assert _rel(after, want) <= BOUND and _rel(after, got) > 0.1
