"""shapetune::group_norm and shapetune::layer_norm through the tuned kernel for the shape, or torch's.

group_norm takes activations channels-last: a 4-D NCHW tensor in torch.channels_last memory format
(what diffusers passes once the model is channels_last: x.permute(0, 2, 3, 1) is then a contiguous
[N, H, W, C]) or a contiguous [N, HW, C]. Any other layout is first copied to channels-last; those
copies are counted as ("group_norm", "relayout_copy") in `fallback_summary()` (an extra count next
to the call's own outcome, not a fallback). A 3-D x reads two ways (torch's [N, C, L], the kernel's
[N, HW, C]), so the public function takes it only with its layout named. With shift_bias [C] and
shift [N, C] it normalizes x + shift_bias + shift (a ResnetBlock2D's bias-free conv1 output, conv1's bias
and the time embedding: kernels.patch asks `group_norm_shift_tuned` before running conv1 without its
bias), the sums in fp32 as the kernel reads x; counted under "group_norm+shift".
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from shapetune.ops.norm import add_layer_norm_workload, group_norm_workload, layer_norm_workload
from .dispatch import SUPPORTED, count, meta, plan, resolve, served
from scheduler.loader import call_on_current_stream

from .custom_op import _any_autocast, autocast_on, call_op, register_recompute_autograd, shapetune_op


def _affine(weight, bias) -> tuple:
    """What a norm's plan key holds of its affine parameters (kernels.dispatch.meta of each)."""
    if weight is None or bias is None:
        return meta(weight), meta(bias)
    return weight.shape, weight.dtype, weight.device, bias.shape, bias.dtype, bias.device


# -- group_norm -------------------------------------------------------------------------------------
def _check_gn(shape, dtype, device, num_groups: int, weight, bias, shift_bias=None, shift=None):
    """group_norm's argument checks, of x's shape, dtype and device (a plan is made before the conv that
    writes x runs: kernels.patch's ResnetBlock2D)."""
    if len(shape) not in (3, 4):
        raise ValueError(f"shapetune.group_norm: x must be [N, C, H, W] or [N, HW, C], got {tuple(shape)}")
    c = shape[1] if len(shape) == 4 else shape[2]
    if num_groups <= 0 or c % num_groups:
        raise ValueError(f"shapetune.group_norm: {c} channels not divisible by num_groups={num_groups}")
    if (shift_bias is None) != (shift is None):
        raise ValueError("shapetune.group_norm: shift_bias and shift come together (x + shift_bias[c] + shift[n, c])")
    for name, t, want in (("weight", weight, (c,)), ("bias", bias, (c,)), ("shift_bias", shift_bias, (c,)),
                          ("shift", shift, (shape[0], c))):
        if t is not None and (t.shape != want or t.dtype != dtype or t.device != device):
            raise ValueError(f"shapetune.group_norm: {name} must be {list(want)} {dtype} on {device}, "
                             f"got {tuple(t.shape)} {t.dtype} on {t.device}")


def _gn_torch(x, num_groups, weight, bias, eps, silu, shift_bias=None, shift=None):
    """torch's own path, in the layout the op returns (with a shift: its two adds first, as eager)."""
    if shift is not None:
        x = (x + shift_bias + shift[:, None, :] if x.dim() == 3 else
             x + shift_bias[:, None, None] + shift[:, :, None, None])
    if x.dim() == 3:
        y = F.group_norm(x.permute(0, 2, 1), num_groups, weight, bias, eps).permute(0, 2, 1)
        y = y.contiguous()
    else:
        y = F.group_norm(x, num_groups, weight, bias, eps).contiguous(memory_format=torch.channels_last)
    return F.silu(y) if silu else y


def _gn_out_like(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 3:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    return torch.empty_like(x, memory_format=torch.channels_last)


def _gn_plan(shape, dtype, device, num_groups, weight, bias, eps, silu, shift_bias, shift) -> tuple:
    """The plan of a group_norm call on an x of this shape, dtype and device; a shifted call is counted
    under "group_norm+shift" (its fallbacks apart from the plain norms')."""
    _check_gn(shape, dtype, device, num_groups, weight, bias, shift_bias, shift)
    if len(shape) == 4:
        n, c, h, w = shape
        hw = h * w
    else:
        n, hw, c = shape
    sh = shift is not None
    sig = ("group_norm", n, hw, c, num_groups, dtype, eps, silu, device.type) + (("shift",) if sh else ())
    what = resolve("group_norm+shift" if sh else "group_norm", sig,
                   lambda: group_norm_workload(n, hw, c, num_groups, SUPPORTED[dtype], eps, silu, shift=sh), dtype,
                   device.type == "cuda", empty=n * hw * c == 0, no_affine=weight is None or bias is None)
    return what + ((n, hw, c),)


def _gn_key(shape, dtype, device, num_groups, weight, bias, eps, silu, shift_bias, shift) -> tuple:
    """group_norm's plan key (kernels.dispatch.plan) for an x of this shape, dtype and device (each
    optional tensor's kernels.dispatch.meta, written out: every GroupNorm call builds it)."""
    return ("group_norm", shape, dtype, device, num_groups,
            None if weight is None else (weight.shape, weight.dtype, weight.device),
            None if bias is None else (bias.shape, bias.dtype, bias.device), eps, silu,
            None if shift_bias is None else (shift_bias.shape, shift_bias.dtype, shift_bias.device),
            None if shift is None else (shift.shape, shift.dtype, shift.device))


@shapetune_op("group_norm")
def _group_norm(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                eps: float, silu: bool, shift_bias: Optional[torch.Tensor] = None,
                shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    meta_ = (x.shape, x.dtype, x.device, num_groups, weight, bias, eps, silu, shift_bias, shift)
    _, res, (n, hw, c) = plan(_gn_key(*meta_), _gn_plan, *meta_)
    if res is None:
        return _gn_torch(x, num_groups, weight, bias, eps, silu, shift_bias, shift)
    is_gpu = x.is_cuda
    if x.dim() == 4:
        if not x.is_contiguous(memory_format=torch.channels_last):
            count("group_norm", "relayout_copy")
            x = x.contiguous(memory_format=torch.channels_last)
        x3 = x.permute(0, 2, 3, 1).reshape(n, hw, c)  # a view: channels-last memory is [N, H, W, C]
    else:
        if not x.is_contiguous():
            count("group_norm", "relayout_copy")
        x3 = x.contiguous()
    out = _gn_out_like(x)
    out3 = out.permute(0, 2, 3, 1).reshape(n, hw, c) if x.dim() == 4 else out
    shifts = [] if shift is None else [shift_bias.contiguous(), shift.contiguous()]
    call_on_current_stream(res.fn, [x3, *shifts, weight.contiguous(), bias.contiguous(), out3], is_gpu)
    return out


@_group_norm.register_fake
def _(x, num_groups, weight, bias, eps, silu, shift_bias=None, shift=None):
    _check_gn(x.shape, x.dtype, x.device, num_groups, weight, bias, shift_bias, shift)
    return _gn_out_like(x)


# Backward through torch's own ops, recomputed (the forward kernel keeps no statistics).
register_recompute_autograd("group_norm", _gn_torch)


def group_norm_shift_tuned(shape, dtype: torch.dtype, device: torch.device, num_groups: int, weight, bias,
                           eps: float, silu: bool, shift_bias: torch.Tensor, shift: torch.Tensor) -> bool:
    """Whether group_norm with a shift, of an x of this shape, dtype and device, runs one tuned kernel:
    asked before x is computed (kernels.patch runs the conv that writes x without its bias only then; not
    while torch.compile traces). Where not, the call is counted under ("group_norm+shift", cause) here:
    the caller runs the unfused path. The op's own plan: its call on that x finds it."""
    meta_ = (shape, dtype, device, num_groups, weight, bias, eps, silu, shift_bias, shift)
    return served(_gn_key(*meta_), _gn_plan, *meta_)


GN_LAYOUTS_3D = ("NLC", "NCL")


def group_norm(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5, silu: bool = False,
               layout: Optional[str] = None, shift_bias: Optional[torch.Tensor] = None,
               shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """GroupNorm (optionally followed by SiLU, fused) with the tuned kernel for this shape and GPU; with
    `shift_bias` and `shift`, of x + shift_bias[c] + shift[n, c], added as the kernel reads x (a
    ResnetBlock2D's bias-free conv1 output, conv1's bias and the time embedding: norm2(conv1(h) + temb)).

    Parameters
    ----------
    x : Tensor [N, C, H, W] (best in torch.channels_last memory format), or 3-D as `layout` says,
        float16 (GPU) or float32 (CPU); other dtypes fall back to torch
    num_groups : int, dividing C
    weight, bias : Tensor [C], x's dtype and device (None: torch's path, counted "no_affine")
    eps : float
    silu : bool, apply y * sigmoid(y) after the affine transform
    layout : required for a 3-D x, which reads two ways: "NLC" ([N, HW, C], channels-last, best
        contiguous) or "NCL" (torch's [N, C, L], as F.group_norm reads it; copied to [N, L, C] unless
        it is a transposed view of one). None for a 4-D x (NCHW, as torch).
    shift_bias, shift : Tensor [C] and [N, C], x's dtype and device, both or neither (a kernel tuned with
        the shift serves the call, counted under "group_norm+shift"; else torch's adds, then its norm)

    Returns
    -------
    Tensor of x's shape and dtype: channels_last for a 4-D x; for a 3-D x, contiguous [N, HW, C]
    ("NLC") or the [N, C, L] transpose of one ("NCL").
    """
    if x.dim() == 3:
        if layout not in GN_LAYOUTS_3D:
            raise ValueError(f"shapetune.group_norm: a 3-D x {tuple(x.shape)} is [N, C, L] to torch and [N, HW, C] "
                             f"to this kernel: say which, layout='NCL' or layout='NLC' (got {layout!r})")
        if layout == "NCL":
            return call_op("group_norm", x.transpose(1, 2), num_groups, weight, bias, float(eps), bool(silu),
                           shift_bias, shift).transpose(1, 2)
    elif layout is not None:
        raise ValueError(f"shapetune.group_norm: layout is for a 3-D x; a {x.dim()}-D x is NCHW (got {layout!r})")
    return call_op("group_norm", x, num_groups, weight, bias, float(eps), bool(silu), shift_bias, shift)


# -- layer_norm -------------------------------------------------------------------------------------
def _check_ln(x: torch.Tensor, weight, bias):
    if x.dim() < 1:
        raise ValueError("shapetune.layer_norm: x must have at least one dim")
    c = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.shape != (c,) or t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"shapetune.layer_norm: {name} must be [{c}] {x.dtype} on {x.device}, "
                             f"got {tuple(t.shape)} {t.dtype} on {t.device}")


def _ln_plan(x, weight, bias, eps) -> tuple:
    _check_ln(x, weight, bias)
    c = x.shape[-1]
    m = x.numel() // c if c else 0
    sig = ("layer_norm", m, c, x.dtype, eps, x.device.type)
    return resolve("layer_norm", sig, lambda: layer_norm_workload(m, c, SUPPORTED[x.dtype], eps), x.dtype, x.is_cuda,
                   empty=m == 0, no_affine=weight is None or bias is None) + ((m, c),)


@shapetune_op("layer_norm")
def _layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                eps: float) -> torch.Tensor:
    _, res, (m, c) = plan(("layer_norm", x.shape, x.dtype, x.device, _affine(weight, bias), eps), _ln_plan, x,
                          weight, bias, eps)
    if res is None:
        return F.layer_norm(x, (c,), weight, bias, eps).contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    call_on_current_stream(res.fn, [x.reshape(m, c).contiguous(), weight.contiguous(), bias.contiguous(),
                                    out.view(m, c)], x.is_cuda)
    return out


@_layer_norm.register_fake
def _(x, weight, bias, eps):
    _check_ln(x, weight, bias)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


register_recompute_autograd("layer_norm", lambda x, w, b, eps: F.layer_norm(x, (x.shape[-1],), w, b, eps))


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim with the tuned kernel for this shape and GPU.

    Parameters
    ----------
    x : Tensor [..., C], float16 (GPU) or float32 (CPU); other dtypes fall back to torch
    weight, bias : Tensor [C], x's dtype and device (None: torch's path, counted "no_affine")
    eps : float

    Returns
    -------
    Tensor [..., C], x's dtype, contiguous. Non-contiguous inputs are copied to contiguous first.
    """
    return call_op("layer_norm", x, weight, bias, float(eps))


# -- add_layer_norm: a residual add and the LayerNorm after it ----------------------------------------
def _check_aln(a: torch.Tensor, r: torch.Tensor, weight, bias):
    if r.shape != a.shape or r.dtype != a.dtype or r.device != a.device:
        raise ValueError(f"shapetune.add_layer_norm: r must be a's shape {tuple(a.shape)}, dtype and device, got "
                         f"{tuple(r.shape)} {r.dtype} on {r.device}")
    _check_ln(a, weight, bias)


def _aln_plan(a, r, weight, bias, eps) -> tuple:
    _check_aln(a, r, weight, bias)
    c = a.shape[-1]
    m = a.numel() // c if c else 0
    sig = ("add_layer_norm", m, c, a.dtype, eps, a.device.type)
    return resolve("add_layer_norm", sig, lambda: add_layer_norm_workload(m, c, SUPPORTED[a.dtype], eps), a.dtype,
                   a.is_cuda, empty=m == 0, no_affine=weight is None or bias is None) + ((m, c),)


def _aln_key(a, r, weight, bias, eps) -> tuple:
    return ("add_layer_norm", a.shape, a.dtype, a.device, r.shape, r.dtype, r.device, _affine(weight, bias), eps)


@shapetune_op("add_layer_norm")
def _add_layer_norm(a: torch.Tensor, r: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    eps: float) -> torch.Tensor:
    _, res, (m, c) = plan(_aln_key(a, r, weight, bias, eps), _aln_plan, a, r, weight, bias, eps)
    out = torch.empty((2, *a.shape), dtype=a.dtype, device=a.device)
    if res is None:  # called directly without a kernel: torch's two ops, into the stacked output
        torch.add(a, r, out=out[0])
        out[1] = F.layer_norm(out[0], (c,), weight, bias, eps)
        return out
    call_on_current_stream(res.fn, [a.reshape(m, c).contiguous(), r.reshape(m, c).contiguous(), weight.contiguous(),
                                    bias.contiguous(), out.view(2, m, c)], a.is_cuda)
    return out


@_add_layer_norm.register_fake
def _(a, r, weight, bias, eps):
    _check_aln(a, r, weight, bias)
    return torch.empty((2, *a.shape), dtype=a.dtype, device=a.device)


register_recompute_autograd("add_layer_norm", lambda a, r, w, b, eps: torch.stack(
    [a + r, F.layer_norm(a + r, (a.shape[-1],), w, b, eps)]))


def add_layer_norm_tuned(a: torch.Tensor, r: torch.Tensor, weight: Optional[torch.Tensor],
                         bias: Optional[torch.Tensor], eps: float = 1e-5) -> bool:
    """Whether `add_layer_norm(a, r, ...)` runs one tuned kernel (False while torch.compile traces). Where
    not, the call is counted under ("add_layer_norm", cause) here: the caller runs the unfused path. The
    op's own plan (one dict lookup once warm)."""
    if torch.compiler.is_compiling() or (_any_autocast() and autocast_on(a)):  # autocast: add, then norm, as eager
        return False
    return served(_aln_key(a, r, weight, bias, eps), _aln_plan, a, r, weight, bias, eps)


def add_layer_norm(a: torch.Tensor, r: torch.Tensor, weight: Optional[torch.Tensor] = None,
                   bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, y): s = a + r and y = LayerNorm over the last dim of s, as diffusers' BasicTransformerBlock runs
    `h = attn(...) + h; norm(h)`. One tuned kernel for this shape and GPU where one serves (a and r read
    once, s and y written once); else torch's add and shapetune.layer_norm, as unfused (counted under
    ("add_layer_norm", cause) next to the layer_norm call).

    Parameters
    ----------
    a, r : Tensor [..., C], one shape, dtype (float16 GPU / float32 CPU) and device
    weight, bias : Tensor [C], a's dtype and device (None: the unfused path)
    eps : float

    Returns
    -------
    (s, y), each of a's shape and dtype, contiguous (with the kernel: two halves of one [2, ...] tensor).
    """
    if add_layer_norm_tuned(a, r, weight, bias, float(eps)):
        out = call_op("add_layer_norm", a, r, weight, bias, float(eps))
        return out[0], out[1]
    s = a + r
    return s, call_op("layer_norm", s, weight, bias, float(eps))
