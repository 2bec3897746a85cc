"""Attention (SD's self- and cross-attention): o = softmax(q kᵀ · scale) v, per batch and head.

Layout "bshd": q[b, sq, h, d], k[b, skv, h, d], v[b, skv, h, d], o[b, sq, h, d]. That is the memory
of the to_q / to_k / to_v projections' outputs ([b, s, h*d]) as they come, and o feeds to_out as
[b, sq, h*d] with no copy: the transposes to and from [b, h, s, d] that the SDPA path needs
(diffusers' AttnProcessor2_0) are views here, and the output needs none.

The compute definition below materializes the score matrix (it is the plain math, scheduled as it
stands by the CPU template and the reference of what every kernel computes); the CUDA template
(scheduler/templates/attn_cuda.py) is flash-style: scores live in on-chip tiles only, with an
online softmax over key/value tiles.

Numerics and tolerances (scheduler/verify.py's per-dtype bounds apply unchanged): scores
accumulate in fp32; the softmax runs in fp32 with the row maximum subtracted; the probabilities may
be rounded to the input dtype before the P·V product (as FlashAttention does), which adds ~2^-11
relative error per term, averaging out over the keys; o accumulates in fp32 and is rounded once.
fp16: 1e-2 elementwise and 5e-3 relative L2; the committed CUDA candidates stay over an order of
magnitude below that bound (see BENCHMARKS.md, "Verification error of the committed kernels"; torch
SDPA's own error is of the same size), so the bound has headroom yet catches a wrong tile
(a row of o off by O(1)). The inputs (below) keep softmax rows neither flat nor one-hot, so o is
not a near-constant average that a broken kernel could match.
scale is a compile-time constant and part of the key (in `layout`, default 1/sqrt(d)).

Calling convention (destination-passing): attention(q, k, v, o).
"""

from __future__ import annotations

import re

import torch

from shapetune.workload import Workload

from . import TORCH_DTYPE, f64, ModuleRule, OpDef, call_arg, register_module_rule, register_op

LAYOUT = "q[b,sq,h,d] kv[b,skv,h,d] bshd"


def scale_of(w: Workload) -> float:
    m = re.search(r"scale=([0-9.eE+-]+)", w.layout)
    if not m:
        raise ValueError(f"{w.name}: layout {w.layout!r} carries no scale=")
    return float(m.group(1))


def attention_workload(b: int, sq: int, skv: int, h: int, d: int, dtype: str = "float16",
                       scale: float | None = None, sq_range: tuple[int, int] | None = None,
                       skv_range: tuple[int, int] | None = None, b_range: tuple[int, int] | None = None) -> Workload:
    """softmax(q kᵀ * scale) v for q[b, sq, h, d], k, v[b, skv, h, d]; ranges make b / sq / skv dynamic."""
    # 12 significant digits: d ** -0.5 (diffusers) and 1 / sqrt(d) differ in the last bit and must
    # name the same kernel; the kernel then uses this value (a 1e-12 relative change)
    scale = float(f"{(d ** -0.5 if scale is None else float(scale)):.12g}")
    dyn = tuple((name, *r) for name, r in (("b", b_range), ("sq", sq_range), ("skv", skv_range)) if r)
    return Workload(
        op="attention",
        dims=(("b", b), ("sq", sq), ("skv", skv), ("h", h), ("d", d)),
        dtype=dtype,
        acc_dtype="float32" if dtype in ("float16", "bfloat16", "float32") else dtype,
        layout=f"{LAYOUT} scale={scale!r}",
        dynamic=dyn,
    )


def attention_flops(w: Workload) -> float:
    """Useful flops: q kᵀ and P·V, 2 · b·h·sq·skv·d each (softmax not counted, as FlashAttention reports)."""
    d = w.dim
    return 4.0 * d["b"] * d["h"] * d["sq"] * d["skv"] * d["d"]


def attention_prim_func(wl: Workload):
    from tvm import te, tirx

    dd = wl.dim
    b, h, d = dd["b"], dd["h"], dd["d"]
    if "b" in wl.ranges:
        b = te.var("b")
    sq = te.var("sq") if "sq" in wl.ranges else dd["sq"]
    skv = te.var("skv") if "skv" in wl.ranges else dd["skv"]
    acc = wl.acc_dtype
    q = te.placeholder((b, sq, h, d), wl.dtype, name="q")
    k = te.placeholder((b, skv, h, d), wl.dtype, name="k")
    v = te.placeholder((b, skv, h, d), wl.dtype, name="v")
    rd = te.reduce_axis((0, d), "rd")
    scale = tirx.const(scale_of(wl), acc)
    qk = te.compute((b, h, sq, skv), lambda n, j, i, t: te.sum(
        q[n, i, j, rd].astype(acc) * k[n, t, j, rd].astype(acc), axis=rd), name="qk")
    s = te.compute((b, h, sq, skv), lambda n, j, i, t: qk[n, j, i, t] * scale, name="score")
    rm = te.reduce_axis((0, skv), "rm")
    mx = te.compute((b, h, sq), lambda n, j, i: te.max(s[n, j, i, rm], axis=rm), name="rowmax")
    e = te.compute((b, h, sq, skv), lambda n, j, i, t: te.exp(s[n, j, i, t] - mx[n, j, i]), name="prob")
    rl = te.reduce_axis((0, skv), "rl")
    den = te.compute((b, h, sq), lambda n, j, i: te.sum(e[n, j, i, rl], axis=rl), name="rowsum")
    rv = te.reduce_axis((0, skv), "rv")
    pv = te.compute((b, sq, h, d), lambda n, i, j, c: te.sum(e[n, j, i, rv] * v[n, rv, j, c].astype(acc), axis=rv),
                    name="pv")
    o = te.compute((b, sq, h, d), lambda n, i, j, c: (pv[n, i, j, c] / den[n, j, i]).astype(wl.dtype), name="o")
    return te.create_prim_func([q, k, v, o]).with_attr("global_symbol", "main")


def attention_inputs(wl: Workload, device, generator: torch.Generator) -> list[torch.Tensor]:
    """q, k ~ 1.2 N(0, 1) (score std ~1.4 at scale 1/sqrt(d): softmax rows neither flat nor one-hot,
    so o is O(0.1..1) and a wrong tile stands out), v ~ N(0, 1) + 0.25."""
    dd = wl.dim
    gd = generator.device
    shape_q = (dd["b"], dd["sq"], dd["h"], dd["d"])
    shape_kv = (dd["b"], dd["skv"], dd["h"], dd["d"])
    q = 1.2 * torch.randn(shape_q, generator=generator, device=gd)
    k = 1.2 * torch.randn(shape_kv, generator=generator, device=gd)
    v = torch.randn(shape_kv, generator=generator, device=gd) + 0.25
    return [t.to(device=device, dtype=TORCH_DTYPE[wl.dtype]) for t in (q, k, v)]


def attention_output(wl: Workload, device) -> torch.Tensor:
    dd = wl.dim
    return torch.empty(dd["b"], dd["sq"], dd["h"], dd["d"], device=device, dtype=TORCH_DTYPE[wl.dtype])


def attention_reference(wl: Workload, inputs: list[torch.Tensor]) -> torch.Tensor:
    """float64, computed where the inputs are (a GPU does the 4096-token shapes in milliseconds),
    one head at a time so the score matrix stays small; returned there."""
    q, k, v = f64(inputs)
    scale = scale_of(wl)
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for j in range(q.shape[2]):
        s = torch.einsum("bid,btd->bit", q[:, :, j], k[:, :, j]) * scale
        out[:, :, j] = torch.softmax(s, dim=-1) @ v[:, :, j]
    return out


def attention_vendor(wl: Workload):
    """torch SDPA exactly as diffusers' AttnProcessor2_0 calls it: [b, s, h, d] viewed as
    [b, h, s, d] (transpose), then the output transposed back to [b, sq, h, d] (contiguous)."""
    scale = scale_of(wl)

    def run(q, k, v):
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return o.transpose(1, 2).contiguous()

    return run


register_op("attention", OpDef(attention_prim_func, attention_inputs, attention_output, attention_reference,
                               attention_vendor, "torch.nn.functional.scaled_dot_product_attention",
                               flops=attention_flops))


# -- module rule: diffusers Attention ---------------------------------------------------------------
def _attention_type():
    try:
        from diffusers.models.attention_processor import Attention
    except ImportError:  # pragma: no cover
        return None
    return Attention


def attention_module_workloads(module, args: tuple, kwargs: dict, dtype: str) -> list[Workload]:
    """softmax(q kᵀ · scale) v over `heads` heads: attention(b, sq, skv, h, d) with sq the query tokens
    and skv those of encoder_hidden_states (cross) or of the queries (self). None for masks, 4-D
    (spatial) inputs, normalized q/k, or a head dim that isn't inner_dim / heads (the patched
    processor sends those calls to the one set before)."""
    x = call_arg(args, kwargs, 0, "hidden_states")
    ctx = call_arg(args, kwargs, 1, "encoder_hidden_states")
    mask = call_arg(args, kwargs, 2, "attention_mask")
    if x.dim() != 3 or mask is not None or getattr(module, "norm_q", None) is not None \
            or getattr(module, "spatial_norm", None) is not None or module.inner_dim % module.heads:
        return []
    skv = ctx.shape[1] if ctx is not None else x.shape[1]
    return [attention_workload(x.shape[0], x.shape[1], skv, module.heads, module.inner_dim // module.heads, dtype,
                               module.scale)]


def _attention_unsupported(module) -> str | None:
    """Served only under one of diffusers' two default processors, AttnProcessor2_0 (SDPA) and AttnProcessor
    (classic: scores scaled by the module's `scale`, which scale_qk=False makes 1), whose expression the
    patched processor restates; any other (IP-Adapter, custom diffusion, a model's own rotary or joint
    attention, xformers, ...) computes something else and keeps running."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    proc = getattr(module, "processor", None)
    return None if type(proc) in (AttnProcessor, AttnProcessor2_0) else f"attention: processor {type(proc).__name__}"


register_module_rule(ModuleRule("attention", _attention_type, _attention_unsupported, attention_module_workloads,
                                subclasses=True))
