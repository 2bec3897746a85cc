"""Every pipeline of issue 10 item 5, tiny and on the CPU: StableDiffusion, Img2Img, Inpaint (9-channel
UNet), AltDiffusion (XLM-R text encoder; prompt embeddings computed by its own text encoder) and
StableDiffusionXL (two text encoders), each built from configs with random weights, run eagerly and
after kernels.optimize on the same weights and seed: the images match, every nn.Module component was
patched, and restore gives the eager images back.

Tolerance: float32 on the CPU, no tuned kernels (torch's ops in channels_last memory): 1e-4 absolute on
images in [0, 1].
"""

from __future__ import annotations

import pytest
import torch

import kernels
from scheduler import pipelines as P
from shapetune.target import detect

pytest.importorskip("diffusers")


def _run(kind: str, pipe) -> torch.Tensor:
    return P.run_pipeline(pipe, kind, steps=3, height=64, width=64, strength=0.75)


def _build(kind: str):
    return P.build_pipeline(kind, tiny=True)


@pytest.fixture
def registry(tmp_path):
    prev = kernels.set_registry(kernels.Registry(db_path=tmp_path / "empty.db", target=detect("llvm")))
    yield
    kernels.set_registry(prev)


@pytest.mark.parametrize("kind", P.PIPELINES)
def test_pipeline_optimized_matches_eager_and_restores(kind, registry):
    pipe = _build(kind)
    ref = _run(kind, pipe)
    rep = kernels.optimize(pipe)
    want = {"unet", "vae", "text_encoder"} | ({"text_encoder_2"} if kind == "sdxl" else set())
    assert set(rep.components) == want
    assert all(sum(c.patched.patched.values()) > 0 for c in rep.components.values()), str(rep)
    if kind == "inpaint":
        assert pipe.unet.config.in_channels == 9
    torch.testing.assert_close(_run(kind, pipe), ref, atol=1e-4, rtol=0)
    assert rep.graph_stats()["unet"]["cpu"] >= 2  # graphed, on the CPU the patched eager path
    kernels.restore(pipe)
    torch.testing.assert_close(_run(kind, pipe), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["text2img", "sdxl"])
def test_pipeline_optimized_under_inference_mode(kind, registry):
    """Users run pipelines under torch.inference_mode too: the optimized UNet raised there (kernels/temb.py
    read an inference tensor's version counter) until 2026-12-07."""
    pipe = _build(kind)
    ref = _run(kind, pipe)
    kernels.optimize(pipe)
    with torch.inference_mode():
        torch.testing.assert_close(_run(kind, pipe), ref, atol=1e-4, rtol=0)
