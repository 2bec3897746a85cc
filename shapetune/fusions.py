"""Where diffusers runs an elementwise op right after a module shapetune patches: the one table that
kernels.patch (which fuses there) and scheduler.extract (which extracts the fused workloads) both read.

    fusion_table() = {parent module type: rule};  rule(parent) -> {child path: Site}
    fusion_sites(model) -> {qualified module name: Site} over the whole model

A Site says what follows the child module's output inside the parent's forward:

  "silu"      GroupNorm, then the SiLU module `act` (an attribute of the parent): group_norm(+silu); with
              `shift`, the GroupNorm reads a biased conv's output + t[:, :, None, None] (group_norm's "shift"
              step: where cuDNN runs the conv, its bias and the time embedding go into the norm's kernel)
  "residual"  conv / linear, then `+ residual` (conv2d(+residual), linear epilogue residual)
  "shift"     conv, then `+ t[:, :, None, None]` per image and channel (conv2d(shift=): the bias_add pass
              after cuDNN adds it with the conv's bias)
  "gelu"      linear, then exact gelu (linear epilogue bias, gelu)
  "add_before"  LayerNorm of a residual sum `h = o + h` (add_layer_norm: the add and the norm in one
              kernel, where one is tuned; the producing linear keeps its "residual" site for the other case)

The rules (diffusers 0.3x-0.4x code paths):

  ResnetBlock2D          norm1 -> nonlinearity (SiLU); norm2 -> nonlinearity when time_embedding_norm
                         is "default"; output = (shortcut(input) + conv2(h)) / output_scale_factor, so
                         conv2 carries the residual (the scale is applied after the fused add: same math);
                         with a time_emb_proj and "default", h = conv1(h) + temb: conv1 carries the shift,
                         and norm2, which reads only that sum, the shift step where conv1 has a bias
  UNet2DConditionModel   conv_norm_out -> conv_act (SiLU)
  Transformer2DModel     continuous input, use_linear_projection False: output = proj_out(h) + input,
                         proj_out a 1x1 conv carries the residual
  Attention              residual_connection: to_out[0](o) (+ dropout, identity at inference) + input
  GELU (approximate "none")  gelu(proj(x)): proj carries the gelu epilogue (FeedForward "gelu")
  BasicTransformerBlock  norm_type "layer_norm", no positional embedding, no chunked feed-forward:
                         h = attn1(norm1(h)) + h, h = attn2(norm2(h), ctx) + h, h = ff(norm3(h)) + h,
                         so attn1.to_out.0, attn2.to_out.0 and the FeedForward's output Linear (ff.net.2)
                         carry the residual (attentions without residual_connection or a rescale factor;
                         kernels.patch restates the forward for exactly this case, the other norm types
                         with their ada-norm gates keep diffusers' forward); norm2 (norm3 without attn2)
                         and norm3 read attn1's and attn2's residual sums: add_before
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Site:
    kind: str  # "silu" | "residual" | "shift" | "gelu" | "add_before"
    act: str | None = None  # "silu": the parent's attribute holding the SiLU module
    shift: bool = False  # "silu": the GroupNorm's input is a biased conv's output + the time embedding


RESIDUAL = Site("residual")
SHIFT = Site("shift")
GELU_EPILOGUE = Site("gelu")
ADD_BEFORE = Site("add_before")


def _resnet_block(m) -> dict[str, Site]:
    sites = {"conv2": RESIDUAL}
    if m.time_emb_proj is not None and m.time_embedding_norm == "default":
        sites["conv1"] = SHIFT
    if type(m.nonlinearity) is nn.SiLU:
        sites["norm1"] = Site("silu", "nonlinearity")
        if m.time_embedding_norm == "default":  # norm2 -> SiLU directly only in this mode
            shift = "conv1" in sites and getattr(m.conv1, "bias", None) is not None
            sites["norm2"] = Site("silu", "nonlinearity", shift)
    return sites


def _unet(m) -> dict[str, Site]:
    if getattr(m, "conv_norm_out", None) is not None and type(getattr(m, "conv_act", None)) is nn.SiLU:
        return {"conv_norm_out": Site("silu", "conv_act")}
    return {}


def _transformer_2d(m) -> dict[str, Site]:
    if getattr(m, "is_input_continuous", False) and not m.use_linear_projection:
        return {"proj_out": RESIDUAL}
    return {}


def _attention(m) -> dict[str, Site]:
    return {"to_out.0": RESIDUAL} if getattr(m, "residual_connection", False) else {}


def _attn_plain(a) -> bool:
    return not getattr(a, "residual_connection", False) and getattr(a, "rescale_output_factor", 1.0) == 1.0


def _transformer_block(m) -> dict[str, Site]:
    if m.norm_type != "layer_norm" or m.pos_embed is not None or m._chunk_size is not None:
        return {}
    sites = {}
    for name in ("attn1", "attn2"):
        a = getattr(m, name, None)
        if a is not None and _attn_plain(a):
            sites[f"{name}.to_out.0"] = RESIDUAL
            # the LayerNorm that reads this residual sum: add_layer_norm where one is tuned
            after = "norm2" if name == "attn1" and getattr(m, "attn2", None) is not None else "norm3"
            if isinstance(getattr(m, after, None), nn.LayerNorm):
                sites[after] = ADD_BEFORE
    net = getattr(m.ff, "net", None)
    if net is not None and len(net) in (3, 4) and isinstance(net[2], nn.Linear):
        sites["ff.net.2"] = RESIDUAL
    return sites


def _gelu(m) -> dict[str, Site]:
    return {"proj": GELU_EPILOGUE} if m.approximate == "none" else {}


@functools.cache
def fusion_table() -> dict[type, Callable[[nn.Module], dict[str, Site]]]:
    """Parent module type -> rule: exact types (a subclass may have its own forward), but for
    UNet2DConditionModel's subclasses; built on first use (diffusers is imported then, not with
    `import kernels`)."""
    try:
        from diffusers.models.activations import GELU
        from diffusers.models.attention import BasicTransformerBlock
        from diffusers.models.attention_processor import Attention
        from diffusers.models.resnet import ResnetBlock2D
        from diffusers.models.transformers.transformer_2d import Transformer2DModel
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    except ImportError:  # pragma: no cover
        return {}
    return {ResnetBlock2D: _resnet_block, UNet2DConditionModel: _unet, Transformer2DModel: _transformer_2d,
            Attention: _attention, GELU: _gelu, BasicTransformerBlock: _transformer_block}


def _inherited() -> tuple[type, ...]:
    """Types whose rule also covers subclasses (it reads attributes only, not the forward's code)."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    return (UNet2DConditionModel,)


def sites_of(module: nn.Module) -> dict[str, Site]:
    """The fusion sites inside one module, by child path ("conv2", "to_out.0"); {} if none."""
    table = fusion_table()
    rule = table.get(type(module))
    if rule is None and table and isinstance(module, _inherited()):
        rule = next(table[c] for c in type(module).__mro__ if c in table)
    return rule(module) if rule is not None else {}


def fusion_sites(model: nn.Module) -> dict[str, Site]:
    """Every fusion site in `model`, by the child's qualified name (as named_modules spells it)."""
    out = {}
    for name, m in model.named_modules():
        for path, site in sites_of(m).items():
            out[f"{name}.{path}" if name else path] = site
    return out


# -- shared-input projections: one GEMM (kernels/qkv.py packs them) ----------------------------------
QKV, KV = ("to_q", "to_k", "to_v"), ("to_k", "to_v")


def qkv_group(attn: nn.Module, served: Callable[[nn.Module], bool] = lambda m: type(m) is nn.Linear
              ) -> tuple[str, ...] | None:
    """The projections of a diffusers Attention that kernels.patch runs as one GEMM: QKV where to_q,
    to_k and to_v take one width (self-attention shapes), else KV where to_k and to_v do (cross-attention:
    both read the context); None if neither. Each must be `served` (a plain nn.Linear; kernels.patch asks
    for a patched one), all with one dtype and device, and all with a bias or none."""
    for names in (QKV, KV):
        mods = [getattr(attn, n, None) for n in names]
        if not all(m is not None and served(m) for m in mods):
            continue
        w0, has_bias = mods[0].weight, mods[0].bias is not None
        if w0.is_floating_point() and all(
                m.weight.shape[1] == w0.shape[1] and m.weight.dtype == w0.dtype and m.weight.device == w0.device
                and (m.bias is not None) == has_bias for m in mods):
            return names
    return None


def qkv_members(group: tuple[str, ...], ctx_given: bool) -> tuple[str, ...]:
    """Of a packed `group`, the projections one attention call runs as one GEMM: all three for QKV when
    the call has no encoder_hidden_states (q, k, v all read the hidden states), else k and v (to_q then
    runs alone)."""
    return group if group == QKV and not ctx_given else KV


def attention_covered(attn: nn.Module, hidden_states, encoder_hidden_states=None, attention_mask=None) -> bool:
    """Whether kernels.patch's attention processor serves this call itself (else it runs the processor
    set before: masks, 4-D inputs, spatial / group norms, normalized q / k, cross-norms)."""
    return not (attention_mask is not None or hidden_states.ndim != 3
                or getattr(attn, "spatial_norm", None) is not None or getattr(attn, "group_norm", None) is not None
                or getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None
                or (encoder_hidden_states is not None and getattr(attn, "norm_cross", None)))


def ctx_kv_groups(model: nn.Module, served: Callable[[nn.Module], bool] | None = None) -> list[list[str]]:
    """The cross-attentions of `model` (qualified names, in module order) whose k/v projections
    kernels.patch runs as one GEMM per forward (kernels/ctxkv.py): every cross-attention of a UNet projects
    the same encoder_hidden_states, so their to_k / to_v weights stack into one [sum 2C, context width]
    matrix. An attention joins when it is `served` (default: its to_k / to_v pack as KV, `qkv_group`;
    kernels.patch asks for the ones kernels/qkv.py packed so); the groups split by context width, dtype,
    device and bias. Groups of one are left out."""
    try:
        from diffusers.models.attention_processor import Attention
    except ImportError:  # pragma: no cover
        return []
    served = served or (lambda a: qkv_group(a) == KV)
    groups: dict[tuple, list[str]] = {}
    for name, m in model.named_modules():
        if type(m) is not Attention or not served(m):
            continue
        w = m.to_k.weight
        groups.setdefault((w.shape[1], w.dtype, w.device, m.to_k.bias is not None), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


# -- the time-embedding projections: one GEMM per UNet (kernels/temb.py packs them) -----------------
def temb_groups(model: nn.Module, served: Callable[[nn.Module], bool] = lambda m: type(m) is nn.Linear
                ) -> list[list[str]]:
    """The ResnetBlock2D modules of `model` (qualified names, in module order) whose time-embedding
    projections kernels.patch runs as one GEMM per forward: every resnet projects the same
    SiLU(temb) (diffusers: `time_emb_proj(nonlinearity(temb))`), so their weights stack into one
    [sum C, temb_channels] matrix. A resnet joins when its time_emb_proj is `served`, its
    nonlinearity is nn.SiLU and applies to temb (no skip_time_act); the groups split by input width,
    dtype, device and bias. Groups of one are left out."""
    try:
        from diffusers.models.resnet import ResnetBlock2D
    except ImportError:  # pragma: no cover
        return []
    groups: dict[tuple, list[str]] = {}
    for name, m in model.named_modules():
        p = getattr(m, "time_emb_proj", None)
        if (type(m) is not ResnetBlock2D or p is None or not served(p) or m.skip_time_act
                or type(m.nonlinearity) is not nn.SiLU or not p.weight.is_floating_point()):
            continue
        key = (p.in_features, p.weight.dtype, p.weight.device, p.bias is not None)
        groups.setdefault(key, []).append(name)
    return [g for g in groups.values() if len(g) > 1]
