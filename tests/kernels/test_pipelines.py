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


def test_restore_of_pipelines_sharing_components_and_under_an_offload_wrapper(registry):
    """Defects before (each left a GraphedCall installed after restore, which re-patched the 'restored' UNet at
    the next change of its module tree and, on a GPU, went on capturing):
    - optimize of a pipeline made with from_pipe over an optimized one wrapped the shared UNet's GraphedCall in
      a second one; restoring both put the first one back;
    - enable_model_cpu_offload after optimize wraps unet.forward (accelerate's _old_forward held the
      GraphedCall), and restore left it inside the wrapper.
    Now optimize reuses a shared component's GraphedCall, and restore takes it out from under a wrapper."""
    import diffusers
    from kernels.graphs import GraphedCall

    def leftovers(unet):
        return ([k for k in ("forward", "_old_forward") if isinstance(unet.__dict__.get(k), GraphedCall)],
                sum("_shapetune_patched" in m.__dict__ for m in unet.modules()))

    p1 = _build("text2img")
    ref = _run("text2img", p1)
    kernels.optimize(p1)
    p2 = diffusers.StableDiffusionImg2ImgPipeline.from_pipe(p1)
    kernels.optimize(p2)
    assert kernels.optimize(p2).components["unet"].graphs["forward"] is p1.unet.__dict__["forward"]
    kernels.restore(p1)
    kernels.restore(p2)
    assert leftovers(p1.unet) == ([], 0)
    torch.testing.assert_close(_run("text2img", p1), ref, atol=1e-5, rtol=0)

    pipe = _build("text2img")
    kernels.optimize(pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    kernels.restore(pipe)
    assert leftovers(pipe.unet) == ([], 0)
    peft = pytest.importorskip("peft")
    pipe.unet.add_adapter(peft.LoraConfig(r=2, target_modules=["to_q"]))  # a module-tree change
    _run("text2img", pipe)
    assert leftovers(pipe.unet) == ([], 0)
