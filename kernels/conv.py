"""shapetune::conv2d — y = conv2d(x, W, b, stride, padding) (+ r) on channels-last activations,
through the tuned implicit-GEMM kernel for this shape, or torch's own.

The op takes and returns NCHW tensors in channels_last memory (what diffusers passes once the model
is `.to(memory_format=torch.channels_last)`): `x.permute(0, 2, 3, 1)` is then the kernel's NHWC
operand with no copy. Other memory formats are copied to channels_last first. The kernel wants
the weight as OHWI [Co, KH, KW, Ci]: a channels_last weight already is one (a free view, and
kernels.patch keeps patched nn.Conv2d weights channels_last); any other weight is converted on
every call, counted as ("conv2d", "weight_relayout") in `fallback_summary()`.

Where no tuned conv is served (nothing tuned, or cuDNN measured faster), the op runs cuDNN's conv
without its bias and then one tuned bias_add pass (kernels/elementwise.py) adding the bias and the
residual or shift in place, where such a pass is tuned for the output's shape; otherwise cuDNN with
its bias and torch's adds, eager's own path. (A tuned conv is compared against cuDNN + torch's adds,
the path a model pays unpatched; against cuDNN + the bias_add pass it is not re-measured.)

Nothing derived from a tensor's values is cached: every call reads the live weight, so writes
through `.data` (which do not bump a tensor's version counter, e.g. a PEFT LoRA merge), `copy_`,
`param.data = t` and `load_state_dict` all take effect on the next call. (Audit, issue 8: the
other caches on the call path hold no tensor values either: the registry's resolutions are keyed
by shape signature, the ops' plans (kernels.dispatch.plan) by the call's shapes, dtypes, devices
and scalar arguments, scheduler.loader.load_function by artifact path; linear, the fused ops, the
norms and attention read their tensors per call; tests/kernels/test_host_plans.py.)
"""

from __future__ import annotations

from typing import Optional

import torch

from shapetune.ops.conv import conv2d_workload
from .dispatch import SUPPORTED, count, plan, planned, resolve
from .elementwise import bias_add_resolve, run_bias_add
from .registry import get_registry
from scheduler.loader import call_on_current_stream

from .custom_op import TORCH_EXPR, call_op, shapetune_op

CL = torch.channels_last


def _out_hw(h: int, w: int, kh: int, kw: int, stride: int, padding: int) -> tuple[int, int]:
    return (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1


def _check(x, weight, bias, stride, padding, residual, shift=None):
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"shapetune.conv2d: x and weight must be 4-D (NCHW, OIHW), got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"shapetune.conv2d: x has {x.shape[1]} channels, weight expects {weight.shape[1]} "
                         f"(groups are not supported)")
    if stride < 1 or padding < 0:
        raise ValueError(f"shapetune.conv2d: stride {stride} must be >= 1 and padding {padding} >= 0")
    ho, wo = _out_hw(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3], stride, padding)
    if ho < 1 or wo < 1:
        raise ValueError(f"shapetune.conv2d: empty output for input {tuple(x.shape)} and kernel "
                         f"{tuple(weight.shape[2:])}")
    tensors = [t for t in (weight, bias, residual, shift) if t is not None]
    if any(t.dtype != x.dtype for t in tensors):
        raise ValueError(f"shapetune.conv2d: dtypes differ ({[str(t.dtype) for t in (x, *tensors)]})")
    if any(t.device != x.device for t in tensors):
        raise ValueError("shapetune.conv2d: x, weight, bias and residual must be on one device")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"shapetune.conv2d: bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    want = (x.shape[0], weight.shape[0], ho, wo)
    if residual is not None and tuple(residual.shape) != want:
        raise ValueError(f"shapetune.conv2d: residual must be {list(want)}, got {tuple(residual.shape)}")
    if shift is not None and (residual is not None or tuple(shift.shape) != want[:2]):
        raise ValueError(f"shapetune.conv2d: shift must be {list(want[:2])} and comes without a residual, got "
                         f"{tuple(shift.shape)}{' and a residual' if residual is not None else ''}")
    return ho, wo


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """The NHWC (contiguous) view of an NCHW tensor; a copy only if it is not channels_last."""
    v = t.permute(0, 2, 3, 1)
    return v if v.is_contiguous() else v.contiguous()


def _ohwi(weight: torch.Tensor) -> torch.Tensor:
    """weight [Co, Ci, KH, KW] as the kernel's contiguous [Co, KH, KW, Ci], from its current
    values: a view of a channels_last weight, else a copy (counted)."""
    v = weight.permute(0, 2, 3, 1)
    if v.is_contiguous():
        return v
    count("conv2d", "weight_relayout")
    return v.contiguous()


def _torch_conv(x, weight, bias, stride, padding, residual, shift, bias_add):
    """cuDNN's conv. torch adds a conv's bias in a kernel of its own after cuDNN's (a broadcast add),
    then the model adds the residual or shift in another: where a tuned bias_add serves this output
    (`bias_add`, its Resolution, else None), the conv runs without its bias and that one kernel adds
    bias (+ residual | + shift) in place."""
    if bias_add is not None:
        n, co = x.shape[0], weight.shape[0]
        y = torch.nn.functional.conv2d(x, weight, None, stride, padding).contiguous(memory_format=CL)
        hw = y.shape[2] * y.shape[3]
        extra = (_nhwc(residual).view(n, hw, co) if residual is not None else shift)
        run_bias_add(bias_add, y.permute(0, 2, 3, 1).view(n, hw, co), bias, extra)
        return y
    y = torch.nn.functional.conv2d(x, weight, bias, stride, padding)
    if residual is not None:
        y = y + residual
    if shift is not None:
        y = y + shift.view(*shift.shape, 1, 1)
    return y.contiguous(memory_format=CL)


def _plan(x, weight, bias, stride, padding, residual, shift) -> tuple:
    """The checks and resolution of a conv2d call (dispatch.plan): ((op, outcome), the Resolution or
    None, (ho, wo, and where torch's conv runs with a bias, its bias_add pass's (outcome, Resolution)))."""
    ho, wo = _check(x, weight, bias, stride, padding, residual, shift)
    n, ci, h, w = x.shape
    co, _, kh, kw = weight.shape
    has_b, has_r = bias is not None, residual is not None
    sig = ("conv2d", n, h, w, ci, co, kh, kw, stride, padding, x.dtype, has_b, has_r, x.device.type)
    what, res = resolve("conv2d", sig, lambda: conv2d_workload(n, h, w, ci, co, kh, kw, stride, padding,
                                                               SUPPORTED[x.dtype], has_b, has_r),
                        x.dtype, x.is_cuda, empty=x.numel() == 0)
    bias_add = (None, None)
    if res is None and has_b:
        epi = ("residual",) if has_r else ("shift",) if shift is not None else ()
        bias_add = bias_add_resolve(n, ho * wo, co, x, epi)
    return what, res, (ho, wo) + bias_add


def _key(x, weight, bias, stride, padding, residual, shift) -> tuple:
    """conv2d's plan key (kernels.dispatch.plan)."""
    return ("conv2d", x.shape, x.dtype, x.device, weight.shape, weight.dtype, weight.device,
            None if bias is None else (bias.shape, bias.dtype, bias.device), stride, padding,
            None if residual is None else (residual.shape, residual.dtype, residual.device),
            None if shift is None else (shift.shape, shift.dtype, shift.device))


def conv2d_tuned(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int, padding: int,
                 shift: Optional[torch.Tensor] = None) -> bool:
    """Whether conv2d(x, weight, bias, stride, padding, shift=shift) runs a tuned conv (else cuDNN's), not
    counted (the call that follows counts itself): the op's own plan."""
    return planned(_key(x, weight, bias, stride, padding, None, shift), _plan, x, weight, bias, stride, padding, None,
                   shift)[1] is not None


@shapetune_op("conv2d")
def _conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int, padding: int,
            residual: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    _, res, (ho, wo, bias_what, bias_add) = plan(_key(x, weight, bias, stride, padding, residual, shift), _plan, x,
                                                 weight, bias, stride, padding, residual, shift)
    if res is None:
        if bias_what is not None:
            get_registry().calls[bias_what] += 1
        return _torch_conv(x, weight, bias, stride, padding, residual, shift, bias_add)
    n, co, is_gpu = x.shape[0], weight.shape[0], x.is_cuda
    args = [_nhwc(x), _ohwi(weight)]
    if bias is not None:
        args.append(bias.contiguous())
    if residual is not None:
        args.append(_nhwc(residual))
    out = torch.empty(n, ho, wo, co, dtype=x.dtype, device=x.device)
    call_on_current_stream(res.fn, args + [out], is_gpu)
    if shift is not None:  # the tuned conv's epilogue has no shift: torch's add, as eager
        out += shift.view(shift.shape[0], 1, 1, shift.shape[1])
    return out.permute(0, 3, 1, 2)


@_conv2d.register_fake
def _(x, weight, bias, stride, padding, residual=None, shift=None):
    ho, wo = _check(x, weight, bias, stride, padding, residual, shift)
    return x.new_empty(x.shape[0], ho, wo, weight.shape[0]).permute(0, 3, 1, 2)


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, residual, shift = inputs
    ctx.save_for_backward(x, weight)
    ctx.conv = (stride, padding, bias is not None, residual is not None, shift is not None)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    stride, padding, has_b, has_r, has_s = ctx.conv
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad, x, weight, [weight.shape[0]] if has_b else None, [stride] * 2, [padding] * 2, [1, 1], False,
        [0, 0], 1, [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_b])
    return gx, gw, gb, None, None, grad if has_r else None, grad.sum((2, 3)) if has_s else None


torch.library.register_autograd("shapetune::conv2d", _backward, setup_context=_setup_context)
TORCH_EXPR["conv2d"] = lambda x, w, b, stride, padding, residual=None, shift=None: _torch_conv(
    x, w, b, stride, padding, residual, shift, None)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride: int = 1,
           padding: int = 0, residual: Optional[torch.Tensor] = None,
           shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = conv2d(x, weight, bias, stride, padding) (+ residual), with the tuned kernel for this
    shape and GPU (torch's op where none is tuned or faster).

    Parameters
    ----------
    x : Tensor [N, Ci, H, W], float16 (GPU) or float32 (CPU), channels_last memory (else copied)
    weight : Tensor [Co, Ci, KH, KW], same dtype and device; read on every call (nothing derived
        from it is cached). channels_last memory is the kernel's layout; any other is converted on
        each call, counted ("conv2d", "weight_relayout")
    bias : Tensor [Co] or None
    stride, padding : int, the same for h and w (dilation 1, groups 1)
    residual : Tensor [N, Co, Ho, Wo] or None, added after the bias (fused)
    shift : Tensor [N, Co] or None (not with a residual), added per image and channel after the bias:
        ResnetBlock2D's time embedding, `conv1(h) + temb[:, :, None, None]`

    Returns
    -------
    Tensor [N, Co, Ho, Wo] in channels_last memory, x's dtype.
    """
    return call_op("conv2d", x, weight, bias, int(stride), int(padding), residual, shift)
