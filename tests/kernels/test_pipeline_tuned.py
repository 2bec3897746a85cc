"""A tiny StableDiffusionPipeline optimized with llvm kernels tuned for it (issue 10 item 10): the
norms and the elementwise passes between the big ops (bias_add: conv bias + residual / time
embedding; gelu_gate) run tuned TVM kernels inside the optimized pipeline, and its image matches
eager's on the same weights and seed.

The workloads are the ones the optimized pipeline dispatches (recorded through the registry's
lookups on a first run over an empty DB), tuned with one candidate each, and served whether or not
they beat torch here (require_faster=False: this checks serving, not speed).
Tolerance: float32 on the CPU; TVM's kernels sum in another order than torch's: 1e-3 absolute on
images in [0, 1] after 3 denoising steps.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from scheduler import pipelines as P
from scheduler.tuner import TuneOptions, tune
from shapetune.target import detect

pytest.importorskip("diffusers")

OPS = ("group_norm", "layer_norm", "bias_add", "gelu_gate")


def _image(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    out = pipe("a photo of a cat", negative_prompt="blurry", num_inference_steps=3, height=64, width=64,
               generator=g, output_type="np")
    return torch.from_numpy(out.images)


def _dispatched(pipe, reg) -> list:
    seen, lookup = {}, reg.lookup

    def record(sig, make_workload):
        seen.setdefault(make_workload(), None)
        return lookup(sig, make_workload)

    reg.lookup = record
    try:
        _image(pipe)
    finally:
        reg.lookup = lookup
    return [w for w in seen if w.op in OPS]


def test_tiny_pipeline_runs_tuned_passes_and_matches_eager(tmp_path):
    pipe = P.build_sd_pipeline(tiny=True, kind="text2img")
    ref = _image(pipe)
    cpu = detect("llvm")
    db = tmp_path / "tuned.db"
    reg = kernels.Registry(db_path=db, target=cpu, require_faster=False)
    prev = kernels.set_registry(reg)
    try:
        kernels.optimize(pipe)
        workloads = _dispatched(pipe, reg)
        assert {w.op for w in workloads} == set(OPS), sorted({w.op for w in workloads})
        tune(workloads, cpu, db, TuneOptions(trials=1, batch=4, templates=("norm_llvm", "elementwise_llvm")))
        reg.clear()
        torch.testing.assert_close(_image(pipe), ref, atol=1e-3, rtol=0)
        calls = kernels.fallback_summary()
        for op in OPS:
            assert calls.get(op, {}).get("tuned", 0) > 0, (op, calls.get(op))
    finally:
        kernels.restore(pipe)
        kernels.set_registry(prev)
