"""Weights of several nn.Linear stacked into one storage, each Parameter re-pointed at its rows: the
same Parameter objects and values, now views of one [sum N, K] matrix (and one [sum N] bias), so one
GEMM computes all their outputs and in-place writes to any of them reach it. kernels/qkv.py,
kernels/temb.py and kernels/ctxkv.py pack this way; each checks the aliasing on every call before it
trusts it. `ModelGroup` is what the last two share: one GEMM per forward of a model, over the modules
of that model that read one input.
"""

from __future__ import annotations

import threading
import types
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from . import lora


MARK = "_shapetune_patched"  # kernels.patch's instance attribute: the kind of patch applied


def hooked(m: nn.Module) -> bool:
    """m's call runs more than its forward: torch forward (pre-)hooks on it (other than a packing's own, on
    the model it packs) or on every module (torch's global ones), or a library's hooks that wrap its forward
    (foreign_hooks). kernels.patch leaves such a module on its own forward and call, and every fused path
    checks its modules on each call (hooks come and go after patch): a path that skipped a module's call
    would skip what its hooks do."""
    d = m.__dict__  # (foreign_hooks inline: this is on every fused call's path)
    fwd, pre = d.get("_forward_hooks"), d.get("_forward_pre_hooks")
    if ((fwd and _torch_hooks(fwd)) or (pre and _torch_hooks(pre)) or "_hf_hook" in d
            or _torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks):
        return True
    reg = d.get("_diffusers_hook")
    return reg is not None and bool(getattr(reg, "hooks", None))


def _torch_hooks(hooks: dict) -> bool:
    return any(not isinstance(getattr(h, "__self__", None), ModelGroup) for h in hooks.values())


def foreign_hooks(m: nn.Module) -> bool:
    """A diffusers hook registry with hooks on m (its caches, layerwise casting, group offloading,
    pyramid attention broadcast, ...: `diffusers.hooks`, which wrap `forward`), or an accelerate hook
    (`_hf_hook`: device placement, offloading). Several keep state across calls and decide per call what
    runs: kernels.graphs captures no module tree that holds one."""
    reg = m.__dict__.get("_diffusers_hook")
    return bool(reg is not None and getattr(reg, "hooks", None)) or "_hf_hook" in m.__dict__


def replace_method(m: nn.Module, method: str, is_old: Callable[[Any], bool], new: Callable | None) -> None:
    """Put `new` (None: the class's own) where `is_old` finds what kernels installed as m's `method`: m's
    instance attribute, or, for forward, inside the wrapper a library put there after it (diffusers'
    HookRegistry function references: layerwise casting, offloading, caches; accelerate's _old_forward).
    Removing the wrapper instead would drop its hooks."""
    d = m.__dict__
    if is_old(d.get(method)):
        if new is None:
            del d[method]
        else:
            d[method] = new
        return
    if method != "forward":
        return
    new = new if new is not None else types.MethodType(type(m).forward, m)
    for ref in getattr(d.get("_diffusers_hook"), "_fn_refs", ()):
        for attr in ("forward", "original_forward"):
            if is_old(getattr(ref, attr, None)):
                setattr(ref, attr, new)
    if is_old(d.get("_old_forward")):
        d["_old_forward"] = new


def plain_linear(m) -> bool:
    """m is an nn.Linear (exactly) that kernels.patch routed to shapetune::linear, without hooks now."""
    return type(m) is nn.Linear and m.__dict__.get(MARK) == "linear" and not hooked(m)


def base_linear(m) -> nn.Module | None:
    """The Linear whose weight rows a packing holds for projection m: m itself where it is a plain patched
    Linear, the Linear a PEFT LoRA layer wraps where that one is (the packed GEMM then computes the base
    output and kernels/lora.py adds the adapters' deltas to its columns); None otherwise."""
    if type(m) is nn.Linear:  # (plain_linear, inline: on every packed call's path)
        return m if m.__dict__.get(MARK) == "linear" and not hooked(m) else None
    if lora.is_lora_linear(m) and plain_linear(m.base_layer) and not hooked(m):
        return m.base_layer
    return None


def holds_rows(linear: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, off: int, n: int) -> bool:
    """`linear` is a plain patched Linear whose weight is exactly rows off..off+n of `weight` (data
    pointer, shape, dtype, strides) and whose bias is those of `bias` (or both are None)."""
    if type(linear) is not nn.Linear or linear.__dict__.get(MARK) != "linear":  # (hooks: the callers' base_linear)
        return False
    k, es = weight.shape[1], weight.element_size()
    w = linear.weight
    if w.data_ptr() != weight.data_ptr() + off * k * es or w.shape != (n, k) or w.dtype != weight.dtype \
            or w.stride() != (k, 1):
        return False
    b = linear.bias
    if bias is None:
        return b is None
    return b is not None and b.data_ptr() == bias.data_ptr() + off * es and b.shape == (n,) and b.dtype == bias.dtype


def stack_rows(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """Pack `linears` (one width, dtype and device; all with a bias or none) in order; returns the
    stacked weight, bias (or None) and each one's first row."""
    with torch.inference_mode(False), torch.no_grad():  # not inference tensors: the params stay writable
        w = torch.cat([m.weight.detach() for m in linears])
        b = torch.cat([m.bias.detach() for m in linears]) if linears[0].bias is not None else None
        offsets, off = [], 0
        for m in linears:
            n = m.weight.shape[0]
            m.weight.data = w[off:off + n]
            if b is not None:
                m.bias.data = b[off:off + n]
            offsets.append(off)
            off += n
    return w, b, offsets


def own_storage(linear: nn.Module | None, *packed: torch.Tensor | None) -> None:
    """Give `linear`'s weight and bias (or those of the Linear a PEFT layer wraps) their own storage
    again wherever they still live in one of the `packed` tensors."""
    if linear is not None and not isinstance(linear, nn.Linear):
        linear = getattr(linear, "base_layer", None)
    if not isinstance(linear, nn.Linear):
        return
    ptrs = {t.untyped_storage().data_ptr() for t in packed if t is not None}
    with torch.inference_mode(False), torch.no_grad():
        for t in (linear.weight, linear.bias):
            if t is not None and t.data.untyped_storage().data_ptr() in ptrs:
                t.data = t.data.clone()


_scope = [0]  # bumped by new_scope(): part of every ModelGroup's cache key


def new_scope() -> None:
    """Begin a new forward scope for every ModelGroup: no output cached before this call is served after
    it. For callers that run a packed model's inner forward several times within one call of the model,
    where the model's hooks run only once around them: kernels.graphs warms up and captures a forward
    that way, and a k/v output cached by a warm-up run (regular memory, freed when the call ends) must not
    be read by the capture, which would bake its address into the graph."""
    _scope[0] += 1


def version(t: torch.Tensor) -> int | None:
    """t's version counter; None for an inference tensor (made under torch.inference_mode), which has none."""
    return None if t.is_inference() else t._version


class PerThread(threading.local):
    """Attributes per thread (threading.local) for state that lives within one forward: two threads'
    forwards of one model interleave, and neither may read what the other's set. A deep copy or pickle
    of a patched model gets a fresh, empty one."""

    def __reduce__(self):
        return (type(self), ())


@dataclass(eq=False)
class ModelGroup:
    """Modules of one model that project one shared input (every resnet's time embedding, every
    cross-attention's context), their weights stacked into one storage (stack_rows), served by one GEMM
    per forward of the model. The GEMM's output lives within that forward only (hooks on the model open
    and drop it; `attach`; new_scope() for runs of the inner forward the hooks do not see) and is keyed by
    the input tensor itself: a weak reference and its version (identity alone for an inference tensor;
    nothing in diffusers' models writes these inputs in place).
    Each member module holds (its group, its first row, its width) in its instance attribute `attr`."""

    attr: ClassVar[str] = ""
    weight: torch.Tensor  # [sum N, K]: the members' stacked weights, in member order
    bias: torch.Tensor | None
    members: list  # weak references to the member modules
    offsets: list[int]
    hooks: list = field(default_factory=list)
    # this thread's forward of the packed model: whether one is open (active), the output computed in it
    # (out) and for what (key: a weakref to the input, its version, the scope)
    state: PerThread = field(default_factory=PerThread, repr=False)

    @property
    def active(self) -> bool:
        return getattr(self.state, "active", False)

    @property
    def key(self) -> tuple | None:
        return getattr(self.state, "key", None)

    @property
    def out(self) -> Any:
        return getattr(self.state, "out", None)

    def open(self, *_args) -> None:
        self.state.active, self.state.key, self.state.out = True, None, None

    def close(self, *_args) -> None:
        self.state.active, self.state.key, self.state.out = False, None, None

    def attach(self, model: nn.Module) -> None:
        self.hooks = [model.register_forward_pre_hook(self.open),
                      model.register_forward_hook(self.close, always_call=True)]

    def remove_hooks(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        self.close()

    def member_intact(self, member: nn.Module, off: int, n: int) -> bool:
        """The member's projections still hold their rows of the storage (packing.holds_rows)."""
        raise NotImplementedError

    def intact(self) -> bool:
        for ref, off in zip(self.members, self.offsets):
            m = ref()
            if m is None or m.__dict__.get(self.attr) is None or not self.member_intact(m, off, m.__dict__[self.attr][2]):
                return False
        return True

    def serve(self, member: nn.Module, x: torch.Tensor, ndim: int, params: Iterable[torch.Tensor],
              compute: Callable[[torch.Tensor], Any]) -> bool:
        """Whether `member` may take its part of `out` for input x now, computing `out = compute(x)` first
        where this forward has not for x as it is. False (the caller projects by itself): outside a forward
        of the packed model, while torch.compile traces, under autograd with x or `params` trainable, when
        a member's projection no longer holds its rows, or x is not an `ndim`-D input of the stacked
        weight's width, dtype and device."""
        _, off, n = member.__dict__[self.attr]
        if not self.active or torch.compiler.is_compiling():
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
            return False
        key = self.key
        if key is None or key[0]() is not x or key[1] != version(x) or key[2] != _scope[0]:
            w = self.weight
            if not self.intact() or x.dim() != ndim or x.dtype != w.dtype or x.shape[-1] != w.shape[1] \
                    or x.device != w.device:
                return False
            self.state.out, self.state.key = compute(x), (weakref.ref(x), version(x), _scope[0])
        elif not self.member_intact(member, off, n):
            return False
        return True


def regroup(mods: dict[str, nn.Module], groups: list[list[str]], attr: str
            ) -> list[tuple[list[nn.Module], ModelGroup | None]]:
    """The groups (module names, as `mods` names them) to pack again: per group its modules and the
    group they were in (or None), leaving out groups still packed as they are; the entries (and the old
    groups' hooks) of modules that left every group are dropped here."""
    members = {n for g in groups for n in g}
    for name, m in mods.items():  # a module that left its group (e.g. a LoRA around its projection)
        if name not in members and attr in m.__dict__:
            m.__dict__[attr][0].remove_hooks()
            del m.__dict__[attr]
    out = []
    for names in groups:
        ms = [mods[n] for n in names]
        g0 = ms[0].__dict__.get(attr)
        old = None if g0 is None else g0[0]
        if old is not None and all(m.__dict__.get(attr, (None,))[0] is old for m in ms) and old.intact() \
                and len(old.members) == len(ms):
            continue
        out.append((ms, old))
    return out
