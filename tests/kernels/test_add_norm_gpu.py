"""On an NVIDIA GPU: a patched SD-sized BasicTransformerBlock (320 channels, 8 heads, cross-attention
over 77 x 768) whose attn1 -> norm2 and attn2 -> norm3 residual adds run as tuned add_layer_norm
bucket kernels, eagerly and under CUDA graphs of two token counts of one bucket, each call against the
same block in float64; then norm2's weight written in place reaches the captured graph.

Bound: the patched block's relative L2 error against float64 is at most twice eager fp16's plus 1e-4
(fp16 rounding of the sum s = a + r, which torch's add rounds the same way, and of the output).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs an NVIDIA GPU", allow_module_level=True)

diffusers = pytest.importorskip("diffusers")

from ._fused_parity import copies, extracted_buckets, graphed_calls, tuned_registry  # noqa: E402

D, HEADS, HEAD_DIM, CTX = 320, 8, 40, 768
TOKENS = (256, 200, 256, 200)  # 2 x tokens rows: 512 and 400, one pow2 bucket (257-512)


def _block() -> torch.nn.Module:
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(0)
    return BasicTransformerBlock(D, HEADS, HEAD_DIM, cross_attention_dim=CTX, activation_fn="geglu").eval()


def _inputs(tokens: int, seed: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return dict(hidden_states=torch.randn(2, tokens, D, device="cuda", generator=g).half(),
                encoder_hidden_states=torch.randn(2, 77, CTX, device="cuda", generator=g).half())


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    buckets = extracted_buckets(_block().half().cuda(), _inputs(256, 0), lambda w: w.op == "add_layer_norm")
    assert [b.ranges for b in buckets] == [{"m": (257, 512)}], [b.name for b in buckets]
    yield from tuned_registry(buckets, tmp_path_factory.mktemp("gpu-aln") / "tuning.db", ("add_norm_cuda",))


def test_patched_block_adds_and_normalizes_in_one_kernel_eagerly_and_under_graphs(registry):
    ref_block, eager, opt, check = copies(_block())

    x = _inputs(256, 1)
    registry.calls.clear()
    with torch.no_grad():
        check(opt(**x), x)
    assert registry.calls[("add_layer_norm", "tuned")] == 2  # attn1 -> norm2, attn2 -> norm3

    graphed = graphed_calls(opt, [_inputs(tokens, 10 + i) for i, tokens in enumerate(TOKENS)], check)
    assert graphed.stats["captured"] == 2 and graphed.stats["replayed"] >= 2, graphed.stats
    with torch.no_grad():
        # norm2's weight written in place (in every copy): the graph reads the parameter itself
        g = torch.Generator().manual_seed(3)
        dw = torch.randn(D, generator=g)
        for m in (ref_block, eager, opt):
            m.norm2.weight.add_(dw.to(m.norm2.weight))
        x = _inputs(256, 20)
        check(opt(**x), x)
    assert graphed.stats["captured"] == 2, graphed.stats  # replayed, not re-captured
