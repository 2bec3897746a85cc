"""torch.library glue: the shapetune::<op> custom ops, a direct path for plain inference calls, and
recompute autograd."""

from __future__ import annotations


# -- custom ops: registration and a direct path for plain inference calls ---------------------------
_RAW: dict = {}  # op name -> the undecorated implementation
_OPS: dict = {}  # op name -> torch.ops.shapetune.<name>
_Parameter = None  # torch.nn.Parameter, bound on first use (this module imports torch lazily)


def shapetune_op(name: str):
    """`torch.library.custom_op("shapetune::<name>", mutates_args=())` that also keeps the plain
    function, so `call_op` can run it without the dispatcher where the dispatcher adds nothing."""
    import torch

    def deco(fn):
        _RAW[name] = fn
        return torch.library.custom_op(f"shapetune::{name}", mutates_args=())(fn)

    return deco


def direct_ok(args) -> bool:
    """Whether calling an op's implementation directly is what the dispatcher would do anyway:
    plain tensors with data (a meta tensor goes to the op's fake implementation: the kernel would
    be handed no memory), no autograd to record, no tracing (torch.compile), no functorch transform
    (vmap, grad), no dispatch or function modes (FakeTensor, device contexts)."""
    import torch

    global _Parameter
    if _Parameter is None:
        _Parameter = torch.nn.Parameter
    if torch.compiler.is_compiling():  # first: dynamo folds it to a constant, the rest it cannot trace
        return False
    if (torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack()
            or torch._C._are_functorch_transforms_active()):
        return False
    grad = torch.is_grad_enabled()
    for a in args:  # nn.Parameter is a plain tensor too (every patched module passes its weights)
        if isinstance(a, torch.Tensor) and ((type(a) is not torch.Tensor and type(a) is not _Parameter)
                                            or (grad and a.requires_grad) or a.is_meta):
            return False
    return True


def call_op(name: str, *args):
    """torch.ops.shapetune.<name>(*args), skipping the custom-op dispatch (Python work per call far
    above the registry lookup's; the lookup: see BENCHMARKS.md, "Registry lookup") when `direct_ok`:
    a patched diffusers UNet makes ~1000 op calls per step."""
    if direct_ok(args):
        return _RAW[name](*args)
    op = _OPS.get(name)
    if op is None:
        import torch

        op = _OPS[name] = getattr(torch.ops.shapetune, name)
    return op(*args)


def register_recompute_autograd(name: str, torch_fn) -> None:
    """Autograd for shapetune::<name>: the backward recomputes `torch_fn(*inputs)` (torch's own ops,
    same signature as the op) with autograd on and differentiates that (the forward kernels keep no
    intermediates). Non-tensor inputs get no gradient."""
    import torch

    def setup(ctx, inputs, output):
        ctx.is_tensor = [isinstance(a, torch.Tensor) for a in inputs]
        ctx.others = [None if t else a for a, t in zip(inputs, ctx.is_tensor)]
        ctx.save_for_backward(*[a for a, t in zip(inputs, ctx.is_tensor) if t])

    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        args = [next(saved) if t else a for a, t in zip(ctx.others, ctx.is_tensor)]
        with torch.enable_grad():
            leaves = [a.detach().requires_grad_(a.requires_grad) if t else a for a, t in zip(args, ctx.is_tensor)]
            wrt = [a for a, t in zip(leaves, ctx.is_tensor) if t and a.requires_grad]
            grads = iter(torch.autograd.grad(torch_fn(*leaves), wrt, grad)) if wrt else iter(())
        return tuple(next(grads) if t and a.requires_grad else None for a, t in zip(leaves, ctx.is_tensor))

    torch.library.register_autograd(f"shapetune::{name}", backward, setup_context=setup)
