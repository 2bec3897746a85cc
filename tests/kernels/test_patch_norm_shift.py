"""The patched ResnetBlock2D with group_norm's "shift" step: where cuDNN runs conv1 (no tuned conv serves
it), conv1 runs without its bias and norm2 normalizes conv1(h) + bias + temb as it reads, one kernel,
where one is tuned for the shape.

A tiny diffusers UNet (4 resnets with a time embedding and a biased conv1) patched against an eager twin
on the same weights, float32 on the CPU: the shift workloads scheduler.extract lists for it are tuned on
llvm (so extraction and the patch agree on what runs), then every resnet serves one per forward and the
output matches eager (1e-5: the kernel's statistics are fp32 sums in another order than torch's, and it
adds bias and temb to the conv's output in fp32 without rounding between the adds).
"""

from __future__ import annotations

import pytest
import torch

import kernels

diffusers = pytest.importorskip("diffusers")

from ._tiny_unet import OBSERVED, TOL, inputs, outputs, pair, patched  # noqa: E402

RESNETS = 8  # down 2, mid 2, up 4: each with a time embedding and a biased conv1


def _resnets(m) -> list:
    return [r for r in m.modules() if type(r).__name__ == "ResnetBlock2D"]


@pytest.fixture(scope="module")
def tuned_db(tmp_path_factory):
    from scheduler.extract import extract_fused_workloads
    from scheduler.tuner import TuneOptions, tune
    from shapetune.target import detect

    eager, _ = pair()
    ws = [op.workload for op in extract_fused_workloads(eager, inputs(), "float32")
          if op.workload.op == "group_norm" and "shift" in op.workload.epilogue]
    assert {w.name for w in ws} == {"group_norm_n2_hw64_c16_g8_f32+shift+affine+silu",
                                    "group_norm_n2_hw16_c32_g8_f32+shift+affine+silu"}, [w.name for w in ws]
    path = tmp_path_factory.mktemp("gn-shift-unet") / "tuning.db"
    reps = tune(ws, detect("llvm"), path, TuneOptions(trials=1, batch=1, templates=("norm_llvm",)))
    assert all(r.best is not None for r in reps), [r.by_status for r in reps]
    return path


def _fused(calls) -> int:
    return calls[("group_norm+shift", "tuned")]


def test_each_resnet_adds_bias_and_temb_in_norm2_and_matches_eager(registry):
    eager, _ = patched(registry)
    resnets = _resnets(eager)
    assert len(resnets) == RESNETS and all(r.conv1.bias is not None and r.time_emb_proj is not None for r in resnets)
    calls = registry.calls
    assert _fused(calls) == RESNETS and not any(op == "group_norm+shift" and what != "tuned" for (op, what) in calls)
    # the other GroupNorms as before: norm1 per resnet, conv_norm_out, the 4 Transformer2DModels' norms
    assert sum(n for (op, _), n in calls.items() if op == "group_norm") == RESNETS + 1 + 4


def test_norm2_reads_the_live_bias_and_temb(registry):
    """conv1's bias written in place and a new timestep: the fused call sees both (nothing derived from
    either is kept)."""
    eager, opt = pair()
    kernels.patch(opt)
    x = inputs()
    with torch.no_grad():
        before = opt(**x).sample
        for m in (eager, opt):
            for r in _resnets(m):
                r.conv1.bias.add_(torch.randn(r.conv1.bias.shape, generator=torch.Generator().manual_seed(4)))
        x = dict(x, timestep=torch.tensor(20))
        registry.calls.clear()
        out, ref = opt(**x).sample, eager(**x).sample
    torch.testing.assert_close(out, ref, **TOL)
    assert (out - before).abs().max() > OBSERVED and _fused(registry.calls) == RESNETS


def test_without_kernels_the_resnet_runs_as_before(empty_registry):
    _, opt = patched(empty_registry)
    calls = empty_registry.calls
    # each resnet asked for the kernel once, counted with why it did not run
    assert sum(n for (op, _), n in calls.items() if op == "group_norm+shift") == RESNETS and not _fused(calls)
    _, before = patched(empty_registry, fuse_norm_shift=False)  # the resnet as it ran before the fusion
    x = inputs()
    with torch.no_grad():
        assert torch.equal(opt(**x).sample, before(**x).sample)  # bit for bit


def test_fuse_norm_shift_off_runs_the_unfused_resnet_and_a_later_patch_turns_it_on(registry):
    def bias_adds():
        return sum(n for (op, _), n in registry.calls.items() if op == "bias_add")

    eager, opt = patched(registry, fuse_norm_shift=False)
    assert not any(op == "group_norm+shift" for (op, _) in registry.calls)
    unfused = bias_adds()  # every biased conv on cuDNN asks for its bias pass, conv1 with the shift
    kernels.patch(opt)  # each patch call sets it anew
    ref, out = outputs(eager, opt, registry, inputs())
    torch.testing.assert_close(out, ref, **TOL)
    assert _fused(registry.calls) == RESNETS and bias_adds() == unfused - RESNETS  # conv1 ran without its bias


def test_a_conv1_a_tuned_conv_serves_keeps_its_conv2d_shift_call(registry, monkeypatch):
    """Where a tuned conv serves conv1 (the conv2d(shift=) call then runs it), norm2 stays the plain
    group_norm: the fusion is for conv1 on cuDNN (here every conv1 is taken as tuned, the conv itself
    still running torch's path)."""
    import importlib

    kp = importlib.import_module("kernels.patch")  # the module (kernels.patch is also the function)
    asked = []
    monkeypatch.setattr(kp, "conv2d_tuned", lambda *a: asked.append(a) or True)
    patched(registry)
    assert len(asked) == RESNETS and not any(op == "group_norm+shift" for (op, _) in registry.calls)


def test_a_time_embedding_that_broadcasts_runs_the_eager_expression_counted(registry):
    """One time embedding for a batch of 2 (diffusers broadcasts it over the batch): conv1(x) + temb and
    norm2 as eager writes them, counted as the fusion's unsupported input."""
    eager, opt = pair()
    kernels.patch(opt)
    r, r_eager = opt.down_blocks[0].resnets[0], eager.down_blocks[0].resnets[0]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, r.in_channels, 8, 8, generator=g)
    temb = torch.randn(1, r.time_emb_proj.in_features, generator=g)
    registry.calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(r(x, temb), r_eager(x, temb), **TOL)
    assert registry.calls[("group_norm+shift", "unsupported_input")] == 1 and not _fused(registry.calls)
