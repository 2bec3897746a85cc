"""torch.library glue: the shapetune::<op> custom ops, a direct path for plain inference calls, and
recompute autograd."""

from __future__ import annotations

import torch


# -- custom ops: registration and a direct path for plain inference calls ---------------------------
_RAW: dict = {}  # op name -> the undecorated implementation
_OPS: dict = {}  # op name -> torch.ops.shapetune.<name>
_Tensor, _Parameter = torch.Tensor, torch.nn.Parameter
_is_compiling, _grad_enabled = torch.compiler.is_compiling, torch.is_grad_enabled
_fn_mode, _dispatch_stack = torch._C._is_torch_function_mode_enabled, torch._C._len_torch_dispatch_stack
_functorch = torch._C._are_functorch_transforms_active


def shapetune_op(name: str):
    """`torch.library.custom_op("shapetune::<name>", mutates_args=())` that also keeps the plain
    function, so `call_op` can run it without the dispatcher where the dispatcher adds nothing."""
    def deco(fn):
        _RAW[name] = fn
        return torch.library.custom_op(f"shapetune::{name}", mutates_args=())(fn)

    return deco


def direct_ok(args) -> bool:
    """Whether calling an op's implementation directly is what the dispatcher would do anyway:
    plain tensors with data (a meta tensor goes to the op's fake implementation: the kernel would
    be handed no memory), no autograd to record, no tracing (torch.compile), no functorch transform
    (vmap, grad), no dispatch or function modes (FakeTensor, device contexts)."""
    if _is_compiling():  # first: dynamo folds it to a constant, the rest it cannot trace
        return False
    if _fn_mode() or _dispatch_stack() or _functorch():
        return False
    grad = _grad_enabled()
    for a in args:  # nn.Parameter is a plain tensor too (every patched module passes its weights)
        t = type(a)
        if t is _Tensor or t is _Parameter:
            if a.is_meta or (grad and a.requires_grad):
                return False
        elif isinstance(a, _Tensor):  # a subclass: its __torch_function__ / __torch_dispatch__ decide
            return False
    return True


# -- autocast -------------------------------------------------------------------------------------
# torch.autocast casts the inputs of torch's ops, not of custom ops. Under autocast an op computes what
# autocast would have torch compute: where every floating tensor input already has the dtype autocast gives
# that kind of op (its lower precision for GEMMs, convs, attention; float32 for the norms), the op runs as
# without autocast; otherwise torch's own expression of the op runs (TORCH_EXPR), which autocast casts op by
# op as in eager, counted (op, "autocast").
TORCH_EXPR: dict = {}  # op name -> torch's expression of the op, same signature
_AUTOCAST_FP32 = frozenset({"group_norm", "layer_norm", "add_layer_norm"})  # autocast's float32 list
_any_autocast = torch._C._is_any_autocast_enabled


def autocast_on(t: torch.Tensor) -> bool:
    """torch.autocast is on for t's device type (the fused paths patch picks per call stay off then). Hot
    paths ask the builtin `_any_autocast()` first and call this only where it is True (a Python call less)."""
    return torch.is_autocast_enabled(t.device.type)


def _autocast_call(name: str, args):
    """The op's result under autocast, or None where it runs as without autocast."""
    t = next(a for a in args if isinstance(a, _Tensor))
    if not autocast_on(t):
        return None
    dev = t.device.type
    want = torch.float32 if name in _AUTOCAST_FP32 else torch.get_autocast_dtype(dev)
    if all(a.dtype == want for a in args if isinstance(a, _Tensor) and a.is_floating_point()):
        return None
    from .dispatch import count

    count(name, "autocast")
    return TORCH_EXPR[name](*args)


def call_op(name: str, *args):
    """torch.ops.shapetune.<name>(*args), skipping the custom-op dispatch (Python work per call far
    above the registry lookup's; the lookup: see BENCHMARKS.md, "Registry lookup") when `direct_ok`:
    a patched diffusers UNet makes ~1000 op calls per step. Under torch.autocast: see TORCH_EXPR."""
    if _any_autocast() and not _is_compiling():
        out = _autocast_call(name, args)
        if out is not None:
            return out
    if direct_ok(args):
        return _RAW[name](*args)
    op = _OPS.get(name)
    if op is None:
        op = _OPS[name] = getattr(torch.ops.shapetune, name)
    return op(*args)


def register_recompute_autograd(name: str, torch_fn) -> None:
    """Autograd for shapetune::<name>: the backward recomputes `torch_fn(*inputs)` (torch's own ops,
    same signature as the op) with autograd on and differentiates that (the forward kernels keep no
    intermediates). Non-tensor inputs get no gradient. Under create_graph (gradient penalties,
    Hessian-vector products: the backward then runs with grad mode on) the recompute runs on the saved
    inputs themselves and the gradient keeps its graph, so second-order terms through the op are there
    (before, the gradient was a constant and they were silently dropped). `torch_fn` is also the op's
    TORCH_EXPR."""
    TORCH_EXPR[name] = torch_fn
    def setup(ctx, inputs, output):
        ctx.is_tensor = [isinstance(a, torch.Tensor) for a in inputs]
        ctx.others = [None if t else a for a, t in zip(inputs, ctx.is_tensor)]
        ctx.save_for_backward(*[a for a, t in zip(inputs, ctx.is_tensor) if t])

    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        args = [next(saved) if t else a for a, t in zip(ctx.others, ctx.is_tensor)]
        if torch.is_grad_enabled():  # create_graph=True
            wrt = [a for a, t in zip(args, ctx.is_tensor) if t and a.requires_grad]
            grads = iter(torch.autograd.grad(torch_fn(*args), wrt, grad, create_graph=True)) if wrt else iter(())
            return tuple(next(grads) if t and a.requires_grad else None for a, t in zip(args, ctx.is_tensor))
        with torch.enable_grad():
            leaves = [a.detach().requires_grad_(a.requires_grad) if t else a for a, t in zip(args, ctx.is_tensor)]
            wrt = [a for a, t in zip(leaves, ctx.is_tensor) if t and a.requires_grad]
            grads = iter(torch.autograd.grad(torch_fn(*leaves), wrt, grad)) if wrt else iter(())
        return tuple(next(grads) if t and a.requires_grad else None for a, t in zip(leaves, ctx.is_tensor))

    torch.library.register_autograd(f"shapetune::{name}", backward, setup_context=setup)
