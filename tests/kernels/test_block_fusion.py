"""BasicTransformerBlock's three residual adds reach the fused linear (issue 9 item 3): attn1's and
attn2's to_out[0] and the FeedForward's output Linear run as shapetune::linear_residual, the workloads
scheduler.extract lists for them are the ones dispatched, and the block computes what eager does.

Tolerance: float32 on the CPU; untuned calls run torch's own F.linear + add (1e-5), tuned llvm
kernels are within 1e-4 of float64 each (scheduler/verify.py), 2e-4 through the block.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.patch import patch, unpatch
from scheduler.extract import extract_fused_workloads
from scheduler.tuner import TuneOptions, tune
from shapetune.fusions import sites_of
from shapetune.target import detect

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention import BasicTransformerBlock  # noqa: E402

DIM, CTX = 16, 12


def _block(**kw) -> BasicTransformerBlock:
    torch.manual_seed(0)
    blk = BasicTransformerBlock(DIM, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=CTX,
                                activation_fn="geglu", **kw).eval()
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return blk


def _inputs(seed: int = 1, tokens: int = 9) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(2, tokens, DIM, generator=g),
            "encoder_hidden_states": torch.randn(2, 5, CTX, generator=g)}


def _run(blk, inputs, registry):
    prev = kernels.set_registry(registry)
    try:
        with torch.no_grad():
            out = blk(**inputs)
        return out, kernels.fallback_summary()
    finally:
        kernels.set_registry(prev)


def _residual_linears(blk, inputs) -> set:
    return {o.workload for o in extract_fused_workloads(blk, inputs, "float32")
            if o.workload.op == "linear" and "residual" in o.workload.epilogue}


def test_the_three_residual_sites_are_listed():
    sites = sites_of(_block())
    assert {n for n, s in sites.items() if s.kind == "residual"} == {"attn1.to_out.0", "attn2.to_out.0", "ff.net.2"}
    assert {n for n, s in sites.items() if s.kind == "add_before"} == {"norm2", "norm3"}  # add_layer_norm's
    assert sites_of(_block(norm_type="ada_norm_zero", num_embeds_ada_norm=10)) == {}  # gated: diffusers' forward
    chunked = _block()
    chunked.set_chunk_feed_forward(4, 1)
    assert sites_of(chunked) == {}


def test_block_calls_linear_residual_three_times_and_matches_eager(tmp_path):
    blk, inputs = _block(), _inputs()
    with torch.no_grad():
        ref = blk(**inputs)
    extracted = _residual_linears(blk, inputs)
    assert len(extracted) == 2  # attn1 / attn2 to_out (same shape) and ff.net.2
    rep = patch(blk)
    assert rep.patched["linear+residual"] == 1
    out, s = _run(blk, inputs, kernels.Registry(db_path=tmp_path / "empty.db", target=detect("llvm")))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert sum(s["linear_residual"].values()) == 3, s
    unpatch(blk)
    with torch.no_grad():
        torch.testing.assert_close(blk(**inputs), ref)


def test_tuned_linear_residual_kernels_serve_the_block(tmp_path):
    blk, inputs = _block(), _inputs()
    with torch.no_grad():
        ref = blk(**inputs)
    ws = sorted(_residual_linears(blk, inputs), key=lambda w: w.key)
    db = tmp_path / "tuning.db"
    reps = tune(ws, detect("llvm"), db, TuneOptions(trials=2, batch=2, templates=("gemm_llvm",)))
    assert all(r.best is not None for r in reps), [(r.workload.name, r.by_status) for r in reps]
    patch(blk)
    out, s = _run(blk, inputs, kernels.Registry(db_path=db, target=detect("llvm"), require_faster=False))
    assert s["linear_residual"]["tuned"] == 3, s
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)


def test_uncovered_calls_keep_the_unfused_expression(tmp_path):
    """A masked self-attention goes to the processor that was set before: its add runs unfused
    (the other two stay fused), and the output is still eager's."""
    blk, inputs = _block(), _inputs()
    mask = torch.zeros(2, 1, 9)
    mask[:, :, -2:] = -1e4
    with torch.no_grad():
        ref = blk(**inputs, attention_mask=mask)
    patch(blk)
    out, s = _run(blk, {**inputs, "attention_mask": mask},
                  kernels.Registry(db_path=tmp_path / "empty.db", target=detect("llvm")))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert sum(s["linear_residual"].values()) == 2, s  # attn1 masked: its add runs unfused


def test_a_tiny_unet_reaches_linear_residual_in_every_transformer_block(tmp_path):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=2, norm_num_groups=8).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(sample=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor(500),
                  encoder_hidden_states=torch.randn(2, 7, 24, generator=g))
    with torch.no_grad():
        ref = unet(**inputs).sample
    blocks = sum(isinstance(m, BasicTransformerBlock) for m in unet.modules())
    patch(unet)
    out, s = _run(unet, inputs, kernels.Registry(db_path=tmp_path / "empty.db", target=detect("llvm")))
    assert sum(s["linear_residual"].values()) == 3 * blocks, s
    torch.testing.assert_close(out.sample, ref, atol=1e-5, rtol=1e-5)
