"""Extract tunable workloads from a PyTorch model by running it once with forward hooks.

Each supported module type has a handler in ``HANDLERS`` that turns one call of the module
into zero or more ``Workload``s: nn.Linear, nn.GroupNorm, nn.LayerNorm, nn.Conv2d, diffusers' GEGLU
and Attention; another family is one handler and one table entry. ``extract_fused_workloads`` then
folds in the fusions kernels.patch applies (GroupNorm+SiLU, conv / linear + residual, linear + gelu),
read from shapetune/fusions.py, the one table both use.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from shapetune.workload import Workload, linear_workload

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


def _linear_handler(module: nn.Linear, args: tuple, kwargs: dict, output, dtype: str) -> list[Workload]:
    """y = x @ W^T (+ b): m = product of x's leading dims, n = out_features, k = in_features."""
    x = args[0] if args else kwargs["input"]
    m = math.prod(x.shape[:-1])
    return [linear_workload(m, module.out_features, module.in_features, dtype, module.bias is not None)]


def _group_norm_handler(module: nn.GroupNorm, args: tuple, kwargs: dict, output, dtype: str) -> list[Workload]:
    """x [N, C, H, W] -> group_norm(n, hw=H*W, c, g), channels-last; SiLU fusion is decided by the
    caller from the module names (the SiLU that follows is a separate module or call)."""
    from kernels.defs_norm import group_norm_workload

    x = args[0] if args else kwargs["input"]
    if not module.affine or x.dim() < 3:
        return []
    return [group_norm_workload(x.shape[0], math.prod(x.shape[2:]), x.shape[1], module.num_groups, dtype,
                                module.eps)]


def _layer_norm_handler(module: nn.LayerNorm, args: tuple, kwargs: dict, output, dtype: str) -> list[Workload]:
    """x [..., C] -> layer_norm(m = product of leading dims, c); affine over the last dim only."""
    from kernels.defs_norm import layer_norm_workload

    x = args[0] if args else kwargs["input"]
    if len(module.normalized_shape) != 1 or not module.elementwise_affine or module.bias is None:
        return []
    return [layer_norm_workload(math.prod(x.shape[:-1]), x.shape[-1], dtype, module.eps)]


def _conv2d_handler(module: nn.Conv2d, args: tuple, kwargs: dict, output, dtype: str) -> list[Workload]:
    """x [N, Ci, H, W] -> conv2d(n, h, w, ci, co, kh, kw, stride, padding), channels-last; only
    square stride/padding, dilation 1, groups 1, zero padding. A fused residual add is decided by
    the caller from the module names (the add happens outside the module)."""
    from kernels.defs_conv import conv2d_workload

    x = args[0] if args else kwargs["input"]
    (sh, sw), pad = module.stride, module.padding
    if (module.groups != 1 or tuple(module.dilation) != (1, 1) or sh != sw or isinstance(pad, str)
            or pad[0] != pad[1] or module.padding_mode != "zeros" or x.dim() != 4):
        return []
    n, ci, h, w = x.shape
    co, _, kh, kw = module.weight.shape
    return [conv2d_workload(n, h, w, ci, co, kh, kw, sh, pad[0], dtype, module.bias is not None)]


def _geglu_handler(module: nn.Module, args: tuple, kwargs: dict, output, dtype: str) -> list[Workload]:
    """diffusers GEGLU: proj = Linear(dim_in, 2 * dim_out); y = h * gelu(g), (h, g) = proj(x).chunk(2):
    geglu(m = product of x's leading dims, f = dim_out, k = dim_in). Without a bias: nothing."""
    from shapetune.workload import geglu_workload

    x = args[0] if args else kwargs["hidden_states"]
    proj = module.proj
    if proj.bias is None or proj.out_features % 2:
        return []
    return [geglu_workload(math.prod(x.shape[:-1]), proj.out_features // 2, proj.in_features, dtype)]


def _attention_handler(module: nn.Module, args: tuple, kwargs: dict, output, dtype: str) -> list[Workload]:
    """diffusers Attention: softmax(q kᵀ · scale) v over `heads` heads: attention(b, sq, skv, h, d) with
    sq the query tokens and skv those of encoder_hidden_states (cross) or of the queries (self).
    Not extracted: masks, 4-D (spatial) inputs, normalized q/k, or a head dim that isn't inner_dim / heads."""
    from kernels.defs_attn import attention_workload

    x = args[0] if args else kwargs["hidden_states"]
    ctx = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
    mask = args[2] if len(args) > 2 else kwargs.get("attention_mask")
    if x.dim() != 3 or mask is not None or getattr(module, "norm_q", None) is not None \
            or getattr(module, "spatial_norm", None) is not None or module.inner_dim % module.heads:
        return []
    skv = ctx.shape[1] if ctx is not None else x.shape[1]
    return [attention_workload(x.shape[0], x.shape[1], skv, module.heads, module.inner_dim // module.heads, dtype,
                               module.scale)]


#: module type -> handler; subclasses use their nearest registered base class.
HANDLERS: dict[type, Handler] = {
    nn.Linear: _linear_handler,
    nn.GroupNorm: _group_norm_handler,
    nn.LayerNorm: _layer_norm_handler,
    nn.Conv2d: _conv2d_handler,
}

try:  # diffusers' feed-forward gate and attention (a dependency; guarded so extraction works without it)
    from diffusers.models.activations import GEGLU as _DiffusersGEGLU
    from diffusers.models.attention_processor import Attention as _DiffusersAttention

    HANDLERS[_DiffusersGEGLU] = _geglu_handler
    HANDLERS[_DiffusersAttention] = _attention_handler
except ImportError:  # pragma: no cover
    pass


def _handler_for(module: nn.Module, handlers: dict[type, Handler]) -> Handler | None:
    for cls in type(module).__mro__:
        if cls in handlers:
            return handlers[cls]
    return None


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


def _record_calls(model, inputs, dtype, handlers) -> list[tuple[Workload, str]]:
    calls: list[tuple[Workload, str]] = []
    hooks = []
    for name, module in model.named_modules():
        handler = _handler_for(module, handlers)
        if handler is None:
            continue

        def hook(mod, args, kwargs, output, _name=name, _handler=handler):
            for w in _handler(mod, args, kwargs, output, dtype):
                calls.append((w, _name))

        hooks.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.inference_mode():
            model(**inputs)
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
) -> list[ExtractedOp]:
    """Run one forward pass and collect the distinct workloads of every handled module call.

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

    Returns
    -------
    list of ExtractedOp
        One per distinct workload, in order of first call.
    """
    handlers = HANDLERS if handlers is None else handlers
    device = _model_device(model)
    try:
        calls = _record_calls(model, _to_device(example_inputs, device, False), dtype, handlers)
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
        calls = _record_calls(cpu_model, inputs, dtype, handlers)
    return _aggregate(calls)


def sd15_unet_inputs(
    batch: int = 2, height: int = 512, width: int = 512, seq: int = 77, device="meta"
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
        "encoder_hidden_states": torch.zeros(batch, seq, 768, device=device),
    }


def sd15_linear_workloads(
    batch: int = 2, height: int = 512, width: int = 512, seq: int = 77, dtype: str = "float16"
) -> list[ExtractedOp]:
    """The distinct linear (GEMM) workloads of one SD 1.5 UNet forward pass (a linear diffusers follows
    with a residual add or a gelu, shapetune.fusions, becomes that epilogue's workload; SD 1.5 has none).

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
    return _sd15_fused({nn.Linear: _linear_handler}, batch, height, width, dtype, True, seq)


def sd15_geglu_workloads(
    batch: int = 2, height: int = 512, width: int = 512, seq: int = 77, dtype: str = "float16"
) -> list[ExtractedOp]:
    """The distinct GEGLU workloads (geglu m, f, k) of one SD 1.5 UNet forward pass: every
    transformer block's FeedForward, proj = Linear(C, 2 * 4C), so f = 4C, k = C.

    Parameters and returns as ``sd15_linear_workloads``.
    """
    from diffusers.models.activations import GEGLU

    from scheduler.sd_configs import build_sd15_unet

    unet = build_sd15_unet(device="meta")
    inputs = sd15_unet_inputs(batch, height, width, seq, device="meta")
    return extract_workloads(unet, inputs, dtype=dtype, handlers={GEGLU: _geglu_handler})


def sd15_attention_workloads(
    batch: int = 2, height: int = 512, width: int = 512, seq: int = 77, dtype: str = "float16"
) -> list[ExtractedOp]:
    """The distinct attention workloads of one SD 1.5 UNet forward pass: each transformer block's
    self-attention (attn1, sq = skv = latent tokens) and cross-attention (attn2, skv = `seq`).

    Parameters and returns as ``sd15_linear_workloads``.
    """
    from diffusers.models.attention_processor import Attention

    from scheduler.sd_configs import build_sd15_unet

    unet = build_sd15_unet(device="meta")
    inputs = sd15_unet_inputs(batch, height, width, seq, device="meta")
    return extract_workloads(unet, inputs, dtype=dtype, handlers={Attention: _attention_handler})


def fused_workload(w: Workload, site: Site | None) -> Workload | None:
    """The workload of `w`'s op with the elementwise op diffusers runs after it (a shapetune.fusions Site)
    in the epilogue: group_norm(+silu), conv2d(+residual), linear epilogue (bias,) residual / gelu.
    None where the site does not apply to this op (keep w)."""
    from kernels.defs_conv import conv2d_workload, stride_padding
    from kernels.defs_norm import eps_of, group_norm_workload

    if site is None:
        return None
    d = w.dim
    if w.op == "group_norm" and site.kind == "silu" and "silu" not in w.epilogue:
        return group_norm_workload(d["n"], d["hw"], d["c"], d["g"], w.dtype, eps_of(w), True)
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
    return _sd15_fused({k: HANDLERS[k] for k in (nn.GroupNorm, nn.LayerNorm)}, batch, height, width, dtype,
                       fuse_silu)


def sd15_conv_workloads(batch: int = 2, height: int = 512, width: int = 512, dtype: str = "float16",
                        fuse_residual: bool = True) -> list[ExtractedOp]:
    """The distinct conv2d workloads of one SD 1.5 UNet forward pass; convs whose output diffusers
    adds a residual to (shapetune.fusions: ResnetBlock2D.conv2, Transformer2DModel's 1x1 proj_out)
    become conv2d(+residual) workloads with `fuse_residual`."""
    return _sd15_fused({nn.Conv2d: HANDLERS[nn.Conv2d]}, batch, height, width, dtype, fuse_residual)


#: family -> the function listing its SD 1.5 UNet workloads (batch, height, width, dtype keywords)
SD15_FAMILIES = {
    "linear": lambda **kw: sd15_linear_workloads(**kw),
    "geglu": lambda **kw: sd15_geglu_workloads(**kw),
    "norms": lambda **kw: sd15_norm_workloads(**kw),
    "conv": lambda **kw: sd15_conv_workloads(**kw),
    "attention": lambda **kw: sd15_attention_workloads(**kw),
}


def sd15_workloads(families=tuple(SD15_FAMILIES), batch: int = 2, height: int = 512, width: int = 512,
                   dtype: str = "float16") -> list[ExtractedOp]:
    """Every distinct workload of the named op families in one SD 1.5 UNet forward pass."""
    out = []
    for f in families:
        out += SD15_FAMILIES[f](batch=batch, height=height, width=width, dtype=dtype)
    return out


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
