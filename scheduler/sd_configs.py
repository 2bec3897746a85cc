"""Model configs for the diffusion UNets shapetune tunes, and builders with random weights."""

from __future__ import annotations

import copy

import torch

#: runwayml/stable-diffusion-v1-5, unet/config.json. Note diffusers' historical misnomer:
#: ``attention_head_dim`` is really the number of heads (8), so head_dim = channels / 8.
SD15_UNET_CONFIG: dict = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
    "use_linear_projection": False,
}


def build_sd15_unet(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Build the SD 1.5 UNet from its config with random (untrained) weights.

    Parameters
    ----------
    dtype : torch.dtype
        Parameter dtype.
    device : str or torch.device
        Where to build it. ``"meta"`` builds shapes only: no memory, instant, and enough
        for workload extraction. ``"cpu"`` allocates about 3.4 GB in float32.

    Returns
    -------
    diffusers.UNet2DConditionModel
        The model in eval mode.
    """
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel.from_config(copy.deepcopy(SD15_UNET_CONFIG))
    if dtype != torch.float32:
        unet = unet.to(dtype=dtype)
    return unet.eval()


#: runwayml/stable-diffusion-v1-5 vae/config.json (the fields that matter), and a tiny one for CPU tests
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                sample_size=512)
TINY_VAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=16)


def build_sd15_vae(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", tiny: bool = False):
    """Build the SD 1.5 VAE (AutoencoderKL) from its config with random weights.

    The config is SD15_VAE (vae/config.json's fields that matter: four blocks of
    128, 256, 512, 512 channels, 2 layers each, 32 groups), the one the pipelines build; `tiny` builds
    its TINY_VAE instead (CPU tests). Parameters and returns as ``build_sd15_unet``: ``"meta"`` builds
    shapes only; the decoder takes latents [batch, 4, height / 8, width / 8].
    """
    from diffusers import AutoencoderKL

    with torch.device(device):
        vae = AutoencoderKL(**copy.deepcopy(TINY_VAE if tiny else SD15_VAE))
    if dtype != torch.float32:
        vae = vae.to(dtype=dtype)
    return vae.eval()


def build_sdxl_unet(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", tiny: bool = False):
    """Build SDXL base's UNet (scheduler.pipelines.SDXL_UNET: 3 levels of 320, 640, 1280 channels, 1, 2 and
    10 transformer layers per block, a 2048-wide context, text_time added conditions) with random weights;
    `tiny` builds TINY_SDXL_UNET (CPU tests). Parameters and returns as ``build_sd15_unet`` (``"meta"``:
    shapes only); its forward takes scheduler.extract.sdxl_unet_inputs."""
    from diffusers import UNet2DConditionModel

    from .pipelines import SDXL_UNET, TINY_SDXL_UNET

    with torch.device(device):
        unet = UNet2DConditionModel(**copy.deepcopy(TINY_SDXL_UNET if tiny else SDXL_UNET))
    if dtype != torch.float32:
        unet = unet.to(dtype=dtype)
    return unet.eval()
