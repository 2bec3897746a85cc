"""On an NVIDIA GPU: a patched SD-sized ResnetBlock2D (320 -> 640 channels, a 1280-wide time embedding)
whose conv1 runs on cuDNN without its bias and whose norm2 adds that bias and the time embedding as it
reads, one tuned group_norm bucket kernel with the shift step, eagerly and under CUDA graphs of two
latent sizes of one bucket, each call against the same block in float64; then conv1's bias written in
place reaches the captured graph.

Bound: the patched block's relative L2 error against float64 is at most twice eager fp16's plus 1e-4
(eager rounds conv1 + bias and then + temb to fp16; the kernel adds both to cuDNN's fp16 output in fp32).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs an NVIDIA GPU", allow_module_level=True)

diffusers = pytest.importorskip("diffusers")

from ._fused_parity import copies, extracted_buckets, graphed_calls, tuned_registry  # noqa: E402

CI, CO, TEMB = 320, 640, 1280
SIDES = (32, 28, 32, 28)  # 1024 and 784 positions: one pow2 bucket (513-1024)


def _block() -> torch.nn.Module:
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    return ResnetBlock2D(in_channels=CI, out_channels=CO, temb_channels=TEMB).eval()


def _inputs(side: int, seed: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(2, CI, side, side, device="cuda", generator=g).half()
    return dict(input_tensor=x.contiguous(memory_format=torch.channels_last),
                temb=torch.randn(2, TEMB, device="cuda", generator=g).half())


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    buckets = extracted_buckets(_block().half().cuda(), _inputs(32, 0),
                                lambda w: w.op == "group_norm" and "shift" in w.epilogue)
    assert [b.ranges for b in buckets] == [{"n": (2, 2), "hw": (513, 1024)}], [b.name for b in buckets]
    yield from tuned_registry(buckets, tmp_path_factory.mktemp("gpu-gn-shift") / "tuning.db",
                              ("norm_cuda", "norm_cuda_split_bucket"))


def test_patched_resnet_adds_bias_and_temb_in_norm2_eagerly_and_under_graphs(registry):
    ref_block, eager, opt, check = copies(_block())

    x = _inputs(32, 1)
    registry.calls.clear()
    with torch.no_grad():
        check(opt(**x), x)
    assert registry.calls[("group_norm+shift", "tuned")] == 1

    graphed = graphed_calls(opt, [_inputs(side, 10 + i) for i, side in enumerate(SIDES)], check)
    assert graphed.stats["captured"] == 2 and graphed.stats["replayed"] >= 2, graphed.stats
    with torch.no_grad():
        # conv1's bias written in place (in every copy): the graph reads the parameter itself
        db = torch.randn(CO, generator=torch.Generator().manual_seed(3))
        for m in (ref_block, eager, opt):
            m.conv1.bias.add_(db.to(m.conv1.bias))
        x = _inputs(32, 20)
        check(opt(**x), x)
    assert graphed.stats["captured"] == 2, graphed.stats  # replayed, not re-captured
