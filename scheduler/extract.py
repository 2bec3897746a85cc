"""Extract tunable workloads from a PyTorch model by running it once with forward hooks.

Each supported module type has a handler in ``HANDLERS`` that turns one call of the module
into zero or more ``Workload``s: the op families' module rules (shapetune.ops: nn.Linear,
nn.GroupNorm, nn.LayerNorm, nn.Conv2d, diffusers' GEGLU and Attention), the same rules kernels.patch
patches by; another family is one rule in its shapetune/ops file. ``extract_fused_workloads`` then
folds in the fusions kernels.patch applies (GroupNorm+SiLU, conv / linear + residual, linear + gelu),
read from shapetune/fusions.py, the one table both use.
"""

from __future__ import annotations

import copy
import functools
import json
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from shapetune.ops import ModuleRule, by_type, module_rules
from shapetune.ops.linear import linear_workload
from shapetune.workload import Workload

if TYPE_CHECKING:
    from shapetune.fusions import Site

# handler(module, args, kwargs, output, dtype) -> workloads produced by this one call
Handler = Callable[[nn.Module, tuple, dict, object, str], list[Workload]]


@dataclass(frozen=True)
class ExtractedOp:
    """One distinct workload found in a model.

    workload  the computation at concrete shapes
    modules   qualified names of the modules that ran it, in first-call order
    calls     how many times it ran in one forward pass (>= len(modules))
    """

    workload: Workload
    modules: tuple[str, ...]
    calls: int


def rule_handler(rule: ModuleRule) -> Handler:
    """A module rule (shapetune.ops) as a forward-hook handler: [] for an instance the rule does not
    serve (kernels.patch keeps torch's forward there), else the rule's workloads of this call."""

    def handler(module: nn.Module, args: tuple, kwargs: dict, output, dtype: str) -> list[Workload]:
        if rule.unsupported(module) is not None:
            return []
        return rule.workloads(module, args, kwargs, dtype)

    handler.rule = rule
    return handler


#: module type -> handler, from the op families' module rules (shapetune.ops, the rules kernels.patch
#: patches by): nn.Linear, nn.GroupNorm, nn.LayerNorm, nn.Conv2d, diffusers GEGLU and Attention.
HANDLERS: dict[type, Handler] = {t: rule_handler(r) for t, r in module_rules().items()}


def handlers_for(*kinds: str) -> dict[type, Handler]:
    """The HANDLERS of the named rule kinds ("linear", "conv2d", "group_norm", ...)."""
    return {t: h for t, h in HANDLERS.items() if h.rule.kind in kinds}


def _handler_for(module: nn.Module, handlers: dict[type, Handler]) -> Handler | None:
    """The handler of module's exact type, else of its nearest base class whose rule covers
    subclasses (shapetune.ops.rule_for); a handler without a rule (a caller's own) covers them all."""
    return by_type(handlers, module, lambda h: getattr(h, "rule", None) is None or h.rule.subclasses)


def _to_device(obj, device: torch.device, materialize: bool):
    """Move tensors in (nested) inputs to ``device``; meta tensors become zeros if materializing."""
    if isinstance(obj, torch.Tensor):
        if materialize and obj.is_meta:
            return torch.zeros(obj.shape, dtype=obj.dtype, device=device)
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device, materialize) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device, materialize) for v in obj)
    return obj


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _record_calls(model, inputs, dtype, handlers, method: str = "forward") -> list[tuple[Workload, str]]:
    """(workload, module name) per handled call, in call order. The projections kernels.patch runs as one
    GEMM (shapetune.fusions.qkv_group / qkv_members: an attention's to_q/to_k/to_v, or to_k/to_v) are
    recorded as that one linear workload (their rows summed), under the first projection's name; so are
    a UNet's time-embedding projections (shapetune.fusions.temb_groups) and its cross-attentions' k/v
    (shapetune.fusions.ctx_kv_groups), once per forward."""
    from shapetune.fusions import KV, attention_covered, ctx_kv_groups, qkv_group, qkv_members, temb_groups
    from shapetune.ops.attention import _attention_type
    from shapetune.ops import call_arg

    calls: list[tuple[Workload, str]] = []
    hooks = []
    attn_type = _attention_type()
    groups: dict[str, tuple[str, str]] = {}  # projection name -> (its attention's name, its short name)
    current: dict[str, tuple[tuple[str, ...], list]] = {}  # attention name -> (this call's members, pending)
    for name, module in model.named_modules():
        if attn_type is None or not isinstance(module, attn_type):
            continue
        group = qkv_group(module)
        if group is None:
            continue
        for short in group:
            groups[f"{name}.{short}" if name else short] = (name, short)

        def pre(mod, args, kwargs, _name=name, _group=group):
            x = call_arg(args, kwargs, 0, "hidden_states")
            ctx = call_arg(args, kwargs, 1, "encoder_hidden_states")
            mask = call_arg(args, kwargs, 2, "attention_mask")
            covered = attention_covered(mod, x, ctx, mask) and not (
                set(kwargs) - {"hidden_states", "encoder_hidden_states", "attention_mask"}) and len(args) <= 3
            current[_name] = (qkv_members(_group, ctx is not None) if covered else (), [], ctx is not None)

        hooks.append(module.register_forward_pre_hook(pre, with_kwargs=True))

    # the resnets' time-embedding projections: one GEMM per forward (kernels/temb.py), recorded at the
    # first member's call of each forward under the group's first projection's name
    temb_of: dict[str, list] = {}  # time_emb_proj name -> [its group's names, total width, calls so far]
    mods = dict(model.named_modules())
    for members in temb_groups(model):
        names = [f"{n}.time_emb_proj" for n in members]
        state = [names, sum(mods[n].out_features for n in names), 0]
        for n in names:
            temb_of[n] = state

    # the cross-attentions' k/v: one GEMM per forward (kernels/ctxkv.py), recorded at the first member's
    # k/v call of each forward under the group's first to_k's name
    ctx_of: dict[str, list] = {}  # attention name -> [its group's names, total width, k/v calls so far]
    for members in ctx_kv_groups(model):
        state = [members, sum(2 * mods[n].to_k.out_features for n in members), 0]
        for n in members:
            ctx_of[n] = state

    def record(w: Workload, name: str) -> None:
        tg = temb_of.get(name)
        if tg is not None and w.op == "linear":
            names, total, seen = tg
            if seen % len(names) == 0:
                d = w.dim
                calls.append((linear_workload(d["m"], total, d["k"], w.dtype, epilogue=w.epilogue), names[0]))
            tg[2] = seen + 1
            return
        owner = groups.get(name)
        if owner is None or w.op != "linear" or owner[0] not in current:
            calls.append((w, name))
            return
        attn, short = owner
        members, pending, ctx_given = current[attn]
        if short not in members:
            calls.append((w, name))
            return
        pending.append((w, name))
        if len(pending) == len(members):
            d = [x.dim for x, _ in pending]
            first, first_name = pending[0]
            cg = ctx_of.get(attn)
            if cg is not None and ctx_given and members == KV:
                names, total, seen = cg
                if seen % len(names) == 0:
                    calls.append((linear_workload(d[0]["m"], total, d[0]["k"], first.dtype, epilogue=first.epilogue),
                                  f"{names[0]}.to_k" if names[0] else "to_k"))
                cg[2] = seen + 1
                pending.clear()
                return
            calls.append((linear_workload(d[0]["m"], sum(x["n"] for x in d), d[0]["k"], first.dtype,
                                          epilogue=first.epilogue), first_name))
            pending.clear()

    for name, module in model.named_modules():
        handler = _handler_for(module, handlers)
        if handler is None:
            continue

        def hook(mod, args, kwargs, output, _name=name, _handler=handler):
            for w in _handler(mod, args, kwargs, output, dtype):
                record(w, _name)

        hooks.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.inference_mode():
            getattr(model, method)(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return calls


def _aggregate(calls: list[tuple[Workload, str]]) -> list[ExtractedOp]:
    modules: dict[Workload, list[str]] = {}
    counts: dict[Workload, int] = {}
    for w, name in calls:
        names = modules.setdefault(w, [])
        if name not in names:
            names.append(name)
        counts[w] = counts.get(w, 0) + 1
    return [ExtractedOp(w, tuple(names), counts[w]) for w, names in modules.items()]


def extract_workloads(
    model: nn.Module,
    example_inputs: dict,
    dtype: str = "float16",
    handlers: dict[type, Handler] | None = None,
    method: str = "forward",
) -> list[ExtractedOp]:
    """Run one forward pass (or `method`, e.g. an autoencoder's ``decode``) and collect the distinct
    workloads of every handled module call.

    The pass runs where the model's parameters live. Build the model on the meta device
    (``with torch.device("meta"):``) to get shapes with no compute and no memory. If the meta
    pass fails (an op without a meta kernel), it is retried on a CPU float32 copy of the model
    with uninitialized weights, so pass small inputs for large models in that case.

    Parameters
    ----------
    model : nn.Module
        The model; it is not modified.
    example_inputs : dict
        Keyword arguments for ``model(**example_inputs)``; tensors are moved to the model's device.
    dtype : str
        Element type recorded in the workloads (the dtype the kernels will run in), independent
        of the dtype the extraction pass runs in.
    handlers : dict, optional
        Module type -> handler table; defaults to ``HANDLERS``.
    method : str
        The model's method to call with ``example_inputs`` ("forward": ``model(**example_inputs)``).

    Returns
    -------
    list of ExtractedOp
        One per distinct workload, in order of first call.
    """
    handlers = HANDLERS if handlers is None else handlers
    device = _model_device(model)
    try:
        calls = _record_calls(model, _to_device(example_inputs, device, False), dtype, handlers, method)
    except (NotImplementedError, RuntimeError) as e:
        if device.type != "meta":
            raise
        warnings.warn(f"meta-device pass failed ({e}); retrying on CPU in float32", stacklevel=2)
        cpu_model = copy.deepcopy(model).to_empty(device="cpu").float()
        inputs = _to_device(example_inputs, torch.device("cpu"), True)
        inputs = {
            k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in inputs.items()
        }
        calls = _record_calls(cpu_model, inputs, dtype, handlers, method)
    return _aggregate(calls)


def sd15_unet_inputs(
    batch: int = 2, height: int = 512, width: int = 512, seq: int = 77, device="meta", ctx_dim: int = 768
) -> dict:
    """Keyword inputs for the SD 1.5 UNet at one denoising step.

    Parameters
    ----------
    batch : int
        UNet batch. Classifier-free guidance runs the UNet at batch 2 for one image.
    height, width : int
        Image size in pixels; the latent is height/8 x width/8.
    seq : int
        Text tokens in ``encoder_hidden_states`` (CLIP: 77).
    device : str or torch.device
        Where to allocate the tensors.
    ctx_dim : int
        Channels of ``encoder_hidden_states`` (the UNet's cross_attention_dim; SD 1.5: 768).

    Returns
    -------
    dict
        ``sample``, ``timestep`` and ``encoder_hidden_states``.
    """
    if height % 8 or width % 8:
        raise ValueError(f"height and width must be multiples of 8, got {height}x{width}")
    return {
        "sample": torch.zeros(batch, 4, height // 8, width // 8, device=device),
        "timestep": torch.tensor(999, device=device),
        "encoder_hidden_states": torch.zeros(batch, seq, ctx_dim, device=device),
    }


def sdxl_unet_inputs(batch: int = 2, height: int = 1024, width: int = 1024, seq: int = 77, device="meta",
                     ctx_dim: int = 2048, text_embeds_dim: int = 1280) -> dict:
    """Keyword inputs for the SDXL UNet at one denoising step, as StableDiffusionXLPipeline passes them.

    Parameters
    ----------
    batch, height, width, seq, device
        As ``sd15_unet_inputs``.
    ctx_dim : int
        Channels of ``encoder_hidden_states``: both text encoders' states side by side (SDXL: 768 + 1280).
    text_embeds_dim : int
        Channels of the pooled text embedding (the second encoder's projection; SDXL: 1280):
        ``sdxl_text_embeds_dim(unet.config)``.

    Returns
    -------
    dict
        sd15_unet_inputs' ``sample``, ``timestep``, ``encoder_hidden_states``, and ``added_cond_kwargs``:
        ``text_embeds`` [batch, text_embeds_dim] and ``time_ids`` [batch, 6] (original size, crop
        top-left, target size: height, width, 0, 0, height, width).
    """
    inputs = sd15_unet_inputs(batch, height, width, seq, device, ctx_dim)
    time_ids = torch.tensor([[height, width, 0, 0, height, width]] * batch, dtype=torch.float32, device=device)
    inputs["added_cond_kwargs"] = {"text_embeds": torch.zeros(batch, text_embeds_dim, device=device),
                                   "time_ids": time_ids}
    return inputs


def sdxl_text_embeds_dim(config) -> int:
    """The pooled text embedding's width a text_time UNet config takes: its add_embedding reads
    text_embeds and 6 time ids embedded at addition_time_embed_dim each, concatenated."""
    return config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim


def sd15_linear_workloads(
    batch: int = 2, height: int = 512, width: int = 512, seq: int = 77, dtype: str = "float16"
) -> list[ExtractedOp]:
    """The distinct linear (GEMM) workloads of one SD 1.5 UNet forward pass; a linear diffusers follows
    with a residual add or a gelu (shapetune.fusions) becomes that epilogue's workload: in SD 1.5, the
    transformer blocks' attn1/attn2 to_out.0 and ff.net.2 (bias, residual).

    Parameters
    ----------
    batch : int
        UNet batch (2 for one image with classifier-free guidance).
    height, width : int
        Image size in pixels.
    seq : int
        Text tokens.
    dtype : str
        Element type recorded in the workloads.

    Returns
    -------
    list of ExtractedOp
        One per distinct workload, in order of first call.
    """
    return _sd15_fused(handlers_for("linear"), batch, height, width, dtype, True, seq)


def sd15_geglu_workloads(
    batch: int = 2, height: int = 512, width: int = 512, seq: int = 77, dtype: str = "float16"
) -> list[ExtractedOp]:
    """The distinct GEGLU workloads (geglu m, f, k) of one SD 1.5 UNet forward pass: every
    transformer block's FeedForward, proj = Linear(C, 2 * 4C), so f = 4C, k = C.

    Parameters and returns as ``sd15_linear_workloads``.
    """
    from scheduler.sd_configs import build_sd15_unet

    unet = build_sd15_unet(device="meta")
    inputs = sd15_unet_inputs(batch, height, width, seq, device="meta")
    return extract_workloads(unet, inputs, dtype=dtype, handlers=handlers_for("geglu"))


def sd15_attention_workloads(
    batch: int = 2, height: int = 512, width: int = 512, seq: int = 77, dtype: str = "float16"
) -> list[ExtractedOp]:
    """The distinct attention workloads of one SD 1.5 UNet forward pass: each transformer block's
    self-attention (attn1, sq = skv = latent tokens) and cross-attention (attn2, skv = `seq`).

    Parameters and returns as ``sd15_linear_workloads``.
    """
    from scheduler.sd_configs import build_sd15_unet

    unet = build_sd15_unet(device="meta")
    inputs = sd15_unet_inputs(batch, height, width, seq, device="meta")
    return extract_workloads(unet, inputs, dtype=dtype, handlers=handlers_for("attention"))


def fused_workload(w: Workload, site: Site | None) -> Workload | None:
    """The workload of `w`'s op with the elementwise op diffusers runs after it (a shapetune.fusions Site)
    in the epilogue: group_norm(+silu), conv2d(+residual), linear epilogue (bias,) residual / gelu; or
    before it: a LayerNorm of a residual sum, add_layer_norm; a GroupNorm of a conv's output + the time
    embedding, group_norm's "shift" step. None where the site does not apply to this op (keep w)."""
    from shapetune.ops.conv import conv2d_workload, stride_padding
    from shapetune.ops.norm import add_layer_norm_workload, eps_of, group_norm_workload

    if site is None:
        return None
    d = w.dim
    if w.op == "group_norm" and site.kind == "silu" and "silu" not in w.epilogue:
        return group_norm_workload(d["n"], d["hw"], d["c"], d["g"], w.dtype, eps_of(w), True, shift=site.shift)
    if w.op == "layer_norm" and site.kind == "add_before":
        return add_layer_norm_workload(d["m"], d["c"], w.dtype, eps_of(w))
    if w.op == "conv2d" and site.kind == "residual" and "residual" not in w.epilogue:
        st, pad = stride_padding(w)
        return conv2d_workload(d["n"], d["h"], d["w"], d["ci"], d["co"], d["kh"], d["kw"], st, pad, w.dtype,
                               "bias" in w.epilogue, True)
    if w.op == "linear" and site.kind in ("residual", "gelu") and w.epilogue in ((), ("bias",)):
        return linear_workload(d["m"], d["n"], d["k"], w.dtype, epilogue=w.epilogue + (site.kind,))
    return None


def apply_fusions(ops: list[ExtractedOp], sites: dict[str, Site]) -> list[ExtractedOp]:
    """Split each op's modules by their fusion site (`sites`: shapetune.fusions.fusion_sites of the
    model) into the fused workload (fused_workload) where one applies; calls are shared pro rata."""
    out: dict = {}
    for op in ops:
        groups: dict = {op.workload: []}  # the unfused modules first, then each fusion's
        for m in op.modules:
            groups.setdefault(fused_workload(op.workload, sites.get(m)) or op.workload, []).append(m)
        for ww, mods in groups.items():
            if not mods:
                continue
            calls = round(op.calls * len(mods) / len(op.modules))
            prev = out.get(ww)
            out[ww] = ExtractedOp(ww, (prev.modules if prev else ()) + tuple(mods), (prev.calls if prev else 0) + calls)
    return list(out.values())


def extract_fused_workloads(model: nn.Module, example_inputs: dict, dtype: str = "float16",
                            handlers: dict[type, Handler] | None = None) -> list[ExtractedOp]:
    """extract_workloads, then the fusions kernels.patch applies (shapetune.fusions: GroupNorm+SiLU,
    conv/linear + residual, linear + gelu) folded into the workloads of the modules they follow."""
    from shapetune.fusions import fusion_sites

    return apply_fusions(extract_workloads(model, example_inputs, dtype, handlers), fusion_sites(model))


def elementwise_workloads(ops: list[ExtractedOp], sites: dict[str, Site]) -> list[ExtractedOp]:
    """The elementwise passes (shapetune/ops/elementwise.py) that unfused `ops` (extract_workloads)
    run where they take torch's GEMM / cuDNN path: gelu_gate(m, f) per geglu; bias_add(n, ho*wo, co)
    per conv2d with a bias, its epilogue from the conv's fusion site (residual, shift, or none)."""
    from shapetune.ops.conv import out_hw
    from shapetune.ops.elementwise import bias_add_workload, gelu_gate_workload

    calls: list[tuple[Workload, str]] = []
    for op in ops:
        w, d = op.workload, op.workload.dim
        per_module = max(1, round(op.calls / len(op.modules)))
        for m in op.modules:
            if w.op == "geglu":
                ew = gelu_gate_workload(d["m"], d["f"], w.dtype)
            elif w.op == "conv2d" and "bias" in w.epilogue:
                site = sites.get(m)
                epi = (site.kind,) if site is not None and site.kind in ("residual", "shift") else ()
                ho, wo = out_hw(w)
                ew = bias_add_workload(d["n"], ho * wo, d["co"], w.dtype, epi)
            else:
                continue
            calls += [(ew, m)] * per_module
    return _aggregate(calls)


def sd15_elementwise_workloads(batch: int = 2, height: int = 512, width: int = 512,
                               dtype: str = "float16") -> list[ExtractedOp]:
    """The distinct elementwise passes of one SD 1.5 UNet forward pass (elementwise_workloads): the
    GEGLU gates and every biased conv's bias (+ residual | + time embedding) pass."""
    from scheduler.sd_configs import build_sd15_unet
    from shapetune.fusions import fusion_sites

    unet = build_sd15_unet(device="meta")
    inputs = sd15_unet_inputs(batch, height, width, device="meta")
    ops = extract_workloads(unet, inputs, dtype, handlers=handlers_for("conv2d", "geglu"))
    return elementwise_workloads(ops, fusion_sites(unet))


def _sd15_fused(handlers: dict, batch: int, height: int, width: int, dtype: str, fuse: bool,
                seq: int = 77) -> list[ExtractedOp]:
    from scheduler.sd_configs import build_sd15_unet

    unet = build_sd15_unet(device="meta")
    inputs = sd15_unet_inputs(batch, height, width, seq, device="meta")
    if not fuse:
        return extract_workloads(unet, inputs, dtype, handlers=handlers)
    return extract_fused_workloads(unet, inputs, dtype, handlers=handlers)


def sd15_norm_workloads(batch: int = 2, height: int = 512, width: int = 512, dtype: str = "float16",
                        fuse_silu: bool = True) -> list[ExtractedOp]:
    """The distinct group_norm / layer_norm workloads of one SD 1.5 UNet forward pass; GroupNorms
    that diffusers follows with SiLU (shapetune.fusions) become group_norm(+silu) workloads with `fuse_silu`."""
    return _sd15_fused(handlers_for("group_norm", "layer_norm"), batch, height, width, dtype,
                       fuse_silu)


def sd15_conv_workloads(batch: int = 2, height: int = 512, width: int = 512, dtype: str = "float16",
                        fuse_residual: bool = True) -> list[ExtractedOp]:
    """The distinct conv2d workloads of one SD 1.5 UNet forward pass; convs whose output diffusers
    adds a residual to (shapetune.fusions: ResnetBlock2D.conv2, Transformer2DModel's 1x1 proj_out)
    become conv2d(+residual) workloads with `fuse_residual`."""
    return _sd15_fused(handlers_for("conv2d"), batch, height, width, dtype, fuse_residual)


#: family -> the function listing its SD 1.5 UNet workloads (batch, height, width, dtype keywords)
SD15_FAMILIES = {
    "linear": lambda **kw: sd15_linear_workloads(**kw),
    "geglu": lambda **kw: sd15_geglu_workloads(**kw),
    "norms": lambda **kw: sd15_norm_workloads(**kw),
    "conv": lambda **kw: sd15_conv_workloads(**kw),
    "attention": lambda **kw: sd15_attention_workloads(**kw),
    "elementwise": lambda **kw: sd15_elementwise_workloads(**kw),
}

# -- every family in one pass ------------------------------------------------------------------------
#: family -> (the module rule kinds it records, whether shapetune.fusions' epilogues are folded in), as
#: the sd15_<family>_workloads functions extract them; "elementwise" is derived from unfused conv2d and
#: geglu calls (elementwise_workloads)
FAMILY_RULES = {"linear": (("linear",), True), "geglu": (("geglu",), False),
                "norms": (("group_norm", "layer_norm"), True), "conv": (("conv2d",), True),
                "attention": (("attention",), False), "elementwise": (("conv2d", "geglu"), False)}


#: rule kinds whose served module computes its child modules' ops inside its own op instead of calling
#: them: diffusers' GEGLU runs proj's GEMM in the geglu op (tuned, or torch's F.linear on its vendor path),
#: so a patched model never calls its patched proj, though every nn.Linear's extraction lists it
OWNS_CHILDREN = ("geglu",)


def inside_owners(model: nn.Module) -> set[str]:
    """Names of the modules inside a module that kernels.patch serves by an OWNS_CHILDREN rule."""
    owners = handlers_for(*OWNS_CHILDREN)
    tops = [n + "." for n, m in model.named_modules()
            if (h := _handler_for(m, owners)) is not None and h.rule.unsupported(m) is None]
    return {n for n, _ in model.named_modules() if n.startswith(tuple(tops))} if tops else set()


def _without(ops: list[ExtractedOp], names: set[str]) -> list[ExtractedOp]:
    """ops less the calls of the modules `names` (each module's share of its op's calls)."""
    out = []
    for op in ops:
        keep = tuple(m for m in op.modules if m not in names)
        if keep:
            out.append(op if len(keep) == len(op.modules) else
                       ExtractedOp(op.workload, keep, round(op.calls * len(keep) / len(op.modules))))
    return out


def family_workloads(model: nn.Module, inputs: dict, families=tuple(FAMILY_RULES), dtype: str = "float16",
                     method: str = "forward", dispatched: bool = False) -> list[ExtractedOp]:
    """The distinct workloads of the named families (FAMILY_RULES) in one call of `model`'s `method`:
    one pass with every family's handlers, then each family's ops as its own extraction gives them
    (the same list as one pass per family: a hook records its module's calls whatever else is hooked).
    `dispatched`: only the calls a kernels.patch-ed model dispatches (not those of modules inside an
    OWNS_CHILDREN module: GEGLU's proj), what a grid's buckets are weighted by.

    Parameters and returns as ``extract_workloads``; families in order, each in first-call order.
    """
    from shapetune.fusions import fusion_sites

    unknown = [f for f in families if f not in FAMILY_RULES]
    if unknown:
        raise ValueError(f"unknown op families {unknown}; known: {', '.join(FAMILY_RULES)}")
    kinds = {k for f in families for k in FAMILY_RULES[f][0]}
    handlers = handlers_for(*kinds)
    kind_of = {}  # module name -> its rule's kind
    for name, m in model.named_modules():
        h = _handler_for(m, handlers)
        if h is not None:
            kind_of[name] = h.rule.kind
    raw = extract_workloads(model, inputs, dtype, handlers, method)
    if dispatched:
        raw = _without(raw, inside_owners(model))
    sites = fusion_sites(model)
    out: list[ExtractedOp] = []
    for f in families:
        fk, fuse = FAMILY_RULES[f]
        ops = [op for op in raw if kind_of[op.modules[0]] in fk]
        out += elementwise_workloads(ops, sites) if f == "elementwise" else apply_fusions(ops, sites) if fuse else ops
    return out


def sd15_workloads(families=tuple(SD15_FAMILIES), batch: int = 2, height: int = 512, width: int = 512,
                   dtype: str = "float16") -> list[ExtractedOp]:
    """Every distinct workload of the named op families in one SD 1.5 UNet forward pass (one pass for
    all of them: family_workloads; every nn.Linear's GEMM, GEGLU's proj included)."""
    return model_workloads("unet", families, batch, height, width, dtype, dispatched=False)


# -- the VAE decoder ---------------------------------------------------------------------------------
def sd15_vae_inputs(batch: int = 1, height: int = 512, width: int = 512, device="meta",
                    latent_channels: int = 4) -> dict:
    """Keyword inputs for AutoencoderKL.decode: latents ``z`` [batch, 4, height / 8, width / 8] for
    an image of height x width pixels."""
    if height % 8 or width % 8:
        raise ValueError(f"height and width must be multiples of 8, got {height}x{width}")
    return {"z": torch.zeros(batch, latent_channels, height // 8, width // 8, device=device)}


def sd15_vae_workloads(families=tuple(FAMILY_RULES), batch: int = 1, height: int = 512, width: int = 512,
                       dtype: str = "float16") -> list[ExtractedOp]:
    """The distinct workloads of the named families in one SD 1.5 VAE decode (AutoencoderKL.decode:
    post_quant_conv, then the decoder) of `batch` latents for height x width pixel images, through the
    handlers kernels.patch patches by: its convs, GroupNorms (+SiLU), the mid-block attention's
    linears (its 4-D attention call keeps SDPA: no attention workload) and the convs' bias passes."""
    return model_workloads("vae", families, batch, height, width, dtype)


# -- models on the meta device, by name --------------------------------------------------------------
@functools.cache
def _meta_model(name: str, tiny: bool) -> nn.Module:
    from scheduler.pipelines import TINY_UNET
    from scheduler.sd_configs import build_sd15_unet, build_sd15_vae, build_sdxl_unet

    if name in VAES:  # SDXL's VAE is SD 1.5's architecture (at sample size 1024: the decode is the same)
        return build_sd15_vae(device="meta", tiny=tiny)
    if name == "sdxl_unet":
        return build_sdxl_unet(device="meta", tiny=tiny)
    if not tiny:
        return build_sd15_unet(device="meta")
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**TINY_UNET).eval()


#: the models the grid extracts: name -> what one call is (a UNet's forward: one denoising step; a VAE's
#: decode): SD 1.5's UNet and VAE, SDXL base's UNet and VAE
MODELS = ("unet", "vae", "sdxl_unet", "sdxl_vae")
UNETS, VAES = ("unet", "sdxl_unet"), ("vae", "sdxl_vae")
#: --models shorthands: a pipeline's models
MODEL_SETS = {"sd15": ("unet", "vae"), "sdxl": ("sdxl_unet", "sdxl_vae")}
SEQ, TINY_SEQ = 77, 7  # text tokens: CLIP's; the tiny UNets' (scripts/bench_e2e.py --tiny)


def parse_models(spec: str) -> list[str]:
    """A --models value: comma-separated MODELS or MODEL_SETS ("sdxl" = sdxl_unet,sdxl_vae), in order, once each."""
    out: list[str] = []
    for m in (m for m in spec.replace(" ", "").split(",") if m):
        if m not in MODELS and m not in MODEL_SETS:
            raise ValueError(f"--models {spec!r}: unknown model {m!r}; known: {', '.join(MODELS + tuple(MODEL_SETS))}")
        out += MODEL_SETS.get(m, (m,))
    if not out:
        raise ValueError(f"--models {spec!r}: no model")
    return list(dict.fromkeys(out))


#: the default grid per model set (parse_grid): SD 1.5's 1352 shapes; SDXL's, as issue 12 item 3 asks (1024², batch 1-2)
DEFAULT_GRIDS = {"sd15": "1-8x256-1024", "sdxl": "1-2x1024"}


def default_grid(models: list[str]) -> str:
    """The DEFAULT_GRIDS entry of the one model set (MODEL_SETS) that holds every model; ValueError if they mix."""
    sets = [k for k, ms in MODEL_SETS.items() if set(models) <= set(ms)]
    if not sets:
        raise ValueError(f"--models {','.join(models)} mixes SD 1.5 and SDXL models: give --grid")
    return DEFAULT_GRIDS[sets[0]]


def model_inputs(model: str, batch: int, height: int, width: int, tiny: bool = False, device="meta") -> dict:
    """Keyword inputs of one call of `model` (MODELS) at batch x height x width pixels: a UNet's
    (sd15_unet_inputs / sdxl_unet_inputs, text SEQ tokens, TINY_SEQ with `tiny`), a VAE's decode latents."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
    if model in VAES:
        return sd15_vae_inputs(batch, height, width, device)
    cfg, seq = _meta_model(model, tiny).config, TINY_SEQ if tiny else SEQ
    if model == "sdxl_unet":
        return sdxl_unet_inputs(batch, height, width, seq, device, cfg.cross_attention_dim, sdxl_text_embeds_dim(cfg))
    return sd15_unet_inputs(batch, height, width, seq, device, cfg.cross_attention_dim)


def model_workloads(model: str, families=tuple(FAMILY_RULES), batch: int = 2, height: int = 512,
                    width: int = 512, dtype: str = "float16", tiny: bool = False,
                    dispatched: bool = True) -> list[ExtractedOp]:
    """family_workloads of one call of `model` (MODELS: "unet" / "sdxl_unet": a denoising step, text SEQ
    tokens; "vae" / "sdxl_vae": a decode) at batch x height x width pixels, built on the meta device
    (once per process); `tiny`: scheduler.pipelines' tiny configs (CPU tests); `dispatched` (default):
    the calls a patched model dispatches (family_workloads)."""
    inputs = model_inputs(model, batch, height, width, tiny)
    return family_workloads(_meta_model(model, tiny), inputs, families, dtype,
                            "decode" if model in VAES else "forward", dispatched)


def workload_keys(models: list[str], shapes: list[tuple[int, int, int]], dtype: str = "float16", policy=None,
                  tiny: bool = False) -> set[str]:
    """The keys of every workload a patched call of each of `models` (MODELS) dispatches at each
    (batch, height, width) of `shapes` in `dtype`, and of the bucket (`policy`, default DEFAULT) that
    holds each: what a registry can serve those calls from (prebuild --models/--shapes verifies and
    builds just these)."""
    from shapetune.buckets import DEFAULT

    policy = policy or DEFAULT
    keys: set[str] = set()
    for m in models:
        for b, h, w in shapes:
            for op in model_workloads(m, batch=b, height=h, width=w, dtype=dtype, tiny=tiny):
                keys.add(op.workload.key)
                if (bucket := policy.bucket_of(op.workload)) is not None:
                    keys.add(bucket.key)
    return keys


# -- shape grids -------------------------------------------------------------------------------------
def clog2(v: int) -> int:
    """ceil(log2(v)) for v >= 1: the index of the pow2 bucket (2^(i-1), 2^i] that holds v."""
    return (v - 1).bit_length()


def shape_class(batch: int, height: int, width: int, exact_hw: bool, seq: int = SEQ) -> tuple:
    """A key such that two shapes (batch, height, width in pixels, multiples of 64) of one key give
    each model of extract.MODELS (the SD 1.5 and SDXL UNets and VAE decoders) the same bucket workloads
    with the same calls (grid_bucket_calls; tests/scheduler/test_grid*.py check it per model).

    Why it holds. With the latent h x w = height / 8 x width / 8 (multiples of 8), every level of the
    UNet (SD 1.5: 3 stride-2 downsamplings, SDXL: 2) and of the VAE decoder (3 2x upsamplings) has an
    exact h x w / 4^k or h x w x 4^k positions, P x 2^j (P = h x w, j an integer). So, conv2d aside,
    every dim of every workload is one of: the batch b (group_norm / bias_add n, attention b, the time
    embedding's GEMMs m, SDXL's added-condition GEMMs too), positions P x 2^j (group_norm / bias_add hw,
    attention sq / skv), rows b x P x 2^j (linear, geglu, layer_norm, gelu_gate m), the text rows
    b x seq (cross-attention's k / v GEMMs; SDXL's text is SD 1.5's 77 tokens, 2048 wide) or seq (skv),
    or a constant (channels, heads); the same modules run at every shape, each the same number of times.
    Every bucket edge is a power of two (BATCH edges 1, 2, 4, ...; pow2 edges 16, 32, ..., 2^20, beyond
    them none), so the bucket of x x 2^j is fixed by clog2(x) + j: the key (clog2 b, clog2 b x seq,
    clog2 P, clog2 b x P) fixes every bucket of every call. conv2d keeps h and w exact and buckets n
    (its only batch dim) on the BATCH edges: its key (`exact_hw`) is (clog2 b, height, width).
    """
    if height % 64 or width % 64 or min(batch, height, width) < 1:
        raise ValueError(f"shape {batch}x{height}x{width}: need batch >= 1 and pixel sizes multiples of 64")
    if exact_hw:
        return clog2(batch), height, width
    p = (height // 8) * (width // 8)
    return clog2(batch), clog2(batch * seq), clog2(p), clog2(batch * p)


def grid_classes(shapes, exact_hw: bool, seq: int = SEQ) -> dict[tuple, list[tuple[int, int, int]]]:
    """{shape_class: its shapes, in order}."""
    out: dict[tuple, list] = {}
    for b, h, w in shapes:
        out.setdefault(shape_class(b, h, w, exact_hw, seq), []).append((b, h, w))
    return out


def parse_grid(spec: str) -> list[tuple[int, int, int]]:
    """A --grid value, BATCHESxSIZES or BATCHESxHEIGHTSxWIDTHS, each axis a range A-B or values A,B,...:
    batches step 1, pixel sizes step 64 (multiples of 64); SIZES alone gives every height x width
    pair, square and not: "1-8x256-1024" -> the 8 x 13 x 13 = 1352 shapes (batch, height, width)."""
    parts = spec.replace(" ", "").split("x")
    if len(parts) not in (2, 3):
        raise ValueError(f"--grid {spec!r}: expected BATCHESxSIZES or BATCHESxHEIGHTSxWIDTHS")

    def axis(text: str, step: int) -> list[int]:
        vals: list[int] = []
        for item in text.split(","):
            lo, _, hi = item.partition("-")
            try:
                a, b = int(lo), int(hi or lo)
            except ValueError:
                raise ValueError(f"--grid {spec!r}: {item!r} is not N or A-B") from None
            if a < 1 or b < a or a % step or (b - a) % step:
                raise ValueError(f"--grid {spec!r}: {item!r} needs 1 <= A <= B" +
                                 (f", multiples of {step}" if step > 1 else ""))
            vals += range(a, b + 1, step)
        return list(dict.fromkeys(vals))

    batches, heights = axis(parts[0], 1), axis(parts[1], 64)
    widths = axis(parts[2], 64) if len(parts) == 3 else heights
    return [(b, h, w) for b in batches for h in heights for w in widths]


def save_workload_file(path: str | Path, workloads: Iterable[Workload | ExtractedOp], meta: dict | None = None) -> None:
    """Write workloads as JSON ``{"workloads": [w.to_json(), ...]}`` (what ``shapetune tune`` reads).

    Parameters
    ----------
    path : str or Path
        Output file.
    workloads : iterable of Workload or ExtractedOp
        Written in order; duplicates are dropped.
    meta : dict, optional
        Free-form provenance stored under ``"meta"``; readers ignore it.
    """
    seen: dict[Workload, None] = {}
    for w in workloads:
        seen.setdefault(w.workload if isinstance(w, ExtractedOp) else w, None)
    # one workload per line: readable and diff-friendly
    lines = ",\n".join("    " + json.dumps(w.to_json()) for w in seen)
    head = f'{{\n  "meta": {json.dumps(meta)},\n' if meta else "{\n"
    Path(path).write_text(f'{head}  "workloads": [\n{lines}\n  ]\n}}\n')


def load_workload_file(path: str | Path) -> list[Workload]:
    """Read a workload file written by ``save_workload_file``.

    Parameters
    ----------
    path : str or Path
        JSON file with a top-level ``"workloads"`` list.

    Returns
    -------
    list of Workload
        In file order.
    """
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get("workloads"), list):
        raise ValueError(f"{path}: expected a JSON object with a 'workloads' list")
    return [Workload.from_json(d) for d in doc["workloads"]]
