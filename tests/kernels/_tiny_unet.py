"""The tiny diffusers UNet the packing tests (test_temb.py, test_ctxkv.py) patch against an eager twin:
4 ResnetBlock2Ds with a time embedding, 4 transformer blocks (self- and cross-attention over a 7 x 24
context), float32 on the CPU."""

from __future__ import annotations

import copy

import torch

TOL = dict(atol=1e-5, rtol=1e-5)
OBSERVED = 1e-3  # a change counts as observed when the output moves by more than this
TINY = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=24, attention_head_dim=2, norm_num_groups=8)


def pair():
    """(eager, twin): two UNets with the same random weights."""
    import diffusers

    torch.manual_seed(0)
    u = diffusers.UNet2DConditionModel(**TINY).eval()
    return u, copy.deepcopy(u)


def inputs(seed=1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor(500),
                encoder_hidden_states=torch.randn(2, 7, 24, generator=g))


def linear_calls(registry) -> int:
    return sum(n for (op, _), n in registry.calls.items() if op == "linear")
