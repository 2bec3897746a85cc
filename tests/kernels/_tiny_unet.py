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


def outputs(eager, opt, registry, x: dict):
    """(eager's output, opt's output) on inputs x without autograd, the registry counting opt's calls only."""
    with torch.no_grad():
        ref = eager(**x).sample
        registry.calls.clear()
        return ref, opt(**x).sample


def matches_eager_that_the_change_moved(eager, opt, moved_by: float) -> None:
    """opt's output on inputs() matches eager's (TOL), and eager's differs from an unchanged twin's by more
    than `moved_by` (what both were given, hooks or a processor, matters)."""
    x = inputs()
    with torch.no_grad():
        ref, base = eager(**x).sample, pair()[0](**x).sample
        torch.testing.assert_close(opt(**x).sample, ref, **TOL)
    assert (ref - base).abs().max() > moved_by


def patched(registry, **patch_kw):
    """(eager, opt): a fresh pair, opt patched (kernels.patch with `patch_kw`) and its output on inputs()
    matching eager's (TOL); the registry counting opt's calls of that forward only."""
    import kernels

    eager, opt = pair()
    kernels.patch(opt, **patch_kw)
    ref, out = outputs(eager, opt, registry, inputs())
    torch.testing.assert_close(out, ref, **TOL)
    return eager, opt


def linear_calls(registry) -> int:
    return sum(n for (op, _), n in registry.calls.items() if op == "linear")


CHANGES = ["inplace_data", "copy_", "replace_data", "lora"]


def weight_change(change: str, eager, opt, target: str, x: dict):
    """Run `opt`, then change the Linear at module path `target` alike in both models (`change`: its weight
    written in place through .data; its bias (or weight, without one) by copy_; its weight's storage
    replaced; a PEFT LoRA wrapped around it, `opt` re-patched as optimize does after a tree change), and
    run both: (opt's output before, eager's after, opt's after, opt as it is now)."""
    import kernels

    g = torch.Generator().manual_seed(7)
    lin = dict(eager.named_modules())[target]
    # random per-channel changes: a constant one would be a shift a GroupNorm after it could remove
    dw = torch.randn(lin.weight.shape, generator=g)
    db = torch.randn(lin.bias.shape, generator=g) if lin.bias is not None else None
    with torch.no_grad():
        before = opt(**x).sample
        for m in (eager, opt):
            p = dict(m.named_modules())[target]
            if change == "inplace_data":
                p.weight.data.add_(dw)
            elif change == "copy_":
                if db is not None:
                    p.bias.copy_(p.bias + db)
                else:
                    p.weight.copy_(p.weight + dw)
            elif change == "replace_data":
                p.weight.data = (p.weight + dw).clone()
        if change == "lora":
            import peft

            cfg = peft.LoraConfig(r=2, lora_alpha=2, target_modules=[target], init_lora_weights=False)
            torch.manual_seed(5)
            eager = peft.inject_adapter_in_model(cfg, eager)
            torch.manual_seed(5)
            opt = peft.inject_adapter_in_model(copy.deepcopy(cfg), opt)
            kernels.patch(opt)
        return before, eager(**x).sample, opt(**x).sample, opt
