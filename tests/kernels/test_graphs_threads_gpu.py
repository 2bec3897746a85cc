"""On an NVIDIA GPU: CUDA graphs (kernels.graphs) called from several threads and streams at once. Each graph
has static input buffers and every graph of a device shares one memory pool, so two replays must never
overlap. Defects before (no lock, no cross-stream order; silently wrong results):
- thread B's inputs were copied into the static buffers while thread A was between its own copy and its
  replay, and A got the result for B's inputs;
- a call on another stream copied its inputs while the previous replay still ran on the first stream.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs an NVIDIA GPU", allow_module_level=True)

import kernels  # noqa: E402
from kernels.graphs import GraphedCall  # noqa: E402

diffusers = pytest.importorskip("diffusers")


class _Affine(nn.Module):
    def __init__(self, sleep_cycles: int = 0):
        super().__init__()
        self.sleep_cycles = sleep_cycles

    def forward(self, x):
        if self.sleep_cycles:  # GPU time inside the graph before it reads its input
            torch.cuda._sleep(self.sleep_cycles)
        return x * 2 + 1


def _x(seed: int) -> torch.Tensor:
    return torch.randn(1 << 16, generator=torch.Generator().manual_seed(seed)).cuda()


def test_a_second_thread_waits_for_the_first_threads_replay():
    """Thread A is held inside its replay (after copying its inputs) while thread B calls: B must wait."""
    m = _Affine().cuda()
    gc = GraphedCall(m)
    xa, xb = _x(1), _x(2)
    with torch.no_grad():
        m(xa)  # the capture (and its first replay)
    (key, g), = gc.graphs.items()
    replayed = gc.stats["replayed"]
    entered, b_called, seen = threading.Event(), threading.Event(), []

    class HeldReplay:
        def replay(self):
            if threading.current_thread().name == "A":
                entered.set()
                assert b_called.wait(30)
                time.sleep(0.3)  # B copies its inputs now, unless it waits
                seen.append(g.inputs[0].clone())
            g.graph.replay()

    gc.graphs[key] = dataclasses.replace(g, graph=HeldReplay())
    out = {}

    def run(name, x):
        with torch.no_grad():
            out[name] = m(x)

    a = threading.Thread(target=run, args=("A", xa), name="A")
    a.start()
    assert entered.wait(30)
    b = threading.Thread(target=lambda: (b_called.set(), run("B", xb)), name="B")
    b.start()
    a.join(30)
    b.join(30)
    torch.cuda.synchronize()
    assert torch.equal(seen[0], xa)  # A's replay read A's inputs
    torch.testing.assert_close(out["A"], xa * 2 + 1)
    torch.testing.assert_close(out["B"], xb * 2 + 1)
    assert gc.stats["replayed"] == replayed + 2


def test_a_call_on_another_stream_waits_for_the_replay_on_the_first():
    """The graph sleeps on the GPU before it reads its input: a call on a second stream, issued right after
    one on a first stream, must not copy its inputs into the static buffers before that replay is done."""
    m = _Affine(sleep_cycles=200_000_000).cuda()
    GraphedCall(m)
    xa, xb = _x(1), _x(2)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.no_grad():
        m(xa)  # the capture
        torch.cuda.synchronize()
        with torch.cuda.stream(s1):
            out_a = m(xa)
        with torch.cuda.stream(s2):
            out_b = m(xb)
    torch.cuda.synchronize()
    torch.testing.assert_close(out_a, xa * 2 + 1)
    torch.testing.assert_close(out_b, xb * 2 + 1)


def test_threads_calling_one_optimized_unet_each_get_their_own_result(empty_cuda_registry):
    """A tiny fp16 UNet through kernels.optimize, called by 4 threads 6 times each with their own inputs
    (one signature: one graph, replayed concurrently): every result equals that input's single-threaded
    result."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32).to("cuda", torch.float16).eval()
    kernels.optimize(unet)

    def x(seed):
        g = torch.Generator().manual_seed(seed)
        return dict(sample=torch.randn(2, 4, 16, 16, generator=g).to("cuda", torch.float16),
                    timestep=torch.tensor(500, device="cuda"),
                    encoder_hidden_states=torch.randn(2, 77, 64, generator=g).to("cuda", torch.float16))

    seeds = list(range(24))
    with torch.no_grad():
        ref = {s: unet(**x(s)).sample for s in seeds}  # one thread, graphed after the first call
    got, errors = {}, []

    def worker(mine):
        try:
            with torch.no_grad():
                for s in mine:
                    got[s] = unet(**x(s)).sample
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(seeds[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    torch.cuda.synchronize()
    assert not errors, errors
    for s in seeds:
        torch.testing.assert_close(got[s], ref[s], atol=1e-3, rtol=0, msg=f"input {s}")
