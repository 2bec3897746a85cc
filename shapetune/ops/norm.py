"""Normalization ops (memory-bound): group_norm over channels-last activations, layer_norm over rows.

group_norm  x[n, hw, c] (NHWC flattened: the memory of a channels_last NCHW tensor), G groups of
            C/G consecutive channels; per (n, g) over hw x C/G elements:
              mean = S1 / cnt, var = max(S2 / cnt - mean^2, 0), cnt = HW * C/G,
              y = (x - mean) * rsqrt(var + eps) * w[c] + b[c], then y * sigmoid(y) with "silu".
            With the "shift" step (epilogue ("shift", "affine"[, "silu"]): a prologue, first in order)
            it normalizes xs = x + b0[c] + t[n, c] instead, summed in fp32 and never written:
            ResnetBlock2D's conv1 bias and time embedding, added to cuDNN's bias-free conv1 output
            in the GroupNorm norm2 that reads it (one pass of the activation less). The statistics
            below are those of xs: the shift moves each group's mean, which the note on |mean| >> std
            covers.
layer_norm  x[m, c]; the same with one group per row (cnt = C), always affine.
add_layer_norm  a[m, c] + r[m, c] -> s (rounded to the dtype), then layer_norm(s): out[2, m, c] = [s, y]
            (a transformer block's residual add and the LayerNorm after it in one pass).

Statistics: one fused pass of S1 = sum x and S2 = sum x^2, both accumulated in fp32 from the
fp16/fp32 inputs (no Welford). The variance E[x^2] - mean^2 loses log2((mean^2 + var) / var) bits
to cancellation: for the O(1)-magnitude, roughly centred activations of SD (|mean| <~ 3 std), that
is <= 4 of fp32's 24 bits, far below fp16's 11-bit output rounding. Inputs with |mean| >> std (or
magnitudes near fp16's range) would need a two-pass or Welford reduction; var is clamped at 0 so
rounding can never produce NaN. eps is a compile-time constant and part of the workload key
(in `layout`, e.g. "x[n,hw,c] nhwc eps=1e-05").

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
def _normalize(te, tirx, x, w, b, s1, s2, cnt, eps, shape, idx_stat, idx_c, dtype, acc, silu):
    """mean/rstd blocks from (S1, S2), then y = cast((x - mean) * rstd * w + b (, silu))."""
    stat_shape = s1.shape
    mean = te.compute(stat_shape, lambda *i: s1(*i) / cnt, name="mean")
    rstd = te.compute(stat_shape, lambda *i: tirx.rsqrt(
        tirx.max(s2(*i) / cnt - mean(*i) * mean(*i), tirx.const(0, acc)) + tirx.const(eps, acc)), name="rstd")

    def affine(*i):
        st = idx_stat(*i)
        c = idx_c(*i)
        return ((x(*i).astype(acc) - mean(*st)) * rstd(*st) * w[c].astype(acc) + b[c].astype(acc))

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

    def stat(name, f):
        rh, rc = te.reduce_axis((0, hw), "rh"), te.reduce_axis((0, cg), "rc")
        return te.compute((n, g), lambda i, j: te.sum(f(x[i, rh, j * cg + rc].astype(acc)), axis=[rh, rc]),
                          name=name)

    s1 = stat("sum", lambda v: v)
    s2 = stat("sqsum", lambda v: v * v)
    cnt = (hw * cg).astype(acc) if not isinstance(hw, int) else tirx.const(float(hw * cg), acc)
    y = _normalize(te, tirx, x, w, b, s1, s2, cnt, eps_of(wl), (n, hw, c),
                   lambda i, h, k: (i, k // cg), lambda i, h, k: k, wl.dtype, acc, "silu" in wl.epilogue)
    return te.create_prim_func(args + [w, b, y]).with_attr("global_symbol", "main")


def _rows(wl: Workload, te) -> tuple:
    """(m, c) of a row-wise norm's workload, m a symbolic var where the workload is a bucket over rows."""
    d = wl.dim
    return (te.var("m") if "m" in wl.ranges else d["m"]), d["c"]


def _layer_norm_of(wl: Workload, x, w, b, m, c, te, tirx):
    """y = LayerNorm(x[m, c]) with affine w, b: the row sums S1, S2 of x (as acc), then _normalize."""
    acc = wl.acc_dtype

    def stat(name, f):
        r = te.reduce_axis((0, c), "rc")
        return te.compute((m,), lambda i: te.sum(f(x[i, r].astype(acc)), axis=r), name=name)

    s1 = stat("sum", lambda v: v)
    s2 = stat("sqsum", lambda v: v * v)
    return _normalize(te, tirx, x, w, b, s1, s2, tirx.const(float(c), acc), eps_of(wl), (m, c),
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
def _affine_params(c: int, gen: torch.Generator) -> list[torch.Tensor]:
    gd = gen.device
    w = 1.0 + 0.25 * torch.randn(c, generator=gen, device=gd)
    b = 0.25 * torch.randn(c, generator=gen, device=gd)
    return [w, b]


def group_norm_inputs(wl: Workload, device, generator: torch.Generator) -> list[torch.Tensor]:
    """x ~ N(0.5, 1) (a mean offset, as activations have) and w ~ 1 + N(0, 1/16), b ~ N(0, 1/16); with
    "shift" also b0 ~ N(0, 1/16) (a conv's bias) and t ~ N(0, 1) (a time embedding: each image's groups
    shifted apart), in calling order x, b0, t, w, b."""
    d = wl.dim
    gd = generator.device
    x = torch.randn(d["n"], d["hw"], d["c"], generator=generator, device=gd) + 0.5
    ts = [x, *_affine_params(d["c"], generator)]
    if "shift" in wl.epilogue:
        shift = [0.25 * torch.randn(d["c"], generator=generator, device=gd),
                 torch.randn(d["n"], d["c"], generator=generator, device=gd)]
        ts = [x, *shift, *ts[1:]]
    return [t.to(device=device, dtype=TORCH_DTYPE[wl.dtype]) for t in ts]


def group_norm_output(wl: Workload, device) -> torch.Tensor:
    d = wl.dim
    return torch.empty(d["n"], d["hw"], d["c"], device=device, dtype=TORCH_DTYPE[wl.dtype])


def group_norm_reference(wl: Workload, inputs: list[torch.Tensor]) -> torch.Tensor:
    """float64 where the inputs are: F.group_norm on the NCHW view (H*W flattened into one axis) of x, or
    of x + b0 + t with "shift" (exact in float64: the fp16 roundings eager adds between its adds are
    within the tolerance), then SiLU."""
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
    d = wl.dim
    x = torch.randn(d["m"], d["c"], generator=generator, device=generator.device) + 0.5
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
    """a (an attention's or feed-forward's output) and r (the residual stream) ~ N(0, 1) + 0.25, w, b."""
    d = wl.dim
    a = torch.randn(d["m"], d["c"], generator=generator, device=generator.device) + 0.25
    r = torch.randn(d["m"], d["c"], generator=generator, device=generator.device) + 0.25
    return [t.to(device=device, dtype=TORCH_DTYPE[wl.dtype]) for t in [a, r, *_affine_params(d["c"], generator)]]


def add_layer_norm_output(wl: Workload, device) -> torch.Tensor:
    d = wl.dim
    return torch.empty(2, d["m"], d["c"], device=device, dtype=TORCH_DTYPE[wl.dtype])


def add_layer_norm_reference(wl: Workload, inputs: list[torch.Tensor]) -> torch.Tensor:
    """float64: [a + r, LayerNorm(a + r)] (the kernel rounds s to its dtype before normalizing, as torch's
    add does: one rounding of s, inside any fp16 tolerance)."""
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


register_op("group_norm", OpDef(group_norm_prim_func, group_norm_inputs, group_norm_output, group_norm_reference,
                                group_norm_vendor, "torch.nn.functional.group_norm",
                                vendor_variants={"nchw": group_norm_vendor_nchw}))
register_op("layer_norm", OpDef(layer_norm_prim_func, layer_norm_inputs, layer_norm_output, layer_norm_reference,
                                layer_norm_vendor, "torch.nn.functional.layer_norm"))
register_op("add_layer_norm", OpDef(add_layer_norm_prim_func, add_layer_norm_inputs, add_layer_norm_output,
                                    add_layer_norm_reference, add_layer_norm_vendor,
                                    "torch.add+torch.nn.functional.layer_norm"))


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
