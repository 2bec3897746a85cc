"""optimize(pipe): one call puts a diffusers pipeline (or one model) on shapetune, in place; restore(pipe)
undoes it.

    import kernels
    report = kernels.optimize(pipe)       # UNet, VAE, text encoder(s): patched, channels_last, graphed
    image = pipe(prompt_embeds=..., num_inference_steps=20).images[0]
    print(report)                         # what runs tuned, what falls back and why, graphs per component
    kernels.restore(pipe)

Per nn.Module component of the pipeline (`pipe.components`: unet, vae, text_encoder, text_encoder_2, ...):
  - modules with convolutions (UNet, VAE) go to channels_last memory (4-D parameters and buffers only:
    `module.to(memory_format=...)` also takes the 5-D weights of a video model's Conv3d, which raised),
    the layout the patched convs and norms take without a copy;
  - `kernels.patch(component)`: supported modules call the shapetune ops (tuned where faster, torch's
    ops elsewhere, counted by cause);
  - with `graphs` (default; SHAPETUNE_GRAPHS=0 turns it off), CUDA graphs per call signature
    (kernels.graphs.GraphedCall) on what the pipeline calls: `forward` of the UNet and the text
    encoders, `decode` of an autoencoder (its `encode` returns a distribution object, not tensors:
    it runs the patched eager path). On a CPU every call runs the patched eager path (counted `cpu`).
A tree change (a LoRA loaded or unloaded) re-patches the component before its graphs are re-captured,
so new Linear layers are served without re-optimizing.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from .graphs import GraphedCall
from .patch import PatchReport, patch, unpatch
from .registry import fallback_summary

_ATTR = "_shapetune_optimized"


@dataclass
class ComponentReport:
    name: str
    kind: str  # the component's class name
    patched: PatchReport
    channels_last: bool
    graphs: dict[str, GraphedCall] = field(default_factory=dict)  # method -> its graphs

    def graph_stats(self) -> Counter:
        out = Counter()
        for g in self.graphs.values():
            out.update(g.stats)
        return out


@dataclass
class OptimizeReport:
    components: dict[str, ComponentReport]

    def graph_stats(self) -> dict[str, Counter]:
        """Per component: graphs captured, replays, invalidations and eager calls by cause."""
        return {n: c.graph_stats() for n, c in self.components.items() if c.graphs}

    def calls(self) -> dict:
        """Op calls by outcome since the registry started (kernels.fallback_summary): tuned, or the
        fallback cause. Replayed graphs make no op calls: this counts the eager runs and captures."""
        return fallback_summary()

    def __str__(self) -> str:
        lines = []
        for n, c in self.components.items():
            g = ", ".join(f"{k} {v}" for k, v in sorted(c.graph_stats().items()))
            lines.append(f"{n} ({c.kind}{', channels_last' if c.channels_last else ''}): {c.patched}"
                         + (f"; graphs on {'/'.join(c.graphs)}: {g or 'none yet'}" if c.graphs else ""))
        calls = self.calls()
        if calls:
            lines.append("op calls: " + "; ".join(f"{op} " + ", ".join(f"{k} {v}" for k, v in sorted(d.items()))
                                                  for op, d in sorted(calls.items())))
        return "\n".join(lines)


def _channels_last(m: nn.Module) -> None:
    """m's 4-D parameters and buffers in channels_last memory, in place (what `m.to(memory_format=
    torch.channels_last)` does to them). Not through `m.to`: it converts 5-D tensors too, and a Conv3d's weight
    (SVD's and ModelScope's UNets, SVD's temporal VAE decoder) made it raise "required rank 4 tensor to use
    channels_last format"."""
    with torch.no_grad():
        for t in itertools.chain(m.parameters(), m.buffers()):
            if t.dim() == 4 and not t.is_contiguous(memory_format=torch.channels_last):
                t.data = t.data.contiguous(memory_format=torch.channels_last)


def _components(pipe) -> dict[str, nn.Module]:
    if isinstance(pipe, nn.Module):
        return {"model": pipe}
    comps = getattr(pipe, "components", None)
    if not isinstance(comps, dict):
        raise TypeError(f"kernels.optimize: expected a diffusers pipeline or an nn.Module, got {type(pipe).__name__}")
    return {n: m for n, m in comps.items() if isinstance(m, nn.Module)}


def _graph_methods(m: nn.Module) -> dict[str, tuple[str, ...]]:
    """{method to graph: its keyword arguments that it never reads}."""
    if callable(getattr(m, "decode", None)) and callable(getattr(m, "encode", None)):  # an autoencoder
        # AutoencoderKL.decode(z, return_dict, generator): the generator is not used (diffusers 0.3x-0.4x);
        # pipelines pass a new one per call, which would otherwise be a new graph per image
        return {"decode": ("generator",)}
    return {"forward": ()}


def optimize(pipe, graphs: bool = True, fuse: bool = True, max_graphs: int | None = None,
             pad_batch: bool = False, fuse_qkv: bool = True, fuse_temb: bool = True,
             fuse_ctxkv: bool = True, fuse_add_norm: bool = True, fuse_lora_add: bool = True,
             fuse_norm_shift: bool = True) -> OptimizeReport:
    """Optimize a diffusers pipeline (or one nn.Module) in place; idempotent. See the module docstring.

    Parameters
    ----------
    pipe : a diffusers DiffusionPipeline (its nn.Module components are optimized) or an nn.Module
    graphs : capture CUDA graphs per call signature (kernels.graphs); False: the patched eager path
    fuse : kernels.patch's fusions (shapetune/fusions.py)
    fuse_qkv : with `fuse`, each attention's q/k/v (or k/v) projections as one GEMM (kernels/qkv.py)
    fuse_temb : with `fuse`, the resnets' time-embedding projections as one GEMM per forward (kernels/temb.py)
    fuse_ctxkv : with `fuse_qkv`, every cross-attention's k/v as one GEMM per forward (kernels/ctxkv.py)
    fuse_add_norm : with `fuse`, a transformer block's attention residual add and the LayerNorm after it as
        one add_layer_norm kernel where one is tuned
    fuse_lora_add : with `fuse`, a PEFT LoRA Linear's scaled delta accumulated into its base output by one
        GEMM (kernels/lora.py)
    fuse_norm_shift : with `fuse`, where cuDNN runs a resnet's conv1, its bias and the time embedding added
        in the norm2 GroupNorm kernel where one is tuned with the shift
    max_graphs : LRU bound on graphs per wrapped method (default SHAPETUNE_MAX_GRAPHS or 16)
    pad_batch : a batch with no graph of its own replays a captured larger batch, padded
        (kernels.graphs.GraphedCall; SD's UNet, VAE and text encoders compute each sample on its own)

    Returns
    -------
    OptimizeReport: per component what was patched, its layout and graph statistics; `calls()` the
    op calls by outcome.
    """
    prev = getattr(pipe, _ATTR, None)
    if prev is not None:
        return prev
    comps = {}
    for name, m in _components(pipe).items():
        cl = any(isinstance(x, nn.Conv2d) for x in m.modules())
        if cl:
            _channels_last(m)
        opts = dict(fuse=fuse, fuse_qkv=fuse_qkv, fuse_temb=fuse_temb, fuse_ctxkv=fuse_ctxkv, fuse_add_norm=fuse_add_norm,
                    fuse_lora_add=fuse_lora_add, fuse_norm_shift=fuse_norm_shift)
        rep = patch(m, **opts)
        c = ComponentReport(name, type(m).__name__, rep, cl)
        if graphs:
            for meth, unused in _graph_methods(m).items():
                installed = m.__dict__.get(meth)  # a component shared with a pipeline optimized before (from_pipe)
                c.graphs[meth] = installed if isinstance(installed, GraphedCall) else GraphedCall(
                    m, meth, max_graphs=max_graphs, repatch=lambda mod, o=opts: patch(mod, **o),
                    unused_kwargs=unused, pad_batch=pad_batch)
        comps[name] = c
    report = OptimizeReport(comps)
    setattr(pipe, _ATTR, report)
    return report


def restore(pipe) -> None:
    """Undo optimize: graphs removed, modules unpatched, convolution weights back in contiguous memory."""
    report = getattr(pipe, _ATTR, None)
    if report is None:
        return
    for name, m in _components(pipe).items():
        c = report.components.get(name)
        if c is None:
            continue
        for g in c.graphs.values():
            g.uninstall()
        unpatch(m)
        if c.channels_last:
            m.to(memory_format=torch.contiguous_format)
    delattr(pipe, _ATTR)
