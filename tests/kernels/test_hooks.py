"""Modules whose call runs more than their forward: torch forward hooks, diffusers' hooks
(`diffusers.hooks`: its caches, layerwise casting, offloading and pyramid attention broadcast wrap a
module's forward) and accelerate's. On the CPU, a tiny UNet patched against an eager twin given the same
hooks.

Defects before: kernels.patch replaced a hooked module's forward (dropping the diffusers hook that wrapped
it) or its parent's restated forward skipped its call (the FeedForward's, an Attention's), so the hooks
did not run and the patched model silently differed from eager; and kernels.graphs captured a tree whose
hooks decide per call what runs (a stateful cache), which a replay would skip.
"""

from __future__ import annotations

import pytest
import torch

import kernels

pytest.importorskip("diffusers")
from diffusers.hooks import HookRegistry, ModelHook  # noqa: E402

from ._tiny_unet import TOL, inputs, matches_eager_that_the_change_moved, pair  # noqa: E402

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
FF = "up_blocks.1.attentions.0.transformer_blocks.0.ff"
GEGLU_PROJ = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"
CONV = "down_blocks.0.resnets.0.conv2"


class Scale(ModelHook):
    """Scales the module's output, by a factor that grows with each call where stateful (what a cache's
    per-call decisions look like from outside)."""

    def __init__(self, factor: float, stateful: bool = False):
        super().__init__()
        self.factor, self.calls = factor, 0
        self._is_stateful = stateful

    def post_forward(self, module, output):
        self.calls += 1
        return output * (self.factor + (0.1 * self.calls if self._is_stateful else 0.0))

    def reset_state(self, module):
        self.calls = 0
        return module


def _diffusers_hook(model, path: str, hook: ModelHook) -> None:
    HookRegistry.check_if_exists_or_initialize(dict(model.named_modules())[path]).register_hook(hook, "scale")


def _hook_alike(eager, opt) -> None:
    for m in (eager, opt):
        _diffusers_hook(m, ATTN, Scale(1.5))
        _diffusers_hook(m, CONV, Scale(0.5))
        dict(m.named_modules())[FF].register_forward_hook(lambda _m, _i, out: out * 2)
        # GEGLU's projection: the patched GEGLU read its weight directly and skipped the hook (before)
        dict(m.named_modules())[GEGLU_PROJ].register_forward_hook(lambda _m, _i, out: out * 0.5)


def test_patch_leaves_hooked_modules_on_their_own_call(empty_registry):
    eager, opt = pair()
    _hook_alike(eager, opt)
    rep = kernels.patch(opt)
    mods = dict(opt.named_modules())
    assert "_shapetune_patched" not in mods[ATTN].__dict__ and "_shapetune_patched" not in mods[CONV].__dict__
    assert rep.skipped["attention: hooks on the module"] == 1 and rep.skipped["conv2d: hooks on the module"] == 1
    matches_eager_that_the_change_moved(eager, opt, 1e-2)  # the hooks matter


def test_graphs_step_aside_for_a_diffusers_hook_added_after_optimize(empty_registry):
    """kernels.optimize, then a stateful diffusers hook on an attention: from the next call on, the model
    runs the patched eager path counted `hooks` (on the CPU it ran counted `cpu` before: the tree looked
    unchanged); removing the hook gives the graphs back."""
    eager, opt = pair()
    rep = kernels.optimize(opt)
    g = rep.components["model"].graphs["forward"]
    x = inputs()
    with torch.no_grad():
        opt(**x)
        assert g.stats["cpu"] == 1 and not g.stats["hooks"]
        for m in (eager, opt):
            _diffusers_hook(m, ATTN, Scale(1.0, stateful=True))
        for _ in range(2):  # the hook's state moves on every call: each output is eager's for that call
            torch.testing.assert_close(opt(**x).sample, eager(**x).sample, **TOL)
        assert g.stats["hooks"] == 2
        for m in (eager, opt):
            dict(m.named_modules())[ATTN]._diffusers_hook.remove_hook("scale")
        opt(**x)
    assert g.stats["hooks"] == 2 and g.stats["cpu"] == 2


def test_a_gelu_feedforwards_hooked_projection_runs_as_a_module(empty_registry):
    """A FeedForward with diffusers' GELU ("gelu"): the patched GELU ran linear_gelu on its projection's
    weight directly and skipped a hook on that projection (before); now a hooked projection is called."""
    from diffusers.models.attention import FeedForward

    torch.manual_seed(0)
    eager = FeedForward(16, activation_fn="gelu").eval()
    opt = FeedForward(16, activation_fn="gelu").eval()
    opt.load_state_dict(eager.state_dict())
    for m in (eager, opt):
        m.net[0].proj.register_forward_hook(lambda _m, _i, out: out * 0.5)
    kernels.patch(opt)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(opt(x), eager(x), **TOL)


# -- hooks registered after patch (defect: the fused paths checked for hooks at patch time only) ----------
BLOCK = "down_blocks.0.attentions.0.transformer_blocks.0"
AFTER_PATCH = [f"{BLOCK}.attn1.to_out.0", f"{BLOCK}.attn1.to_out.1", f"{BLOCK}.attn1.to_q", f"{BLOCK}.attn2.to_k",
               f"{BLOCK}.ff.net.2", f"{BLOCK}.ff.net.0.proj", "down_blocks.0.attentions.0.proj_out",
               "down_blocks.0.resnets.0.time_emb_proj", "down_blocks.0.resnets.0.conv1", "down_blocks.0.resnets.0.conv2",
               "down_blocks.0.resnets.0.norm1", "down_blocks.0.resnets.0.nonlinearity"]


@pytest.mark.parametrize("path", AFTER_PATCH, ids=lambda p: p.replace(BLOCK, "block").split("_blocks.0.")[-1])
def test_a_torch_hook_registered_after_patch_runs(empty_registry, path):
    """A forward hook registered on both twins after kernels.patch: the patched model's fused paths (packed
    q/k/v, k/v and time-embedding GEMMs, linear_residual, geglu, conv2d(residual=), GroupNorm + SiLU) call
    the hooked module instead of reading its weights (before: its hook never ran, or for the GroupNorm the
    SiLU was applied twice: every element differed)."""
    eager, opt = pair()
    kernels.patch(opt)
    for m in (eager, opt):
        dict(m.named_modules())[path].register_forward_hook(lambda _m, _i, out: out * 2)
    matches_eager_that_the_change_moved(eager, opt, 1e-3)  # the hook matters


def test_a_silu_pre_hook_after_patch_sees_the_norms_output(empty_registry):
    """A forward pre-hook on the SiLU fused into the GroupNorm before it: the SiLU runs on its own again and
    the hook sees the norm's output (before: it saw the fused norm's SiLU output, and the SiLU ran twice)."""
    path = "down_blocks.0.resnets.0.nonlinearity"
    eager, opt = pair()
    kernels.patch(opt)
    seen = {"eager": [], "opt": []}
    for name, m in (("eager", eager), ("opt", opt)):
        dict(m.named_modules())[path].register_forward_pre_hook(
            lambda _m, args, name=name: seen[name].append(args[0].detach().clone()) and None)
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(opt(**x).sample, eager(**x).sample, **TOL)
    assert len(seen["opt"]) == len(seen["eager"]) == 3  # after norm1, on the time embedding, after norm2
    for got, ref in zip(seen["opt"], seen["eager"]):
        torch.testing.assert_close(got, ref, **TOL)


def test_diffusers_layerwise_casting_enabled_after_patch(empty_registry):
    """enable_layerwise_casting after patch (diffusers hooks on every leaf, casting weights around each call):
    the fused paths call the hooked modules (before: ValueError from the conv op, fp8 weights read directly)."""
    eager, opt = pair()
    kernels.patch(opt)
    for m in (eager, opt):
        m.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(opt(**x).sample, eager(**x).sample, **TOL)


def test_graphs_step_aside_for_torch_hooks_inside_the_tree(empty_registry):
    """kernels.optimize, then a torch forward hook on an inner module (and then one of torch's global module
    hooks): the calls run the patched eager path counted `hooks`, where a replay would skip the hook's Python
    (before: the tree looked unchanged, counted `cpu` here, a replay on the GPU); removing the hook gives the
    graph path back. The root's own hooks run around the graph and change nothing."""
    from torch.nn.modules.module import register_module_forward_hook

    eager, opt = pair()
    rep = kernels.optimize(opt)
    g = rep.components["model"].graphs["forward"]
    x = inputs()
    calls = []
    with torch.no_grad():
        opt(**x)
        root = opt.register_forward_hook(lambda *_: calls.append("root"))
        opt(**x)
        assert g.stats["cpu"] == 2 and not g.stats["hooks"] and calls == ["root"]
        h = dict(opt.named_modules())[ATTN].register_forward_hook(lambda *_: calls.append("inner"))
        opt(**x)
        assert g.stats["hooks"] == 1 and calls[-2:] == ["inner", "root"]
        h.remove()
        opt(**x)
        assert g.stats["hooks"] == 1 and g.stats["cpu"] == 3
        h = register_module_forward_hook(lambda *_: None)
        try:
            opt(**x)
        finally:
            h.remove()
        assert g.stats["hooks"] == 2
        root.remove()


def test_restore_keeps_the_hooks_a_library_added_after_optimize(empty_registry):
    """diffusers hooks registered after kernels.optimize (a ModelHook on the output norm, layerwise casting on
    the whole UNet) wrap the patched forwards. Defect before: restore popped each module's instance forward,
    which was the hooks' wrapper: the ModelHook silently vanished and layerwise casting crashed (a bf16 weight
    read as stored). Now the class's forward replaces the patched one inside the wrapper: after restore the
    model matches eager with the same hooks, and no patched forward is left."""
    def _ours(fn) -> bool:  # a forward bound by kernels.patch
        return getattr(getattr(fn, "__func__", None), "__module__", "").startswith("kernels.")

    eager, opt = pair()
    kernels.optimize(opt)
    for m in (eager, opt):
        _diffusers_hook(m, "conv_norm_out", Scale(1.5))
        m.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(opt(**x).sample, eager(**x).sample, **TOL)
        kernels.restore(opt)
        torch.testing.assert_close(opt(**x).sample, eager(**x).sample, atol=0, rtol=0)
    for m in opt.modules():
        refs = getattr(m.__dict__.get("_diffusers_hook"), "_fn_refs", ())
        assert not _ours(m.__dict__.get("forward")) and not any(_ours(r.forward) for r in refs)
