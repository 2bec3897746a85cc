"""An activation module replaced after kernels.patch (a user trying another nonlinearity, e.g.
`resnet.nonlinearity = nn.Mish()`). patch fused each GroupNorm with the SiLU after it (the norm applies SiLU,
the SiLU module passes its output through) and packed the resnets' time-embedding projections into one GEMM
that applies their SiLU to temb. On the CPU, a tiny UNet patched against an eager twin given the same change.

Defect before: the fused norms kept applying SiLU and the packed GEMM kept applying it to temb, so the new
module ran on SiLU's output (ResnetBlock2D relative error 0.09; the whole UNet differed everywhere). Now the
norm fuses only while its parent holds the SiLU it was fused with, the packed GEMM serves only resnets whose
nonlinearity is still a SiLU, and a later patch fuses the new module where it is a SiLU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kernels

pytest.importorskip("diffusers")
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402

from ._tiny_unet import TOL, inputs, matches_eager_that_the_change_moved, pair  # noqa: E402


def _replace(model, make) -> int:
    n = 0
    for m in model.modules():
        if type(m) is ResnetBlock2D:
            m.nonlinearity, n = make(), n + 1
    model.conv_act = make()
    return n


@pytest.mark.parametrize("make", [nn.Mish, nn.GELU, nn.Identity])
def test_an_activation_replaced_after_patch_runs_on_the_norms_own_output(empty_registry, make):
    eager, opt = pair()
    kernels.patch(opt)
    assert _replace(eager, make) == _replace(opt, make) == 8
    matches_eager_that_the_change_moved(eager, opt, 1e-3)


def test_one_resnets_activation_replaced(empty_registry):
    """Only the first resnet changes: the others keep their fusions (and the packed projection's SiLU)."""
    eager, opt = pair()
    kernels.patch(opt)
    for m in (eager, opt):
        m.down_blocks[0].resnets[0].nonlinearity = nn.Mish()
    matches_eager_that_the_change_moved(eager, opt, 1e-3)
    assert opt.down_blocks[1].resnets[0].norm1.__dict__.get("_shapetune_silu") is not None


def test_a_new_silu_is_fused_again_by_the_next_patch(empty_registry):
    """A fresh nn.SiLU in its place: correct at once (the norm stops applying SiLU, the new module applies it),
    and fused again, with the new module passing the norm's output through, after the next patch."""
    eager, opt = pair()
    kernels.patch(opt)
    blk = opt.down_blocks[0].resnets[0]
    blk.nonlinearity = nn.SiLU()
    x = inputs()
    with torch.no_grad():
        ref = eager(**x).sample
        torch.testing.assert_close(opt(**x).sample, ref, **TOL)
        report = kernels.patch(opt)
        assert report.patched["group_norm+silu"] == 2  # norm1 and norm2 of that resnet, with the new SiLU
        torch.testing.assert_close(opt(**x).sample, ref, **TOL)
        y = blk.norm1(torch.randn(2, 16, 8, 8))
        assert blk.nonlinearity(y) is y  # the norm applied SiLU: its new SiLU passes that output through


def test_the_next_patch_unfuses_a_norm_whose_silu_was_replaced(empty_registry):
    eager, opt = pair()
    kernels.patch(opt)
    for m in (eager, opt):
        _replace(m, nn.Mish)
    kernels.patch(opt)
    assert not any("_shapetune_silu" in m.__dict__ for m in opt.modules())
    matches_eager_that_the_change_moved(eager, opt, 1e-3)


def test_a_fused_norm_moved_to_another_parent_computes_its_own_output(empty_registry):
    """The fused GroupNorm taken out of its resnet (its place given a fresh GroupNorm) is a GroupNorm again
    wherever it is called."""
    _, opt = pair()
    kernels.patch(opt)
    blk = opt.down_blocks[0].resnets[0]
    norm = blk.norm1
    blk.norm1 = nn.GroupNorm(norm.num_groups, norm.num_channels, eps=norm.eps)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), nn.functional.group_norm(x, norm.num_groups, norm.weight, norm.bias,
                                                                     norm.eps), **TOL)
