"""diffusers pipelines built from their configs with random weights (no model hub), tiny or full size.

    pipe = build_sd_pipeline(tiny=True)                   # StableDiffusionPipeline, CPU-sized
    pipe = build_sd_pipeline(tiny=False, dtype=torch.float16, device="cuda")   # SD 1.5 shapes
    pipe = build_pipeline("sdxl", tiny=True)              # any of PIPELINES by name
    images = run_pipeline(pipe, "sdxl", steps=3, height=64, width=64)   # a seeded call, [1, 3, 64, 64]

The text side is real: transformers' CLIPTextModel from a CLIP config and a CLIPTokenizer over a small
vocabulary written here (byte-level BPE with no merges: every prompt tokenizes to known symbols), so
`pipe(prompt)` runs the pipeline's own encode_prompt. The scheduler is DDIM (deterministic given the
seed). Speed does not depend on weights; parity compares an optimized pipeline with eager on the same
weights.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path

import torch

from .sd_configs import SD15_UNET_CONFIG, SD15_VAE, TINY_VAE

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24, attention_head_dim=2,
                 norm_num_groups=8)
TINY_CLIP = dict(hidden_size=24, intermediate_size=48, num_attention_heads=2, num_hidden_layers=2,
                 max_position_embeddings=16, projection_dim=24)

#: runwayml/stable-diffusion-v1-5 text_encoder/config.json (the fields that matter; the VAE's: sd_configs)
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
    _eval(pipe)
    pipe = pipe.to(device)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


# -- SDXL -------------------------------------------------------------------------------------------
TINY_SDXL_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                      use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                      transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                      cross_attention_dim=64, norm_num_groups=8)
TINY_SDXL_CLIP = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                      max_position_embeddings=16, projection_dim=32, hidden_act="gelu")

#: stabilityai/stable-diffusion-xl-base-1.0: unet/, text_encoder/ (CLIP ViT-L), text_encoder_2/ (OpenCLIP bigG)
SDXL_UNET = dict(block_out_channels=(320, 640, 1280), layers_per_block=2, sample_size=128, in_channels=4,
                 out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=256, transformer_layers_per_block=(1, 2, 10),
                 projection_class_embeddings_input_dim=2816, cross_attention_dim=2048, norm_num_groups=32)
SDXL_CLIP = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SDXL_CLIP_2 = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                   max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)


def _eval(pipe) -> None:
    """Inference mode for every module (as from_pretrained leaves them): dropout off."""
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.eval()


def _scale_weights(*modules) -> None:
    with torch.no_grad():  # random weights big enough that every layer matters
        for m in modules:
            for p in m.parameters():
                p.add_(0.02 * torch.randn_like(p))


def build_sdxl_pipeline(tiny: bool = True, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0):
    """StableDiffusionXLPipeline with random weights: two CLIP text encoders (the second with a
    projection), a text_time-conditioned UNet; tiny (CPU tests) or SDXL base's shapes."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**(TINY_SDXL_UNET if tiny else SDXL_UNET))
    vae = diffusers.AutoencoderKL(**(TINY_VAE if tiny else {**SD15_VAE, "sample_size": 1024}),
                                  scaling_factor=0.13025)
    encoders, toks = [], []
    for cfg, cls in ((TINY_SDXL_CLIP if tiny else SDXL_CLIP, CLIPTextModel),
                     (TINY_SDXL_CLIP if tiny else SDXL_CLIP_2, CLIPTextModelWithProjection)):
        tok = build_tokenizer(1000, cfg["max_position_embeddings"])
        encoders.append(cls(CLIPTextConfig(vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                           bos_token_id=tok.bos_token_id, pad_token_id=tok.eos_token_id, **cfg)))
        toks.append(tok)
    if tiny:
        _scale_weights(unet, vae, *encoders)
    sched = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             steps_offset=1, timestep_spacing="leading")
    pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                               tokenizer=toks[0], tokenizer_2=toks[1], unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    _eval(pipe)
    pipe = pipe.to(device)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


# -- AltDiffusion -------------------------------------------------------------------------------------
def build_alt_diffusion_pipeline(tiny: bool = True, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0):
    """AltDiffusionPipeline with random weights: SD's UNet and VAE, diffusers' RobertaSeriesModelWithTransformation
    (an XLM-R text encoder projected to the UNet's context width). No tokenizer (XLM-R's is a trained
    sentencepiece model, not writable here): call it with prompt_embeds from `text_embeddings(pipe, ids)`."""
    import diffusers
    from diffusers.pipelines.deprecated.alt_diffusion.modeling_roberta_series import (
        RobertaSeriesConfig, RobertaSeriesModelWithTransformation)

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel.from_config(dict(TINY_UNET) if tiny else copy.deepcopy(SD15_UNET_CONFIG))
    vae = diffusers.AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE))
    width = unet.config.cross_attention_dim
    text = RobertaSeriesModelWithTransformation(RobertaSeriesConfig(
        hidden_size=32 if tiny else 1024, project_dim=width, intermediate_size=64 if tiny else 4096,
        num_attention_heads=4 if tiny else 16, num_hidden_layers=2 if tiny else 24, vocab_size=1000 if tiny else 250002,
        max_position_embeddings=80 if tiny else 514, pad_token_id=1, type_vocab_size=1))
    if tiny:
        _scale_weights(unet, vae, text)
    sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.AltDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet, scheduler=sched,
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    _eval(pipe)
    pipe = pipe.to(device)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def text_embeddings(pipe, input_ids: torch.Tensor) -> torch.Tensor:
    """AltDiffusion's prompt embeddings of token ids, through the pipeline's own text encoder (what its
    encode_prompt does after tokenizing)."""
    with torch.no_grad():
        return pipe.text_encoder(input_ids.to(pipe.device))[0]


# -- every pipeline by name ----------------------------------------------------------------------------
#: issue 10's pipelines: StableDiffusion, Img2Img, Inpaint (9-channel UNet), AltDiffusion, StableDiffusionXL
PIPELINES = ("text2img", "img2img", "inpaint", "alt", "sdxl")


def build_pipeline(kind: str, tiny: bool = True, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0):
    """The pipeline `kind` (one of PIPELINES) with random weights, tiny or at its model's shapes."""
    if kind == "sdxl":
        return build_sdxl_pipeline(tiny=tiny, dtype=dtype, device=device, seed=seed)
    if kind == "alt":
        return build_alt_diffusion_pipeline(tiny=tiny, dtype=dtype, device=device, seed=seed)
    if kind not in PIPELINES:
        raise ValueError(f"unknown pipeline {kind!r}: one of {', '.join(PIPELINES)}")
    return build_sd_pipeline(tiny=tiny, dtype=dtype, device=device, seed=seed, kind=kind)


def run_pipeline(pipe, kind: str, steps: int, height: int, width: int, images: int = 1, seed: int = 0,
                 strength: float = 1.0) -> torch.Tensor:
    """One call of pipeline `kind` as a user makes it, deterministic given `seed`: a prompt and a negative
    prompt (classifier-free guidance); img2img and inpaint a seeded random init image (inpaint a random
    binary mask; img2img runs steps x strength steps, all of them at strength 1); AltDiffusion, which has no
    tokenizer here, the prompt embeddings of random token ids through its own text encoder. Returns the
    images as a float32 CPU tensor [images, 3, height, width] in [0, 1]."""
    rand = lambda *shape, s: torch.rand(*shape, generator=torch.Generator().manual_seed(s))  # noqa: E731
    dev, dt = pipe.device, pipe.unet.dtype
    kw = dict(num_inference_steps=steps, height=height, width=width, num_images_per_prompt=images,
              generator=torch.Generator().manual_seed(seed), output_type="pt")
    if kind == "img2img":
        kw.update(image=rand(1, 3, height, width, s=seed + 3).to(dev, dt), strength=strength)
    elif kind == "inpaint":
        kw.update(image=rand(1, 3, height, width, s=seed + 3).to(dev, dt),
                  mask_image=(rand(1, 1, height, width, s=seed + 4) > 0.5).to(dev, dt))
    with torch.no_grad():
        if kind == "alt":
            seq = min(77, pipe.text_encoder.config.max_position_embeddings - 2)  # XLM-R's positions start at 2
            ids = torch.randint(2, 1000, (2, seq), generator=torch.Generator().manual_seed(seed + 5))
            e = text_embeddings(pipe, ids)
            out = pipe(prompt_embeds=e[:1], negative_prompt_embeds=e[1:], **kw).images
        else:
            out = pipe("a photo of a cat", negative_prompt="blurry", **kw).images
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return out.float().cpu()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images a against b, both in [0, 1]: -10 log10(MSE) (inf where they are equal)."""
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else -10 * math.log10(mse)
