"""kernels.patch keeps each module's semantics where a configuration differs from SD's defaults. On the CPU,
float32, patched twins against eager ones. Defects before (each test fails on that code):
- an Attention made with scale_qk=False (diffusers then runs the classic AttnProcessor, scores scaled by the
  module's `scale`, 1) got 1/sqrt(head_dim) from the patched processor: every output element differed;
- a processor set before patch (IP-Adapter, custom diffusion, a model's own rotary or joint attention, a
  user's) was replaced by the patched one, which computed plain attention (silently, or crashed);
- nn.Conv2d's unbatched [C, H, W] input raised instead of running.
"""

from __future__ import annotations

import copy

import pytest
import torch

import kernels

pytest.importorskip("diffusers")
from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402

from ._tiny_unet import TOL, matches_eager_that_the_change_moved, pair  # noqa: E402


def test_an_attention_without_qk_scaling_keeps_the_modules_scale(empty_registry):
    torch.manual_seed(0)
    eager = Attention(query_dim=32, heads=4, dim_head=8, scale_qk=False).eval()
    opt = copy.deepcopy(eager)
    rep = kernels.patch(opt)
    assert rep.patched["attention"] == 1 and eager.scale == 1.0
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(opt(x), eager(x), **TOL)


class Halved(AttnProcessor2_0):
    """A user's processor: diffusers' SDPA attention, its output halved."""

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return super().__call__(attn, hidden_states, *args, **kwargs) * 0.5


def test_a_processor_set_before_patch_keeps_running(empty_registry):
    eager, opt = pair()
    for m in (eager, opt):
        m.set_attn_processor(Halved())
    rep = kernels.patch(opt)
    assert rep.skipped["attention: processor Halved"] == len(opt.attn_processors) == 8 and not rep.patched["attention"]
    assert all(type(p) is Halved for p in opt.attn_processors.values())
    matches_eager_that_the_change_moved(eager, opt, 1e-3)  # the processor matters


def test_a_conv_takes_an_unbatched_input(empty_registry):
    torch.manual_seed(0)
    eager = torch.nn.Conv2d(4, 8, 3, padding=1)
    opt = copy.deepcopy(eager)
    kernels.patch(opt)
    x = torch.randn(4, 6, 6, generator=torch.Generator().manual_seed(1))
    empty_registry.calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(opt(x), eager(x), **TOL)
    assert empty_registry.calls[("conv2d", "unsupported_input")] == 1
