"""Two threads running one patched model at once (a server's thread pool), on the CPU: each forward's
per-forward state is its thread's own. Thread A is held inside its forward (a forward hook) while thread
B runs a whole forward of the same model, then A goes on; both results must be eager's for their inputs.

Defects before (the state was shared by every thread):
- the GroupNorm + SiLU pass-through: B's norm replaced (then B's SiLU cleared) the output A's norm had
  handed to A's SiLU, so A's SiLU applied SiLU a second time: a silently wrong result for A;
- the packed projections' per-forward output (kernels/packing.ModelGroup: the cross-attentions' shared
  k/v, the resnets' time-embedding GEMM): B's forward opened and closed the groups, so A's remaining
  attentions and resnets each projected by themselves (and a thread switch between a member's check and
  its read could hand it the other thread's output).
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import kernels

pytest.importorskip("diffusers")

from ._tiny_unet import TOL, inputs, linear_calls, pair  # noqa: E402


def _interleaved(model, hold_in: str, xa: dict, xb: dict):
    """(A's output, B's output): A's forward held right after module `hold_in` ran until B's whole forward
    has run."""
    held, b_done = threading.Event(), threading.Event()
    out = {}

    def hook(_m, _args, _out):
        if threading.current_thread().name == "A":
            held.set()
            assert b_done.wait(60), "thread B did not finish"

    def run(name, x):
        with torch.no_grad():
            out[name] = model(**x).sample

    h = dict(model.named_modules())[hold_in].register_forward_hook(hook)
    try:
        a = threading.Thread(target=run, args=("A", xa), name="A")
        a.start()
        assert held.wait(60), "thread A never reached the hook"
        b = threading.Thread(target=run, args=("B", xb), name="B")
        b.start()
        b.join(60)
        b_done.set()
        a.join(60)
    finally:
        h.remove()
    return out["A"], out["B"]


def test_interleaved_forwards_each_get_eagers_result(empty_registry):
    """Held between the first resnet's norm1 (GroupNorm with SiLU fused) and its SiLU module."""
    eager, opt = pair()
    kernels.patch(opt)
    assert "_shapetune_silu" in dict(opt.named_modules())["down_blocks.0.resnets.0.norm1"].__dict__
    xa, xb = inputs(1), inputs(2)
    out_a, out_b = _interleaved(opt, "down_blocks.0.resnets.0.norm1", xa, xb)
    with torch.no_grad():
        torch.testing.assert_close(out_b, eager(**xb).sample, **TOL)
        torch.testing.assert_close(out_a, eager(**xa).sample, **TOL)


def test_interleaved_forwards_keep_the_shared_projections(empty_registry):
    """Held in the first transformer block's feed-forward, after its cross-attention (the shared k/v GEMM
    and the time-embedding GEMM computed for A): A's other cross-attentions and resnets still take their
    columns, B's forward computes its own."""
    eager, opt = pair()
    kernels.patch(opt)
    xa, xb = inputs(1), inputs(2)
    with torch.no_grad():
        empty_registry.calls.clear()
        opt(**xa)
    one = linear_calls(empty_registry)
    empty_registry.calls.clear()
    out_a, out_b = _interleaved(opt, "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0", xa,
                                xb)
    assert linear_calls(empty_registry) == 2 * one  # before: A's later members projected by themselves
    with torch.no_grad():
        torch.testing.assert_close(out_a, eager(**xa).sample, **TOL)
        torch.testing.assert_close(out_b, eager(**xb).sample, **TOL)


def test_a_patched_model_still_deep_copies(empty_registry):
    """The per-thread state copies as a fresh, empty holder: a deep copy of a patched model runs and
    matches eager."""
    eager, opt = pair()
    kernels.patch(opt)
    twin = copy.deepcopy(opt)
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(twin(**x).sample, eager(**x).sample, **TOL)


def test_two_threads_each_with_a_pipeline_over_the_same_optimized_models(empty_registry):
    """The README's recipe for a threaded server: one optimized set of models, a pipeline per thread (its
    own scheduler), both threads generating at once; each image equals eager's."""
    from scheduler.pipelines import build_pipeline, run_pipeline

    pipe = build_pipeline("text2img")
    ref = {s: run_pipeline(pipe, "text2img", 2, 64, 64, seed=s) for s in (1, 2)}
    kernels.optimize(pipe)
    other = type(pipe)(**{**pipe.components, "scheduler": copy.deepcopy(pipe.scheduler)})
    out = {}
    threads = [threading.Thread(target=lambda p=p, s=s: out.__setitem__(s, run_pipeline(p, "text2img", 2, 64, 64,
                                                                                         seed=s)))
               for p, s in ((pipe, 1), (other, 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for s in (1, 2):
        torch.testing.assert_close(out[s], ref[s], atol=1e-4, rtol=0)
