"""diffusers pipelines built from their configs with random weights (no model hub), tiny or full size.

    pipe = build_sd_pipeline(tiny=True)                   # StableDiffusionPipeline, CPU-sized
    pipe = build_sd_pipeline(tiny=False, dtype=torch.float16, device="cuda")   # SD 1.5 shapes

The text side is real: transformers' CLIPTextModel from a CLIP config and a CLIPTokenizer over a small
vocabulary written here (byte-level BPE with no merges: every prompt tokenizes to known symbols), so
`pipe(prompt)` runs the pipeline's own encode_prompt. The scheduler is DDIM (deterministic given the
seed). Speed does not depend on weights; parity compares an optimized pipeline with eager on the same
weights.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import torch

from .sd_configs import SD15_UNET_CONFIG

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24, attention_head_dim=2,
                 norm_num_groups=8)
TINY_VAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=16)
TINY_CLIP = dict(hidden_size=24, intermediate_size=48, num_attention_heads=2, num_hidden_layers=2,
                 max_position_embeddings=16, projection_dim=24)

#: runwayml/stable-diffusion-v1-5 vae/config.json and text_encoder/config.json (the fields that matter)
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                sample_size=512)
SD15_CLIP = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what CLIPTokenizer's BPE runs over)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_tokenizer(vocab_size: int, max_length: int):
    """A CLIPTokenizer whose vocabulary is every byte symbol alone and with CLIP's end-of-word mark,
    plus the start and end tokens: vocab_size must be >= 514."""
    from transformers import CLIPTokenizer

    syms = list(_bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(syms + [s + "</w>" for s in syms])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    if vocab_size < len(vocab):
        raise ValueError(f"build_tokenizer: vocab_size {vocab_size} < the {len(vocab)} symbols it needs")
    d = Path(tempfile.mkdtemp(prefix="shapetune-tok-"))
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=max_length)


def build_sd_pipeline(tiny: bool = True, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0,
                      kind: str = "text2img"):
    """StableDiffusion{,Img2Img,Inpaint}Pipeline (kind "text2img", "img2img", "inpaint": a 9-channel UNet)
    with random weights: tiny (CPU tests) or SD 1.5's shapes."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet_cfg = dict(TINY_UNET) if tiny else copy.deepcopy(SD15_UNET_CONFIG)
    if kind == "inpaint":
        unet_cfg["in_channels"] = 9
    unet = diffusers.UNet2DConditionModel.from_config(unet_cfg)
    vae = diffusers.AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE))
    clip = dict(TINY_CLIP if tiny else SD15_CLIP)
    tok = build_tokenizer(max(1000, 514), clip["max_position_embeddings"])
    clip_cfg = CLIPTextConfig(vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                              pad_token_id=tok.eos_token_id, **clip)
    text = CLIPTextModel(clip_cfg)
    if tiny:  # random weights big enough that every layer matters
        with torch.no_grad():
            for m in (unet, vae, text):
                for p in m.parameters():
                    p.add_(0.02 * torch.randn_like(p))
    sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    cls = {"text2img": diffusers.StableDiffusionPipeline, "img2img": diffusers.StableDiffusionImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionInpaintPipeline}[kind]
    pipe = cls(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
               feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
