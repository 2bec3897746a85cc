"""CUDA graphs per shape class: a module's forward (or any of its methods, e.g. a VAE's `decode`) is
captured once per distinct input signature and replayed after that.

    g = GraphedCall(unet, "forward")          # installs itself as unet.forward
    out = unet(sample, t, encoder_hidden_states=ctx)   # first call of this signature: capture; then replay
    g.stats                                   # Counter: captured, replayed, and every eager fallback by cause
    g.uninstall()

Signature (the graph's key): the call's pytree structure, each tensor's shape, dtype and device, and
every non-tensor argument's value (a Python scalar baked into the graph: a new value is a new graph;
a torch.Generator is keyed by identity, so a method that takes a new one per call and reads it runs a
new capture each time: declare it in `unused_kwargs` where the method never reads it).
So batch, latent H x W, context length, dtype and the CFG batch each make their own graph; an LRU keeps
at most `max_graphs` of them (SHAPETUNE_MAX_GRAPHS, default 16). Every graph on a device allocates from
one shared memory pool, and its inputs are static buffers the call's tensors are copied into (4-D ones in
channels_last memory, the layout the patched convs and norms take, so no transpose runs inside the graph).

Outputs are cloned out of the graph's memory on every replay: graphs share one pool, so a later replay of
another graph may write where this one's outputs live; a clone (the UNet's output is 2 x 4 x 64 x 64 at
batch 2, 512²) keeps every returned tensor the caller's own.

What a graph baked in is checked on every call, and any change drops this module's graphs (re-captured on
the next call, counted `invalidated`):
  - parameter and buffer storage (`param.data = t`, `.to(dtype)`, a replaced Parameter): their data
    pointers. In-place writes (`.data.add_`, `copy_`, `load_state_dict`, a PEFT merge) need nothing:
    the graph reads the weights' memory on every replay, so it sees new values.
  - the module tree (an adapter added or removed, a submodule replaced): torch's global module /
    parameter / buffer registration hooks flag a possible change, then the tree is compared; a changed
    tree is re-patched (`repatch`, e.g. kernels.patch, so new Linear layers of a LoRA are served too).
  - the kernel registry in use (kernels.set_registry; held by reference while graphs baked against it
    live, so the kernels they launch stay loaded).
  - each attention's processor (`set_attn_processor`, `set_processor`: diffusers keeps a processor that is
    no nn.Module as a plain attribute, which no registration hook sees; held in the baked state, so an
    old processor's id cannot come back as a new one's), with the values of its `scale` (IP-Adapter's
    per-adapter scales, which `set_ip_adapter_scale` writes into the processor's list in place).
  - the Python settings diffusers' forwards read and users set between calls (`_SETTINGS`): FreeU's
    factors on the UNet's up blocks (`enable_freeu` / `disable_freeu`), the VAE's slicing and tiling.
PEFT adapter state (active adapters, scales, merged, disabled: Python values the forward reads) is part
of each graph's key instead: switching between two LoRAs captures each once and replays it after that.
Such a capture skips the warm-up runs (`rewarmup`): the shapes' kernels and workspaces are set up. So is
CUDA autocast's state (off, or on with its dtype): a graph captured outside `torch.autocast` computes in
the model's dtypes and must not serve a call under it, nor the reverse.
Not captured, run eagerly and counted by cause: CPU tensors (`cpu`), no CUDA tensor at all (`no_tensor`),
autograd on (`grad_enabled`), a dropout with p > 0 or a batch norm in training mode (`training`: set by
`.train()` / `.eval()`, which bump the tree epoch; an assignment to `.training` is not seen), under
torch.compile or inside another capture (`compiling`, `capturing`), a tree holding hooks below its root
(`hooks`: torch forward (pre-)hooks, torch's global ones, diffusers hooks (caches, layerwise casting,
offloading: `diffusers.hooks`) or accelerate hooks; their Python runs on every call in eager and may keep state
or decide per call what runs, which a replay would skip; registering or removing a torch or diffusers hook is
seen on the next call, an accelerate hook at the next change of the module tree; the root's own hooks run around
the graph), a non-tensor argument that cannot be a key (`unhashable_arg`), an output that is not a pytree of
tensors and plain values (`opaque_output`, e.g. a VAE encoder's distribution object), and a call whose capture
failed (`capture_failed`, e.g. a host sync inside the forward; the signature is then never tried again).
Data-dependent Python control flow inside the forward that does not sync cannot be seen: the graph replays the
branch taken at capture, as with any CUDA graph.

Threads and streams: every graph of a device shares one memory pool, and each graph its static buffers,
so two replays must never overlap. One process-wide lock is held from a call's signature lookup
through its capture or replay to the clones of its outputs (another thread's call waits; without it,
a second thread's inputs could be copied into the static buffers between the first thread's copy and
its replay, and the first caller got the second's result). Each device's last replay records an event
that the next replay's stream waits on before copying its inputs, so a call on another stream (a
thread's own, or a user's side stream) cannot start while the previous replay still runs on the GPU.
Calls that run eagerly run outside the lock; the patched modules' per-forward state (kernels/packing.py's
groups, the GroupNorm + SiLU pass-through) is per thread.

SHAPETUNE_GRAPHS=0 turns capture off (every call runs eagerly, counted `disabled`).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import weakref
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.nn.modules import module as _torch_module

from . import packing

log = logging.getLogger(__name__)

_PLAIN = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device)


# -- module-tree change detection -------------------------------------------------------------------
_tree_epoch = [0]  # bumped whenever any module, parameter or buffer is registered anywhere
_hooks_lock = threading.Lock()
_hooks_installed = False


def _bump(*_args):
    # Not while torch.compile traces: the hook is global, so dynamo would trace it inside any compiled
    # model that registers a module in its forward, guard on the epoch's value and bump it, so every call
    # failed its own guard and recompiled (a compiled UNet in a process that had run kernels.optimize:
    # 5.7 s per call on an H100). A registration inside a traced forward is no tree change a GraphedCall
    # cares about: under compilation it runs the eager path.
    if torch.compiler.is_compiling():
        return None
    _tree_epoch[0] += 1
    return None


def _install_registration_hooks() -> None:
    global _hooks_installed
    with _hooks_lock:
        if _hooks_installed:
            return
        from torch.nn.modules import module as m

        m.register_module_module_registration_hook(_bump)
        m.register_module_parameter_registration_hook(_bump)
        m.register_module_buffer_registration_hook(_bump)
        _watch_torch_hooks()
        _watch_diffusers_hooks()
        _hooks_installed = True


def _draws_in_training(m: nn.Module) -> bool:
    """m computes differently per call in training mode: a dropout with p > 0 (its draws), a batch norm (batch
    statistics, running-stat updates). Other modules' training flag changes nothing a graph replays under
    no_grad (PEFT leaves the LoRA modules it adds in training mode, whatever the model's: an Identity dropout,
    lora_A / lora_B)."""
    if not m.training:
        return False
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return m.p > 0
    return isinstance(m, nn.modules.batchnorm._NormBase) and not isinstance(m, nn.modules.instancenorm._InstanceNorm)


def _bumping(fn):
    @functools.wraps(fn)
    def bumping(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            _bump()
    bumping._shapetune_bumps = True
    return bumping


def _watch_torch_hooks() -> None:
    """torch's per-module forward (pre-)hooks are registered with no global callback: bump the tree epoch
    when one is registered or any hook handle is removed, so a GraphedCall looks at its tree again (it
    captures none that holds one below its root); and when a module's train / eval mode is set."""
    from torch.utils.hooks import RemovableHandle

    for cls, name in ((nn.Module, "register_forward_hook"), (nn.Module, "register_forward_pre_hook"),
                      (RemovableHandle, "remove"), (nn.Module, "train")):
        fn = getattr(cls, name)
        if not getattr(fn, "_shapetune_bumps", False):
            setattr(cls, name, _bumping(fn))


def _watch_diffusers_hooks() -> None:
    """diffusers' hooks (`diffusers.hooks.HookRegistry`: caches, layerwise casting, offloading) wrap a
    module's forward and register nothing torch's hooks see: bump the tree epoch whenever one is
    registered or removed, so a GraphedCall looks at its tree again (it captures none that holds one)."""
    try:
        from diffusers.hooks.hooks import HookRegistry
    except ImportError:  # pragma: no cover
        return
    for name in ("register_hook", "remove_hook"):
        fn = getattr(HookRegistry, name)
        if not getattr(fn, "_shapetune_bumps", False):
            setattr(HookRegistry, name, _bumping(fn))


_live: dict[int, "weakref.WeakSet[torch.cuda.CUDAGraph]"] = {}  # device index -> captured graphs alive


def graph_pool(device: torch.device):
    """The memory pool every captured graph on a device shares: that of a graph still alive, else a
    new one. (A pool handle must not be reused once every graph of its pool is gone: the allocator
    has released the pool, and capturing into it again trips its use-count assertion.)"""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    alive = _live.setdefault(idx, weakref.WeakSet())
    for g in alive:
        return g.pool()
    return torch.cuda.graph_pool_handle()


_streams: dict[int, torch.cuda.Stream] = {}  # device index -> the one stream every warm-up and capture runs on


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream every graph on a device is warmed up and captured on. One stream, not one per
    capture: cuBLAS and cuDNN keep a workspace per stream (32 MiB for cuBLAS on Hopper), so a new stream
    per capture (torch.cuda.graph's default) would add workspaces and raise peak memory above eager's."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _streams:
        _streams[idx] = torch.cuda.Stream(torch.device("cuda", idx))
    return _streams[idx]


#: held from a GraphedCall's signature lookup to its outputs' clones (every GraphedCall: the graphs of a
#: device share one pool); reentrant: a capture's warm-ups run the inner modules' own GraphedCalls
_lock = threading.RLock()
_done: dict[int, torch.cuda.Event] = {}  # device index -> recorded on the stream of its last replay, after it


def _replay(g: "_Graph", fill: Callable[[], None]) -> None:
    """fill() (copy the call's inputs into g's static buffers), then replay g, on the current stream, after
    the device's previous replay, wherever that ran (call with _lock held; the caller clones the outputs,
    then calls _replayed)."""
    dev = g.inputs[0].device
    stream = torch.cuda.current_stream(dev)
    ev = _done.get(dev.index)
    if ev is not None:
        stream.wait_event(ev)
    fill()
    g.graph.replay()


def _replayed(g: "_Graph") -> None:
    """Mark the end of g's replay and its outputs' clones on the current stream (see _replay)."""
    dev = g.inputs[0].device
    ev = _done.get(dev.index)
    if ev is None:
        ev = _done[dev.index] = torch.cuda.Event()
    ev.record(torch.cuda.current_stream(dev))


def _track(device: torch.device, graph: torch.cuda.CUDAGraph) -> None:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    _live.setdefault(idx, weakref.WeakSet()).add(graph)


#: Python values diffusers' forwards read (a branch or a factor a graph bakes in) that users set between
#: calls, as instance attributes: FreeU's on the UNet's up blocks (enable_freeu sets them, disable_freeu
#: sets them to None), a VAE's slicing and tiling (enable_slicing, enable_tiling and its tile sizes)
_SETTINGS = ("s1", "s2", "b1", "b2", "use_slicing", "use_tiling", "tile_sample_min_size", "tile_latent_min_size",
             "tile_overlap_factor")


def _processor_state(p) -> Any:
    """An attention processor as a graph bakes it in: the object, and the values of its `scale` where it
    has one (a list written in place: copied)."""
    scale = getattr(p, "__dict__", {}).get("scale")
    return p if scale is None else (p, tuple(scale) if isinstance(scale, list) else scale)


def _has_settings(m: nn.Module) -> bool:
    return type(m).__name__.endswith("UpBlock2D") or "use_tiling" in m.__dict__


def graphs_enabled() -> bool:
    return os.environ.get("SHAPETUNE_GRAPHS", "1").strip().lower() not in ("0", "false", "no", "off")


def _peft_state(m: nn.Module) -> tuple:
    """A PEFT layer's adapter state as a key. Float scalings rounded to 1e-12: diffusers' LoRA `scale`
    (cross_attention_kwargs) multiplies each scaling and divides it back inside the forward, which can move it
    by an ulp (0.75 * 0.7 / 0.7 = 0.7499999999999999); keyed exactly, every call after such a forward would
    capture a graph of its own. (The graph's launches keep the scaling of its capture: 1e-16 relative.) A
    scaling held in a CPU tensor (PEFT's compiled hotswap makes them tensors on the weights' device, which stay
    behind when the model moves) is read by the host when a kernel is launched, so a replay keeps the captured
    value: keyed by its value, which a hotswap's in-place fill changes. A CUDA tensor is read from memory by
    every replay."""
    scaling = getattr(m, "scaling", None)
    return (tuple(getattr(m, "active_adapters", ()) or ()), bool(getattr(m, "merged", False)),
            bool(getattr(m, "disable_adapters", False)), tuple(getattr(m, "merged_adapters", ()) or ()),
            tuple(sorted((k, _scaling_key(v)) for k, v in scaling.items())) if isinstance(scaling, dict) else None)


def _scaling_key(v):
    if type(v) is float:
        return round(v, 12)
    if isinstance(v, torch.Tensor) and v.device.type == "cpu" and v.numel() == 1:
        return ("cpu", round(v.item(), 12))
    return v


def _is_peft_layer(m: nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        return False
    return isinstance(m, BaseTunerLayer)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list  # static input tensors, in the order of the call's tensor leaves
    out_leaves: list  # the graph's outputs (tensors in the pool) and plain values
    out_spec: Any


@dataclass(frozen=True)
class _Eager:
    """GraphedCall._graphed's answer for a call that runs eagerly: the cause it is counted under."""

    cause: str


class GraphedCall:
    """`module.<method>` replaced by CUDA graphs per call signature (see the module docstring).

    module : the nn.Module whose parameters, buffers and tree the graphs depend on
    method : the method to wrap ("forward", or e.g. "decode"); installed as an instance attribute
    max_graphs : LRU bound on the graphs kept (SHAPETUNE_MAX_GRAPHS, default 16)
    warmup : eager runs before a capture (resolve the registry, load kernels, init cuBLAS workspaces)
    rewarmup : eager runs before capturing a signature whose tensors match a graph already captured
        under another PEFT adapter state (a LoRA switch): its shapes' kernels, plans and workspaces are
        resolved, so the capture needs fewer (default 0). Should that capture fail, it is tried once more
        after `warmup` runs (counted `rewarmup_retry`) before the signature is given up.
    repatch : called with the module when its tree changed, before re-capturing (e.g. kernels.patch)
    unused_kwargs : keyword arguments the method accepts but never reads (e.g. AutoencoderKL.decode's
        `generator`, which diffusers' pipelines pass a new torch.Generator each call): dropped before the
        signature is taken and the method called, so they neither make a new graph per call nor reach it
    pad_batch : a call whose batch has no graph replays the smallest captured graph of a larger batch
        that matches it in everything else (counted `padded`), instead of capturing a new one: the rows
        past the call's batch are filled with copies of its last row and the outputs sliced back. Only for
        modules that compute each sample on its own (SD's UNet, VAE and CLIP text encoders: convs,
        per-sample GroupNorm, attention within a sample; not BatchNorm in training). The real rows' values
        are the same function of the same inputs, but not bit-identical to an unpadded run: vendor GEMMs
        and convs pick their algorithm by problem size (differences at fp16 rounding level). Off by
        default. The batch is dim 0 of the call's first tensor; every tensor whose dim 0 equals it is
        padded and every output whose dim 0 equals the graph's batch is sliced.
    """

    def __init__(self, module: nn.Module, method: str = "forward", max_graphs: int | None = None, warmup: int = 2,
                 repatch: Callable[[nn.Module], Any] | None = None, unused_kwargs: tuple[str, ...] = (),
                 pad_batch: bool = False, rewarmup: int = 0):
        self.unused_kwargs = tuple(unused_kwargs)
        self.pad_batch = pad_batch
        _install_registration_hooks()
        self.module, self.method = module, method
        self.max_graphs = max_graphs or int(os.environ.get("SHAPETUNE_MAX_GRAPHS", "16"))
        self.warmup = warmup
        self.rewarmup = min(rewarmup, warmup)
        self.repatch = repatch
        self.inner = getattr(module, method)  # the bound (patched) method the graphs capture
        self.graphs: OrderedDict[tuple, _Graph | str] = OrderedDict()  # a str: why it was not captured
        self.stats: Counter = Counter()
        self.capture_s: list[float] = []  # wall seconds of each capture (warm-up runs included)
        # host seconds of each capture's parts: the warm-up runs (their launches; the GPU may still run
        # them) and the captured run with capture end and instantiation (what a LoRA switch pays)
        self.capture_parts: list[dict[str, float]] = []
        self._epoch = -1
        self._foreign = False  # the tree holds hooks below its root (packing.hooked)
        self._training = False  # a module of the tree draws per call in training mode (_draws_in_training)
        self._tree: tuple = ()
        self._tensors: list[torch.Tensor] = []
        self._peft: list[nn.Module] = []
        self._attns: list[nn.Module] = []  # modules with an attention processor (diffusers Attention)
        self._settable: list[dict] = []  # the __dict__ of each module with _SETTINGS (up blocks, VAEs)
        self._baked: tuple | None = None  # what the current graphs were captured against
        self._had_instance_attr = method in module.__dict__
        self._previous = module.__dict__.get(method)
        setattr(module, method, self)

    def uninstall(self) -> None:
        """Put the method back (the one that was there before; also inside a library's wrapper put on top of
        this one, e.g. accelerate's model offload) and free the graphs."""
        packing.replace_method(self.module, self.method, lambda f: f is self,
                               self._previous if self._had_instance_attr else None)
        self.graphs.clear()

    # -- what a graph depends on -------------------------------------------------------------------
    def _refresh_tree(self) -> None:
        if self._epoch == _tree_epoch[0]:
            return
        # the modules themselves, compared by identity: a module's id could come back as a new module's once
        # it is freed (`del m.sub` then a new one assigned), and the change would not be seen
        mods = list(self.module.modules())
        tree = tuple(mods)
        if tree != self._tree and self._tree and self.repatch is not None:
            self.repatch(self.module)
            mods = list(self.module.modules())
            tree = tuple(mods)
        self._epoch = _tree_epoch[0]
        # hooks below the root (the root's own run around the graph, not in it)
        self._foreign = packing.foreign_hooks(mods[0]) or any(map(packing.hooked, mods[1:]))
        self._training = any(map(_draws_in_training, mods))
        if tree != self._tree:
            self._tree = tree
            self._tensors = list(self.module.parameters()) + list(self.module.buffers())
            self._peft = [m for m in mods if _is_peft_layer(m)]
            self._attns = [m for m in mods if callable(getattr(type(m), "set_processor", None))]
            self._settable = [m.__dict__ for m in mods if _has_settings(m)]

    def _adapter_state(self) -> tuple:
        """PEFT adapter state (active adapters, scales, merged, disabled): Python values the forward reads,
        so part of each graph's key: switching between LoRAs replays the graph already captured for each."""
        self._refresh_tree()
        return tuple(_peft_state(m) for m in self._peft)

    def _state(self) -> tuple:
        from .registry import get_registry

        self._refresh_tree()
        # data pointers: a map over the unbound method, 49 against 113 us a call for SD 1.5's 686 tensors
        # (2-core CPU host). The registry itself, not its id: held while graphs baked against it live, its
        # loaded kernels stay loaded (a graph launches them by handle), and a new registry at a freed one's
        # address is no match
        return (self._tree, list(map(torch.Tensor.data_ptr, self._tensors)), get_registry(),
                tuple(_processor_state(a.processor) for a in self._attns),
                tuple(d.get(k) for d in self._settable for k in _SETTINGS))

    def _check_baked(self) -> None:
        """Drop the graphs where what they were baked against changed (counted `invalidated`). A change of
        storage (`.to()` there and back, a replaced Parameter) also re-patches (`repatch`), which packs
        again the projections it unpacked (kernels/qkv.py, temb.py, ctxkv.py: Parameters re-pointed at rows
        of one storage), before the next capture."""
        state = self._state()
        if state == self._baked:
            return
        if self.graphs:
            self.stats["invalidated"] += 1
            self.graphs.clear()
        if self._baked is not None and self.repatch is not None and state[1] != self._baked[1]:
            self.repatch(self.module)
            state = self._state()
        self._baked = state

    # -- the call ---------------------------------------------------------------------------------------
    def _eager(self, cause: str, args, kwargs):
        self.stats[cause] += 1
        return self.inner(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        for k in self.unused_kwargs:
            kwargs.pop(k, None)
        if torch.compiler.is_compiling():
            return self._eager("compiling", args, kwargs)
        with _lock:
            out = self._graphed(args, kwargs)
        return self._eager(out.cause, args, kwargs) if isinstance(out, _Eager) else out

    def _graphed(self, args, kwargs):
        """The call's outputs from its graph (captured first where new), or _Eager(cause); under _lock."""
        self._refresh_tree()  # a changed tree is re-patched on every path (cheap while nothing was registered)
        if not graphs_enabled():
            return _Eager("disabled")
        if self._foreign or _torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks:
            return _Eager("hooks")  # Python that runs on every call in eager: a replay would skip it
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return _Eager("capturing")
        if torch.is_grad_enabled():
            return _Eager("grad_enabled")
        if self._training:  # dropout and friends draw per call; eval-mode graphs must not serve it
            return _Eager("training")
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        if not tensors:
            return _Eager("no_tensor")
        if any(not t.is_cuda for t in tensors):
            return _Eager("cpu")
        try:
            key = (spec, tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else (type(x), x)
                               for x in leaves), self._adapter_state(),
                   torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None)
            hash(key)
        except TypeError:
            return _Eager("unhashable_arg")
        self._check_baked()
        if key not in self.graphs and self.pad_batch:
            padded = self._padded(key, tensors)
            if padded is not None:
                return self._replay_padded(padded, tensors)
        if key not in self.graphs:
            self.graphs[key] = self._capture(leaves, spec, args, kwargs, self._warmups_for(key))
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
                self.stats["evicted"] += 1
        g = self.graphs[key]
        if isinstance(g, str):
            return _Eager(g)
        self.graphs.move_to_end(key)

        def fill():
            for dst, src in zip(g.inputs, tensors):
                dst.copy_(src)
        _replay(g, fill)
        self.stats["replayed"] += 1
        out = [x.clone() if isinstance(x, torch.Tensor) else x for x in g.out_leaves]
        _replayed(g)
        return pytree.tree_unflatten(out, g.out_spec)

    def _warmups_for(self, key: tuple) -> int:
        """`rewarmup` where a graph of the same signature but another adapter state is alive (captured
        against the current weights and tree: a change of those clears every graph), else `warmup`."""
        if self.rewarmup < self.warmup:
            for k, g in self.graphs.items():
                if not isinstance(g, str) and k[:2] == key[:2] and k[3] == key[3]:
                    return self.rewarmup
        return self.warmup

    # -- batch padding ------------------------------------------------------------------------------
    def _padded(self, key: tuple, tensors: list) -> tuple | None:
        """The key of the smallest captured graph this call fits into by padding its batch, or None."""
        spec, leaves, adapters, autocast = key
        b = tensors[0].shape[0] if tensors[0].dim() else None
        if b is None:
            return None
        best, best_b = None, None
        for k, g in self.graphs.items():
            if isinstance(g, str) or k[0] != spec or k[2:] != (adapters, autocast) or len(k[1]) != len(leaves):
                continue
            gb = None
            for mine, theirs in zip(leaves, k[1]):
                if mine == theirs:
                    continue
                if not (isinstance(mine[0], tuple) and isinstance(theirs[0], tuple)) or mine[1:] != theirs[1:]:
                    break
                (s, t) = mine[0], theirs[0]
                if len(s) != len(t) or not s or s[0] != b or s[1:] != t[1:] or t[0] <= b or gb not in (None, t[0]):
                    break
                gb = t[0]
            else:
                if gb is not None and (best_b is None or gb < best_b):
                    best, best_b = k, gb
        return best

    def _replay_padded(self, key: tuple, tensors: list):
        g = self.graphs[key]
        self.graphs.move_to_end(key)
        b = tensors[0].shape[0]
        gb = next(dst.shape[0] for dst, src in zip(g.inputs, tensors)
                  if src.dim() and src.shape[0] == b and dst.shape[0] != b)  # (_padded chose a graph some input pads to)

        def fill():
            for dst, src in zip(g.inputs, tensors):
                if src.dim() and src.shape[0] == b and dst.shape[0] != b:
                    dst[:b].copy_(src)
                    dst[b:].copy_(src[-1:].expand(dst.shape[0] - b, *src.shape[1:]))
                else:
                    dst.copy_(src)
        _replay(g, fill)
        self.stats["padded"] += 1
        out = [x[:b].clone() if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == gb else
               x.clone() if isinstance(x, torch.Tensor) else x for x in g.out_leaves]
        _replayed(g)
        return pytree.tree_unflatten(out, g.out_spec)

    def _inner_run(self, args, kwargs):
        """One run of the wrapped method inside this call (a warm-up or the capture): a forward scope of
        its own for the packings' per-forward caches (kernels.packing.new_scope), which the module's hooks,
        run once around the whole call, do not open. Without it the capture read the k/v that the last
        warm-up cached (kernels/ctxkv.py, keyed by the static context buffer): an address outside the
        graph's pool, freed when the call ended, replayed with whatever came to live there."""
        packing.new_scope()
        return self.inner(*args, **kwargs)

    def _capture(self, leaves: list, spec, args, kwargs, warmups: int | None = None) -> _Graph | str:
        """Warm up, then capture one graph of this signature; or the cause it cannot be."""
        import time

        warmups = self.warmup if warmups is None else warmups

        t0 = time.perf_counter()
        static = []
        s_leaves = []
        for x in leaves:
            if isinstance(x, torch.Tensor):
                fmt = torch.channels_last if x.dim() == 4 and x.is_floating_point() else torch.contiguous_format
                with torch.inference_mode(False):
                    s = torch.empty_like(x, memory_format=fmt).copy_(x)
                static.append(s)
                s_leaves.append(s)
            else:
                s_leaves.append(x)
        s_args, s_kwargs = pytree.tree_unflatten(s_leaves, spec)
        dev = static[0].device
        t0_w = time.perf_counter()
        try:
            with torch.inference_mode(False), torch.no_grad():
                side = capture_stream(dev)
                side.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(side):
                    for _ in range(warmups):
                        self._inner_run(s_args, s_kwargs)
                t1 = time.perf_counter()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=graph_pool(dev), stream=side):
                    out = self._inner_run(s_args, s_kwargs)
                torch.cuda.current_stream(dev).wait_stream(side)
                t2 = time.perf_counter()
            out_leaves, out_spec = pytree.tree_flatten(out)
        except Exception as e:  # a sync or an uncapturable op inside the forward: eager from now on
            torch.cuda.synchronize(dev)
            if warmups < self.warmup:  # maybe something the skipped warm-ups would have set up: once more
                self.stats["rewarmup_retry"] += 1
                return self._capture(leaves, spec, args, kwargs, self.warmup)
            log.warning("shapetune: %s.%s not captured (%s: %s); it runs eagerly for this signature",
                        type(self.module).__name__, self.method, type(e).__name__, (str(e).splitlines() or [""])[0][:200])
            return "capture_failed"
        if any(not isinstance(x, (torch.Tensor, *_PLAIN)) for x in out_leaves):
            return "opaque_output"
        _track(dev, graph)
        self.stats["captured"] += 1
        self.capture_s.append(time.perf_counter() - t0)
        self.capture_parts.append({"inputs_s": t0_w - t0, "warmup_s": t1 - t0_w, "capture_s": t2 - t1,
                                   "warmups": warmups})
        return _Graph(graph, static, out_leaves, out_spec)
