"""Normalization ops (memory-bound): group_norm over channels-last activations, layer_norm over rows.

group_norm  x[n, hw, c] (NHWC flattened: the memory of a channels_last NCHW tensor), G groups of
            C/G consecutive channels; per (n, g) over hw x C/G elements (cnt = HW * C/G), the shifted
            moments below, then y = (x - mean) * rsqrt(var + eps) * w[c] + b[c], then y * sigmoid(y)
            with "silu".
            With the "shift" step (epilogue ("shift", "affine"[, "silu"]): a prologue, first in order)
            it normalizes xs = x + b0[c] + t[n, c] instead, summed in fp32 and never written:
            ResnetBlock2D's conv1 bias and time embedding, added to cuDNN's bias-free conv1 output
            in the GroupNorm norm2 that reads it (one pass of the activation less). The statistics
            are those of xs: the shift moves each group's mean, which the shifted moments absorb.
layer_norm  x[m, c]; the same with one group per row (cnt = C), always affine.
add_layer_norm  a[m, c] + r[m, c] -> s (rounded to the dtype), then layer_norm(s): out[2, m, c] = [s, y]
            (a transformer block's residual add and the LayerNorm after it in one pass).

Statistics: shifted moments, one fused pass. Each statistics group (group_norm (n, g), a row of
layer_norm / add_layer_norm) has a pivot p, its first element (group_norm xs[n, 0, g*C/G], layer_norm
x[m, 0], add_layer_norm s[m, 0]), a stage of its own ("pivot": the templates load it once per block,
thread or task into a register). S1 = sum (x - p) and S2 = sum (x - p)^2 are accumulated in fp32 from
the fp16/fp32 inputs (no Welford); d = S1 / cnt, var = max(S2 / cnt - d^2, 0), and the normalize pass
computes ((x - p) - d) * rstd. The cancellation in S2 / cnt - d^2 loses log2(1 + ((mean - p) / std)^2)
bits: p is a sample of its group, a few std from its mean whatever the group's offset, so |mean| / std
no longer matters (the plain E[x^2] - mean^2 loses log2(1 + (mean / std)^2): measured on llvm, fp32,
max error 1e-3 / 0.07 / 1.3e3 at |mean| / std 10 / 100 / 1000, now ~1e-5 at each, torch's 1e-6 / 1e-5
/ 1.3e-4). x - p is exact where x and p lie within a factor 2 of each other (Sterbenz: a group whose
|mean| >> std), and for fp16 inputs whenever their exponents differ by 13 or less. The subtract costs one
instruction in the reductions' and the normalize pass's inner loops. Limits: a pivot k std from its
group's mean costs log2(1 + k^2) bits (an outlier element heading its group, k = 10: ~7 of fp32's 24,
still below fp16's output rounding); the sums' rounding grows with the serial accumulation length, which
is the template's: the CPU templates sum a whole group in one accumulator (fp32 max error ~1e-5 at 1000
elements, ~1e-4 at 40960: about the fp32 tolerance), the GPU templates a few hundred elements per thread,
then a tree (~5e-6, emulated); with "shift" xs is rounded to fp32 (2^-24 |xs|: 6e-5 std at |mean| / std
= 1000). var is clamped at 0 so rounding can never produce NaN.
The random operands (group_norm_inputs, ...) give the groups offsets up to |mean| / std = 60 (fp32) /
1000 (fp16; 100 for group_norm, whose torch CUDA path fails at 1000), on which the plain formula fails
verification in fp16 for layer_norm (see OFFSET_MAX). eps is a compile-time
constant and part of the workload key (in `layout`, e.g. "x[n,hw,c] nhwc eps=1e-05").

Calling convention (destination-passing): group_norm (x[n,hw,c], w[c], b[c], y[n,hw,c]), with "shift"
(x[n,hw,c], b0[c], t[n,c], w[c], b[c], y[n,hw,c]);
layer_norm (x[m,c], w[c], b[c], y[m,c]); add_layer_norm (a[m,c], r[m,c], w[c], b[c], out[2,m,c]).
"""

from __future__ import annotations

import math
import re

import torch

from shapetune.workload import Workload

from . import TORCH_DTYPE, f64, ModuleRule, OpDef, VendorPath, call_arg, register_module_rule, register_op


def _acc(dtype: str) -> str:
    return "float32" if dtype in ("float16", "bfloat16", "float32") else dtype


def eps_of(w: Workload) -> float:
    m = re.search(r"eps=([0-9.eE+-]+)", w.layout)
    if not m:
        raise ValueError(f"{w.name}: layout {w.layout!r} carries no eps=")
    return float(m.group(1))


def group_norm_workload(n: int, hw: int, c: int, g: int = 32, dtype: str = "float16", eps: float = 1e-5,
                        silu: bool = False, hw_range: tuple[int, int] | None = None,
                        n_range: tuple[int, int] | None = None, shift: bool = False) -> Workload:
    """GroupNorm(g, c, eps) (+ SiLU) of x[n, hw, c] (channels-last), with `shift` of x + b0[c] + t[n, c];
    n_range / hw_range make n / hw dynamic. Without `shift` the workload (and its key) is the one it
    always was."""
    if c % g:
        raise ValueError(f"group_norm: channels {c} not divisible by groups {g}")
    return Workload(
        op="group_norm",
        dims=(("n", n), ("hw", hw), ("c", c), ("g", g)),
        dtype=dtype,
        acc_dtype=_acc(dtype),
        layout=f"x[n,hw,c] nhwc eps={eps!r}",
        epilogue=(("shift",) if shift else ()) + (("affine", "silu") if silu else ("affine",)),
        dynamic=((("n", *n_range),) if n_range else ()) + ((("hw", *hw_range),) if hw_range else ()),
    )


def layer_norm_workload(m: int, c: int, dtype: str = "float16", eps: float = 1e-5,
                        m_range: tuple[int, int] | None = None) -> Workload:
    """LayerNorm(c, eps) with affine weight and bias, of x[m, c]; m_range makes m dynamic."""
    return Workload(
        op="layer_norm",
        dims=(("m", m), ("c", c)),
        dtype=dtype,
        acc_dtype=_acc(dtype),
        layout=f"x[m,c] eps={eps!r}",
        epilogue=("affine",),
        dynamic=(("m", *m_range),) if m_range else (),
    )


def add_layer_norm_workload(m: int, c: int, dtype: str = "float16", eps: float = 1e-5,
                            m_range: tuple[int, int] | None = None) -> Workload:
    """s = a + r (rounded to dtype, as torch's add), y = LayerNorm(c, eps)(s) with affine weight and bias,
    of a[m, c], r[m, c]: a transformer block's residual add and the LayerNorm after it, one pass. The
    output holds both, [2, m, c]: s (the residual stream goes on with it) then y."""
    return Workload(
        op="add_layer_norm",
        dims=(("m", m), ("c", c)),
        dtype=dtype,
        acc_dtype=_acc(dtype),
        layout=f"a[m,c] r[m,c] -> [s,y][2,m,c] eps={eps!r}",
        epilogue=("affine",),
        dynamic=(("m", *m_range),) if m_range else (),
    )


# -- TE definitions ------------------------------------------------------------------------------
def group_pivot(x, cg: int, acc: str, te, name: str = "pivot"):
    """p[n, g] = x[n, 0, g * C/G] (as acc), of x[n, hw, c]: each group's first element, the shift of its
    moments (a sample of the group, so |mean - p| is a few std at most, whatever the group's offset)."""
    n, _, c = x.shape
    return te.compute((n, c // cg), lambda i, j: x[i, 0, j * cg].astype(acc), name=name)


def row_pivot(x, acc: str, te, name: str = "pivot"):
    """p[m] = x[m, 0] (as acc), of x[m, c]: each row's first element (group_pivot for rows)."""
    return te.compute((x.shape[0],), lambda i: x[i, 0].astype(acc), name=name)


def _normalize(te, tirx, x, p, w, b, s1, s2, cnt, eps, shape, idx_stat, idx_c, dtype, acc, silu):
    """mean/rstd blocks from the shifted sums S1 = sum (x - p), S2 = sum (x - p)^2 of each statistics
    group (p its pivot), then y = cast(((x - p) - mean) * rstd * w + b (, silu)). "mean" is the mean of
    x - p (d), var = S2 / cnt - d^2."""
    stat_shape = s1.shape
    mean = te.compute(stat_shape, lambda *i: s1(*i) / cnt, name="mean")
    rstd = te.compute(stat_shape, lambda *i: tirx.rsqrt(
        tirx.max(s2(*i) / cnt - mean(*i) * mean(*i), tirx.const(0, acc)) + tirx.const(eps, acc)), name="rstd")

    def affine(*i):
        st = idx_stat(*i)
        c = idx_c(*i)
        return ((x(*i).astype(acc) - p(*st)) - mean(*st)) * rstd(*st) * w[c].astype(acc) + b[c].astype(acc)

    out = te.compute(shape, affine, name="affine")
    if silu:
        out = te.compute(shape, lambda *i: out(*i) * tirx.sigmoid(out(*i)), name="silu")
    return te.compute(shape, lambda *i: out(*i).astype(dtype), name="y")


def group_norm_input(wl: Workload, n, hw, te) -> tuple[list, object]:
    """What a group_norm definition normalizes, of [n, hw, c] (n, hw symbolic in a bucket): x itself, or
    with the "shift" step the stage xs = x + b0[c] + t[n, c] in the accumulation type (the templates
    inline it into the statistics and the normalize pass). Returns (its placeholders in calling order,
    the tensor to normalize)."""
    c, acc = wl.dim["c"], wl.acc_dtype
    x = te.placeholder((n, hw, c), wl.dtype, name="x")
    if "shift" not in wl.epilogue:
        return [x], x
    b0 = te.placeholder((c,), wl.dtype, name="b0")
    t = te.placeholder((n, c), wl.dtype, name="t")
    xs = te.compute((n, hw, c), lambda i, h, k: x[i, h, k].astype(acc) + b0[k].astype(acc) + t[i, k].astype(acc),
                    name="xs")
    return [x, b0, t], xs


def group_norm_prim_func(wl: Workload):
    from tvm import te, tirx

    d = wl.dim
    n, hw, c, g = d["n"], d["hw"], d["c"], d["g"]
    cg = c // g
    if "hw" in wl.ranges:
        hw = te.var("hw")
    if "n" in wl.ranges:
        n = te.var("n")
    acc = wl.acc_dtype
    args, x = group_norm_input(wl, n, hw, te)
    w = te.placeholder((c,), wl.dtype, name="w")
    b = te.placeholder((c,), wl.dtype, name="b")

    p = group_pivot(x, cg, acc, te)

    def stat(name, f):
        rh, rc = te.reduce_axis((0, hw), "rh"), te.reduce_axis((0, cg), "rc")
        return te.compute((n, g), lambda i, j: te.sum(f(x[i, rh, j * cg + rc].astype(acc) - p[i, j]),
                                                      axis=[rh, rc]), name=name)

    s1 = stat("sum", lambda v: v)
    s2 = stat("sqsum", lambda v: v * v)
    cnt = (hw * cg).astype(acc) if not isinstance(hw, int) else tirx.const(float(hw * cg), acc)
    y = _normalize(te, tirx, x, p, w, b, s1, s2, cnt, eps_of(wl), (n, hw, c),
                   lambda i, h, k: (i, k // cg), lambda i, h, k: k, wl.dtype, acc, "silu" in wl.epilogue)
    return te.create_prim_func(args + [w, b, y]).with_attr("global_symbol", "main")


def _rows(wl: Workload, te) -> tuple:
    """(m, c) of a row-wise norm's workload, m a symbolic var where the workload is a bucket over rows."""
    d = wl.dim
    return (te.var("m") if "m" in wl.ranges else d["m"]), d["c"]


def _layer_norm_of(wl: Workload, x, w, b, m, c, te, tirx):
    """y = LayerNorm(x[m, c]) with affine w, b: the row sums S1, S2 of x - p (as acc, p = x[m, 0] the row's
    pivot), then _normalize."""
    acc = wl.acc_dtype
    p = row_pivot(x, acc, te)

    def stat(name, f):
        r = te.reduce_axis((0, c), "rc")
        return te.compute((m,), lambda i: te.sum(f(x[i, r].astype(acc) - p[i]), axis=r), name=name)

    s1 = stat("sum", lambda v: v)
    s2 = stat("sqsum", lambda v: v * v)
    return _normalize(te, tirx, x, p, w, b, s1, s2, tirx.const(float(c), acc), eps_of(wl), (m, c),
                      lambda i, k: (i,), lambda i, k: k, wl.dtype, acc, False)


def layer_norm_prim_func(wl: Workload):
    from tvm import te, tirx

    m, c = _rows(wl, te)
    x = te.placeholder((m, c), wl.dtype, name="x")
    w = te.placeholder((c,), wl.dtype, name="w")
    b = te.placeholder((c,), wl.dtype, name="b")
    y = _layer_norm_of(wl, x, w, b, m, c, te, tirx)
    return te.create_prim_func([x, w, b, y]).with_attr("global_symbol", "main")


def add_layer_norm_prim_func(wl: Workload):
    from tvm import te, tirx

    m, c = _rows(wl, te)
    acc = wl.acc_dtype
    a = te.placeholder((m, c), wl.dtype, name="a")
    r = te.placeholder((m, c), wl.dtype, name="r")
    w = te.placeholder((c,), wl.dtype, name="w")
    b = te.placeholder((c,), wl.dtype, name="b")
    s = te.compute((m, c), lambda i, k: (a[i, k].astype(acc) + r[i, k].astype(acc)).astype(wl.dtype), name="s")
    y = _layer_norm_of(wl, s, w, b, m, c, te, tirx)
    out = te.compute((2, m, c), lambda t, i, k: tirx.if_then_else(t == 0, s[i, k], y[i, k]), name="out")
    return te.create_prim_func([a, r, w, b, out]).with_attr("global_symbol", "main")


# -- operands, references, vendor paths -----------------------------------------------------------
# The random operands give every statistics group (group_norm (n, g), layer_norm / add_layer_norm a row)
# an offset of its own: x = o + N(0, 1), |o| log-spaced from OFFSET_MAX[dtype] down to OFFSET_MIN over the
# groups (group_offsets). A kernel whose variance cancels (the plain E[x^2] - mean^2 in fp32: error
# ~ (|o| / std)^2 x 2^-24 x the sums' rounding growth) fails verification on them: its worst error is
# 6-25x fp32's tolerance at 150 (llvm's serial sums, and the GPU templates' order emulated: per-thread
# sums, then a tree; ~1.4-17x at 100), while fp16's (1e-2 + 1e-2 |y|) holds it up to ~500 in the GPU
# order (0.005-0.035 at 200), so 1000 for fp16 (3.5-40x its tolerance there). torch's own kernels
# (Welford statistics in fp32; on the CPU then x * (rstd w) + (b - mean rstd w): error ~ 2^-24 |o| / std
# |w| a few roundings) must pass too (they are the yardstick): in fp16 the output rounding dominates; in
# fp32 at 150 torch's nchw group_norm failed the relative-L2 tolerance (1e-5) on tiny workloads (1.0-1.2e-5,
# a handful of groups, one of them at 150), so fp32 stops at 60 (torch's worst over 20 draws, tiny to SD
# shapes: 2.2e-6). There the plain formula's error (~(|o| / std)^2) is ~0.5-6x the tolerance: fp32
# verification does not catch it on every shape; fp16 (the GPU's) does, and tests/ops/test_norm_precision.py
# bounds each template's error at 100 and 1000 directly. fp16 holds |o| / std = 1000 on a grid of std / 2
# (its spacing at 512..1024): coarse, but the reference is computed from the same rounded inputs. The sums
# an eager torch path rounds in the dtype (group_norm's shift x + b0 + t, add_layer_norm's a + r) are made
# exact there (exact_sums_grid, snap): rounded at |o| / std = 1000 they would be off by up to std / 4 in
# fp16, which no tolerance of a normalized output passes.
OFFSET_MIN = 0.1
OFFSET_MAX = {"float16": 1000.0, "bfloat16": 100.0, "float32": 60.0, "float64": 60.0}
# group_norm's own caps where torch's CUDA group_norm (the yardstick) needs them lower. At 1000 in fp16 it missed
# the tolerance (H100, torch 2.11, 2026-12-08: 146092 of 1.2M elements, errors 0.014-0.08, ~6% of |y|: the size
# of fp32 moments that cancel, (|o| / std)^2 x 2^-24), so every fp16 group_norm tuning run aborted and every
# import stayed pending. 100 (as bfloat16's) scales that error down ~100x if it grows as the square, ~10x if
# linearly; devrun/gn_cap.py measures it on the GPU (not yet run: no device was lent after that run).
OFFSET_MAX_GROUP_NORM = {"float16": 100.0}
_SIGNIFICAND_BITS = {"float16": 11, "bfloat16": 8, "float32": 24, "float64": 53}


OFFSET_FULL_CNT = 64  # groups of fewer elements get OFFSET_MAX scaled by cnt / 64


def group_offsets(shape: tuple[int, ...], dtype: str, gen: torch.Generator, cnt: int,
                  caps: dict | None = None) -> torch.Tensor:
    """One offset per statistics group (of cnt elements), of `shape`: magnitudes log-spaced from the cap down
    to OFFSET_MIN (every draw holds a group at the cap; a single group is at it), randomly permuted over the
    groups, random signs. The cap is OFFSET_MAX[dtype], scaled down by cnt / OFFSET_FULL_CNT for smaller
    groups: normalizing a group of 2 is ill-conditioned (y = +-1 from x1 - x2), so torch's own fp32 path (the
    yardstick: it rounds the mean, ulp(|o|), against |x - mean| < std) missed the tolerance there at 60
    (relative L2 5e-5, group_norm hw=1, C/G = 2)."""
    hi = max(OFFSET_MIN, (caps or {}).get(dtype, OFFSET_MAX[dtype]) * min(1.0, cnt / OFFSET_FULL_CNT))
    gd, k = gen.device, math.prod(shape)
    mags = hi * (OFFSET_MIN / hi) ** (torch.arange(k, device=gd) / max(k - 1, 1))
    sign = torch.randint(0, 2, (k,), generator=gen, device=gd) * 2.0 - 1.0
    return (mags[torch.randperm(k, generator=gen, device=gd)] * sign).reshape(shape)


def exact_sums_grid(bound: torch.Tensor, dtype: str) -> torch.Tensor:
    """A power of 2 q per element of `bound`: multiples of q whose magnitudes add up to at most `bound`
    (each group's largest |part| summed over the parts, before snap), snapped to q, sum exactly in
    `dtype`, every partial sum too (the room the snapping adds is left)."""
    p = _SIGNIFICAND_BITS[dtype]
    return torch.exp2(torch.ceil(torch.log2(bound * (1 + 2.0 ** (2 - p)))) - p)


def snap(v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """v rounded to a multiple of q (broadcast), away from 0 where it would round to 0 (no zeros)."""
    s = torch.round(v / q) * q
    return torch.where(s == 0, torch.copysign(q.expand_as(v), v), s)


def _affine_params(c: int, gen: torch.Generator) -> list[torch.Tensor]:
    gd = gen.device
    w = 1.0 + 0.25 * torch.randn(c, generator=gen, device=gd)
    b = 0.25 * torch.randn(c, generator=gen, device=gd)
    return [w, b]


def group_norm_inputs(wl: Workload, device, generator: torch.Generator) -> list[torch.Tensor]:
    """x[n, hw, c] = o[n, g] + N(0, 1) (each group (n, g) offset by its own o: group_offsets), w ~ 1 + N(0,
    1/16), b ~ N(0, 1/16); with "shift" also b0 ~ N(0, 1/16) (a conv's bias) and t ~ N(0, 1) (a time
    embedding), x, b0 and t of group (n, g) snapped to a grid on which x + b0 + t is exact in the dtype
    (eager torch rounds after each add; b0 to the coarsest grid of its channel's groups); in calling order
    x, b0, t, w, b."""
    d = wl.dim
    gd = generator.device
    n, hw, c, g = d["n"], d["hw"], d["c"], d["g"]
    cg = c // g
    o = group_offsets((n, g), wl.dtype, generator, hw * cg, OFFSET_MAX_GROUP_NORM).repeat_interleave(cg, dim=1)
    x = torch.randn(n, hw, c, generator=generator, device=gd) + o[:, None, :]
    w, b = _affine_params(c, generator)
    if "shift" not in wl.epilogue:
        ts = [x, w, b]
    else:
        b0 = 0.25 * torch.randn(c, generator=generator, device=gd)
        t = torch.randn(n, c, generator=generator, device=gd)

        def per_group(v):  # [..., c] -> the largest |v| of each group, spread back over its channels
            return v.abs().reshape(*v.shape[:-1], g, cg).amax(-1).repeat_interleave(cg, dim=-1)

        q = exact_sums_grid(per_group(x.abs().amax(1)) + per_group(b0) + per_group(t), wl.dtype)  # [n, c]
        ts = [snap(x, q[:, None, :]), snap(b0, q.amax(0)), snap(t, q), w, b]
    return [t.to(device=device, dtype=TORCH_DTYPE[wl.dtype]) for t in ts]


def group_norm_output(wl: Workload, device) -> torch.Tensor:
    d = wl.dim
    return torch.empty(d["n"], d["hw"], d["c"], device=device, dtype=TORCH_DTYPE[wl.dtype])


def group_norm_reference(wl: Workload, inputs: list[torch.Tensor]) -> torch.Tensor:
    """float64 where the inputs are: F.group_norm on the NCHW view (H*W flattened into one axis) of x, or
    of x + b0 + t with "shift" (exact in float64, as the kernel's fp32 sum; eager rounds to the dtype
    after each add, exact on group_norm_inputs' operands), then SiLU."""
    x, *ops = f64(inputs)
    if "shift" in wl.epilogue:
        b0, t, *ops = ops
        x = x + b0 + t[:, None, :]
    w, b = ops
    y = torch.nn.functional.group_norm(x.permute(0, 2, 1), wl.dim["g"], w, b, eps_of(wl)).permute(0, 2, 1)
    return torch.nn.functional.silu(y) if "silu" in wl.epilogue else y


def _group_norm_torch(wl: Workload):
    """run(x[n, c, hw, 1], *operands after x) -> [n, c, hw, 1]: torch's kernels as diffusers runs them,
    in x's memory format: with "shift" the two adds first (the conv's own bias add after cuDNN, then
    `+ temb`), then F.group_norm (+ F.silu, a separate kernel as in ResnetBlock2D)."""
    g, eps, silu, shift = wl.dim["g"], eps_of(wl), "silu" in wl.epilogue, "shift" in wl.epilogue

    def run(x, *ops):
        if shift:
            b0, t, *ops = ops
            x = x + b0.view(1, -1, 1, 1) + t[:, :, None, None]
        y = torch.nn.functional.group_norm(x, g, *ops, eps)
        return torch.nn.functional.silu(y) if silu else y

    return run


def group_norm_vendor(wl: Workload):
    """The default baseline: _group_norm_torch on a channels_last NCHW tensor ([n, c, hw, 1] here), as a
    channels-last model pays it (torch's CUDA group_norm makes the input contiguous first: a transpose
    in every call)."""
    run = _group_norm_torch(wl)
    return lambda x, *ops: run(x.permute(0, 2, 1).unsqueeze(-1), *ops).squeeze(-1).permute(0, 2, 1)


def group_norm_vendor_nchw(wl: Workload) -> VendorPath:
    """Variant "nchw": _group_norm_torch on an NCHW-contiguous x[n, c, hw, 1], as eager diffusers runs it
    (no transpose inside the call); x is converted before and y back after."""
    return VendorPath(lambda inputs: [inputs[0].permute(0, 2, 1).contiguous().unsqueeze(-1), *inputs[1:]],
                      _group_norm_torch(wl), lambda y: y.squeeze(-1).permute(0, 2, 1))


def layer_norm_inputs(wl: Workload, device, generator: torch.Generator) -> list[torch.Tensor]:
    """x[m, c] = o[m] + N(0, 1) (each row offset by its own o: group_offsets), w ~ 1 + N(0, 1/16),
    b ~ N(0, 1/16)."""
    d = wl.dim
    o = group_offsets((d["m"], 1), wl.dtype, generator, d["c"])
    x = torch.randn(d["m"], d["c"], generator=generator, device=generator.device) + o
    return [t.to(device=device, dtype=TORCH_DTYPE[wl.dtype]) for t in [x, *_affine_params(d["c"], generator)]]


def layer_norm_output(wl: Workload, device) -> torch.Tensor:
    d = wl.dim
    return torch.empty(d["m"], d["c"], device=device, dtype=TORCH_DTYPE[wl.dtype])


def layer_norm_reference(wl: Workload, inputs: list[torch.Tensor]) -> torch.Tensor:
    x, w, b = f64(inputs)
    return torch.nn.functional.layer_norm(x, (wl.dim["c"],), w, b, eps_of(wl))


def layer_norm_vendor(wl: Workload):
    c, eps = wl.dim["c"], eps_of(wl)

    def run(x, w, b):
        return torch.nn.functional.layer_norm(x, (c,), w, b, eps)

    return run


def add_layer_norm_inputs(wl: Workload, device, generator: torch.Generator) -> list[torch.Tensor]:
    """a (an attention's or feed-forward's output) ~ N(0.25, 1), r (the residual stream) = o[m] + N(0, 1)
    (each row offset by its own o: group_offsets), w ~ 1 + N(0, 1/16), b ~ N(0, 1/16); a and r of each
    row snapped to a grid on which a + r is exact in the dtype (torch's add, and the kernel's s, round it)."""
    d = wl.dim
    gd = generator.device
    o = group_offsets((d["m"], 1), wl.dtype, generator, d["c"])
    a = torch.randn(d["m"], d["c"], generator=generator, device=gd) + 0.25
    r = torch.randn(d["m"], d["c"], generator=generator, device=gd) + o
    q = exact_sums_grid(a.abs().amax(1, keepdim=True) + r.abs().amax(1, keepdim=True), wl.dtype)
    ts = [snap(a, q), snap(r, q), *_affine_params(d["c"], generator)]
    return [t.to(device=device, dtype=TORCH_DTYPE[wl.dtype]) for t in ts]


def add_layer_norm_output(wl: Workload, device) -> torch.Tensor:
    d = wl.dim
    return torch.empty(2, d["m"], d["c"], device=device, dtype=TORCH_DTYPE[wl.dtype])


def add_layer_norm_reference(wl: Workload, inputs: list[torch.Tensor]) -> torch.Tensor:
    """float64: [a + r, LayerNorm(a + r)] (the kernel rounds s to its dtype before normalizing, as torch's
    add does: exact on add_layer_norm_inputs' operands; elsewhere one rounding of s, which at |s| / std
    >> 1 moves y by up to |s| / std x 2^-12 in fp16)."""
    a, r, w, b = f64(inputs)
    s = a + r
    return torch.stack([s, torch.nn.functional.layer_norm(s, (wl.dim["c"],), w, b, eps_of(wl))])


def add_layer_norm_vendor(wl: Workload) -> VendorPath:
    """torch's two kernels, as diffusers' BasicTransformerBlock runs them: `s = a + r`, then
    F.layer_norm(s); timed as that (the stacking into the op's [2, m, c] output is untimed)."""
    c, eps = wl.dim["c"], eps_of(wl)

    def run(a, r, w, b):
        s = a + r
        return s, torch.nn.functional.layer_norm(s, (c,), w, b, eps)

    return VendorPath(lambda inputs: inputs, run, lambda sy: torch.stack(sy))


# version 2: shifted moments (each group's sums of x - p, p its first element); version 1 summed x and x^2,
# whose variance cancelled where |mean| >> std: its records are re-verified, never served as measured.
register_op("group_norm", OpDef(group_norm_prim_func, group_norm_inputs, group_norm_output, group_norm_reference,
                                group_norm_vendor, "torch.nn.functional.group_norm",
                                vendor_variants={"nchw": group_norm_vendor_nchw}, version=2))
register_op("layer_norm", OpDef(layer_norm_prim_func, layer_norm_inputs, layer_norm_output, layer_norm_reference,
                                layer_norm_vendor, "torch.nn.functional.layer_norm", version=2))
register_op("add_layer_norm", OpDef(add_layer_norm_prim_func, add_layer_norm_inputs, add_layer_norm_output,
                                    add_layer_norm_reference, add_layer_norm_vendor,
                                    "torch.add+torch.nn.functional.layer_norm", version=2))


# -- module rules: nn.GroupNorm, nn.LayerNorm --------------------------------------------------------
def group_norm_unsupported(module: torch.nn.GroupNorm) -> str | None:
    return None if module.affine else "group_norm: no affine"


def group_norm_module_workloads(module: torch.nn.GroupNorm, args: tuple, kwargs: dict, dtype: str) -> list[Workload]:
    """x [N, C, H, W] -> group_norm(n, hw=H*W, c, g), channels-last; a SiLU that follows is a fusion
    (shapetune.fusions), applied by the caller."""
    x = call_arg(args, kwargs, 0, "input")
    if x.dim() < 3:
        return []
    return [group_norm_workload(x.shape[0], math.prod(x.shape[2:]), x.shape[1], module.num_groups, dtype,
                                module.eps)]


def layer_norm_unsupported(module: torch.nn.LayerNorm) -> str | None:
    if len(module.normalized_shape) == 1 and module.elementwise_affine and module.bias is not None:
        return None
    return "layer_norm: not 1-D affine with bias"


def layer_norm_module_workloads(module: torch.nn.LayerNorm, args: tuple, kwargs: dict, dtype: str) -> list[Workload]:
    """x [..., C] -> layer_norm(m = product of leading dims, c); affine over the last dim only."""
    x = call_arg(args, kwargs, 0, "input")
    return [layer_norm_workload(math.prod(x.shape[:-1]), x.shape[-1], dtype, module.eps)]


register_module_rule(ModuleRule("group_norm", lambda: torch.nn.GroupNorm, group_norm_unsupported,
                                group_norm_module_workloads))
register_module_rule(ModuleRule("layer_norm", lambda: torch.nn.LayerNorm, layer_norm_unsupported,
                                layer_norm_module_workloads))
