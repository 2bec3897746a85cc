"""The patched BasicTransformerBlock with add_layer_norm kernels: attn1's and attn2's residual adds go
into the LayerNorm that reads their sums (norm2, norm3), one kernel each, where one is tuned.

A tiny diffusers UNet (4 transformer blocks) patched against an eager twin on the same weights, float32
on the CPU: the add_layer_norm workloads scheduler.extract lists for it are tuned on llvm (so extraction
and the patch agree on what runs), then every block serves two of them per forward and the output
matches eager (1e-5: the fused kernel's statistics are fp32 sums in another order than torch's).
"""

from __future__ import annotations

import pytest
import torch

import kernels

diffusers = pytest.importorskip("diffusers")

from ._tiny_unet import TOL, inputs, outputs, pair, patched  # noqa: E402


@pytest.fixture(scope="module")
def tuned_db(tmp_path_factory):
    from scheduler.extract import extract_fused_workloads
    from scheduler.tuner import TuneOptions, tune
    from shapetune.target import detect

    eager, _ = pair()
    ws = [op.workload for op in extract_fused_workloads(eager, inputs(), "float32")
          if op.workload.op == "add_layer_norm"]
    assert len(ws) == 2, [w.name for w in ws]  # (2 x 8 x 8 rows, 16 channels) and the mid block's (2 x 4 x 4, 32)
    path = tmp_path_factory.mktemp("aln-unet") / "tuning.db"
    reps = tune(ws, detect("llvm"), path, TuneOptions(trials=1, batch=1, templates=("dlight",)))
    assert all(r.best is not None for r in reps), [r.by_status for r in reps]
    return path


def test_each_block_adds_and_normalizes_in_one_kernel_and_matches_eager(registry):
    patched(registry)
    calls = registry.calls
    assert calls[("add_layer_norm", "tuned")] == 8  # 4 blocks x (attn1 -> norm2, attn2 -> norm3)
    # what remains of the unfused path: norm1 per block, the feed-forward's residual per block
    assert sum(n for (op, _), n in calls.items() if op == "layer_norm") == 4
    assert sum(n for (op, _), n in calls.items() if op == "linear_residual") == 4


def test_without_kernels_the_block_runs_as_before(empty_registry):
    patched(empty_registry)
    calls = empty_registry.calls
    assert not calls[("add_layer_norm", "tuned")]
    assert sum(n for (op, _), n in calls.items() if op == "linear_residual") == 12  # 3 per block, fused as before
    assert sum(n for (op, _), n in calls.items() if op == "layer_norm") == 12


def test_fuse_add_norm_off_runs_the_unfused_block_and_a_later_patch_turns_it_on(registry):
    eager, opt = patched(registry, fuse_add_norm=False)
    calls = registry.calls
    assert not calls[("add_layer_norm", "tuned")]
    assert sum(n for (op, _), n in calls.items() if op == "linear_residual") == 12  # 3 per block
    kernels.patch(opt)  # each patch call sets it anew
    ref, out = outputs(eager, opt, registry, inputs())
    torch.testing.assert_close(out, ref, **TOL)
    assert registry.calls[("add_layer_norm", "tuned")] == 8
