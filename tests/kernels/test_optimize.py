"""kernels.optimize / restore on a tiny StableDiffusionPipeline built from configs (CPU): every nn.Module
component is patched and put in channels_last where it convolves, the image matches eager's, every
graphed call runs the patched eager path counted `cpu`, and restore gives back the eager pipeline.

Tolerance: float32 on the CPU with no tuned kernels (every op runs torch's own path, in channels_last
memory): 1e-4 absolute on an image in [0, 1] after 3 DDIM steps and the VAE decode.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kernels
from scheduler.pipelines import build_sd_pipeline
from shapetune.target import detect

pytest.importorskip("diffusers")


def _image(pipe, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return torch.from_numpy(pipe("a photo of a cat", num_inference_steps=3, height=64, width=64, generator=g,
                                 output_type="np", **kw).images)


@pytest.fixture
def registry(tmp_path):
    prev = kernels.set_registry(kernels.Registry(db_path=tmp_path / "empty.db", target=detect("llvm")))
    yield
    kernels.set_registry(prev)


def test_optimize_patches_every_component_and_matches_eager(registry):
    pipe = build_sd_pipeline(tiny=True)
    ref = _image(pipe)
    rep = kernels.optimize(pipe)
    assert set(rep.components) == {"unet", "vae", "text_encoder"}
    assert rep.components["unet"].channels_last and rep.components["vae"].channels_last
    assert not rep.components["text_encoder"].channels_last
    for name in ("unet", "vae", "text_encoder"):
        assert sum(rep.components[name].patched.patched.values()) > 0, name
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert kernels.optimize(pipe) is rep  # idempotent
    out = _image(pipe)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    stats = rep.graph_stats()
    assert stats["unet"]["cpu"] == 3 and stats["vae"]["cpu"] == 1 and stats["text_encoder"]["cpu"] >= 1, stats
    assert "replayed" not in stats["unet"]
    calls = rep.calls()
    assert sum(calls["conv2d"].values()) > 0 and sum(calls["linear"].values()) > 0
    text = str(rep)
    assert "unet (UNet2DConditionModel, channels_last)" in text and "cpu 3" in text


def test_restore_gives_back_the_eager_pipeline(registry):
    pipe = build_sd_pipeline(tiny=True)
    ref = _image(pipe, seed=3)
    kernels.optimize(pipe)
    kernels.restore(pipe)
    assert "forward" not in pipe.unet.__dict__ and "decode" not in pipe.vae.__dict__
    assert not any(getattr(m, "_shapetune_patched", None) for c in (pipe.unet, pipe.vae, pipe.text_encoder)
                   for m in c.modules())
    assert pipe.unet.conv_in.weight.is_contiguous()
    torch.testing.assert_close(_image(pipe, seed=3), ref, atol=0, rtol=0)
    kernels.restore(pipe)  # a second restore is a no-op


def test_optimize_one_model_and_graphs_off(registry, monkeypatch):
    pipe = build_sd_pipeline(tiny=True)
    unet = pipe.unet
    rep = kernels.optimize(unet, graphs=False)
    assert set(rep.components) == {"model"} and not rep.components["model"].graphs
    assert "forward" not in unet.__dict__
    kernels.restore(unet)
    monkeypatch.setenv("SHAPETUNE_GRAPHS", "0")
    rep = kernels.optimize(unet)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        unet(x, 10, encoder_hidden_states=torch.randn(1, 7, 24))
    assert rep.graph_stats()["model"]["disabled"] == 1
    kernels.restore(unet)


def test_optimize_rejects_what_is_not_a_pipeline():
    with pytest.raises(TypeError, match="expected a diffusers pipeline or an nn.Module"):
        kernels.optimize(object())


@pytest.mark.parametrize("shape", [(2, 16, 10), (2, 16, 4, 5), (2, 16)])
def test_patched_group_norm_keeps_torch_semantics_at_every_rank(registry, shape):
    """nn.GroupNorm reads [N, C, *]: a 3-D [N, C, L] input (diffusers' spatial attention) was read as
    [N, HW, C] by the patched forward (a ValueError, or a wrong answer where the sizes happen to fit)."""
    torch.manual_seed(0)
    gn = nn.GroupNorm(4, 16).eval()
    with torch.no_grad():
        gn.weight.add_(torch.randn(16))
        gn.bias.add_(torch.randn(16))
    x = torch.randn(*shape)
    if len(shape) == 3:  # as diffusers passes it: the transpose of a contiguous [N, L, C]
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    ref = gn(x)
    kernels.patch(gn)
    torch.testing.assert_close(gn(x), ref, atol=1e-5, rtol=1e-5)
    if len(shape) == 3:  # sizes where [N, HW, C] would also fit: C = L
        y = torch.randn(2, 16, 16)
        torch.testing.assert_close(gn(y), torch.nn.functional.group_norm(y, 4, gn.weight, gn.bias, gn.eps),
                                   atol=1e-5, rtol=1e-5)


def test_an_autoencoder_decode_drops_the_generator_it_never_reads(registry):
    """diffusers' pipelines call vae.decode(z, return_dict=False, generator=g) with a new Generator per
    image: keyed by identity it made a new CUDA graph per image (H200: 3 captures in 3 pipeline calls).
    The graphed decode drops it (AutoencoderKL.decode does not read it)."""
    pipe = build_sd_pipeline(tiny=True)
    rep = kernels.optimize(pipe)
    g = rep.components["vae"].graphs["decode"]
    assert g.unused_kwargs == ("generator",)
    seen = []
    inner = g.inner
    g.inner = lambda *a, **kw: seen.append(sorted(kw)) or inner(*a, **kw)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        pipe.vae.decode(z, return_dict=False, generator=torch.Generator().manual_seed(1))
    assert seen == [["return_dict"]]


def test_optimize_takes_a_video_model_with_3d_convolutions(registry):
    """A model with an nn.Conv3d (SVD's temporal VAE decoder here; SVD's and ModelScope's UNets too): optimize put
    the component in channels_last by `module.to(memory_format=...)`, which converts 5-D weights as well and
    raised "required rank 4 tensor to use channels_last format". The 4-D tensors go to channels_last, the 5-D
    ones stay as they are, and the decode matches eager's."""
    from diffusers import AutoencoderKLTemporalDecoder

    torch.manual_seed(0)
    vae = AutoencoderKLTemporalDecoder(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                       layers_per_block=1, latent_channels=4, sample_size=16).eval()
    conv3d = next(m for m in vae.modules() if isinstance(m, nn.Conv3d))
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = vae.decode(z, num_frames=3).sample
        rep = kernels.optimize(vae)
        assert rep.components["model"].channels_last and conv3d.weight.is_contiguous()
        assert vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(vae.decode(z, num_frames=3).sample, ref, atol=1e-5, rtol=1e-5)
    kernels.restore(vae)
    assert vae.decoder.conv_in.weight.is_contiguous()
