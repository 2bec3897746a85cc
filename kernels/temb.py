"""One GEMM for a UNet's time-embedding projections: every ResnetBlock2D projects the same SiLU(temb)
(diffusers: `time_emb_proj(nonlinearity(temb))`, [B, 1280] -> [B, C_i]), so the first resnet of a
forward computes all of them at once, linear(silu(temb), W_all, b_all) -> [B, sum C_i], and each resnet
takes its columns, contiguous (members are stacked by width; each run of equal widths is laid out
member-major by one copy, Group.split: a tuned epilogue takes the shift as it is). SD 1.5: 22 SiLUs and 22 launch-bound [2 x 1280] GEMMs become one of each.

    pack(unet)                     # at patch time: each time_emb_proj's weight a view of its rows of W_all
    shift = projected(resnet, temb)    # in the patched ResnetBlock2D forward: [B, C] or None

As kernels/qkv.py: the Parameters are re-pointed at rows of one storage (same objects, same values), so
in-place writes reach the packed GEMM, and nothing derived from a weight is kept. What is cached is the
GEMM's output within one forward of the packed model, and only there: hooks on the model open it
before its forward and drop it after (also when the forward raises), and it is keyed by the temb tensor
itself (a weak reference, and its version counter), so a resnet called outside the model's forward,
another temb, or an in-place write to temb computes as diffusers does or computes again. The packed
GEMM runs only if every member still is a plain patched Linear whose weight (and bias) is its rows of
the storage; a member's own call checks it again before taking its columns. Anything else (a replaced
Parameter, a LoRA layer around a projection, autograd with trainable projections, torch.compile
tracing) returns None and the resnet projects as diffusers does. Which resnets join is
shapetune/fusions.py's `temb_groups`, the rule extraction records the packed GEMM by.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from shapetune.fusions import temb_groups

from .custom_op import call_op
from .packing import holds_rows, own_storage, plain_linear, stack_rows

_ATTR = "_shapetune_temb"  # on each member resnet: (its Group, its column offset, its width)


@dataclass(eq=False)
class Group:
    weight: torch.Tensor  # [sum C, K]: the members' time_emb_proj weights, in member order
    bias: torch.Tensor | None
    members: list  # weak references to the member resnets
    offsets: list[int]
    runs: list[tuple[int, int, int]] = field(default_factory=list)  # (first column, members, width) per run
    key: tuple | None = None  # (weakref to the temb it was computed for, temb's version)
    out: dict[int, torch.Tensor] | None = field(default=None, repr=False)  # column offset -> member's [B, C]
    active: bool = False  # inside a forward of the packed model
    hooks: list = field(default_factory=list)

    def open(self, *_args) -> None:
        self.active, self.key, self.out = True, None, None

    def close(self, *_args) -> None:
        self.active, self.key, self.out = False, None, None

    def split(self, y: torch.Tensor) -> dict[int, torch.Tensor]:
        """The packed GEMM's [B, sum C] output as each member's contiguous [B, C] (what the shift's consumer,
        a tuned bias_add / conv2d epilogue, takes without a copy): column slices where B is 1; else one
        relayout copy per run of equal-width members ([B, k, C] -> [k, B, C]), not one copy per member
        (SD 1.5 at batch 2: 3 copies instead of 22)."""
        if y.shape[0] == 1:
            return {a + j * n: y[:, a + j * n:a + (j + 1) * n] for a, k, n in self.runs for j in range(k)}
        out = {}
        for a, k, n in self.runs:
            blk = y[:, a:a + k * n].unflatten(1, (k, n)).transpose(0, 1).contiguous()
            out.update({a + j * n: blk[j] for j in range(k)})
        return out


    def member_intact(self, resnet: nn.Module, off: int, n: int) -> bool:
        return holds_rows(resnet.time_emb_proj, self.weight, self.bias, off, n)

    def remove_hooks(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        self.close()

    def intact(self) -> bool:
        for ref, off in zip(self.members, self.offsets):
            r = ref()
            if r is None or r.__dict__.get(_ATTR) is None or not self.member_intact(r, off, r.__dict__[_ATTR][2]):
                return False
        return True


def _runs(widths: list[int]) -> list[tuple[int, int, int]]:
    """(first column, count, width) of each run of equal consecutive widths."""
    runs, a = [], 0
    for n in widths:
        if runs and runs[-1][2] == n:
            runs[-1][1] += 1
        else:
            runs.append([a, 1, n])
        a += n
    return [tuple(r) for r in runs]


def pack(model: nn.Module) -> int:
    """Pack the time-embedding projections of each group of `model`'s resnets (fusions.temb_groups),
    served within `model`'s forward; returns how many resnets this call packed (0: already packed)."""
    mods = dict(model.named_modules())
    packed = 0
    groups = temb_groups(model, plain_linear)
    members = {n for g in groups for n in g}
    for name, m in mods.items():  # a resnet that left its group (e.g. a LoRA around its projection)
        if name not in members and _ATTR in m.__dict__:
            m.__dict__[_ATTR][0].remove_hooks()
            del m.__dict__[_ATTR]
    for names in groups:
        resnets = [mods[n] for n in names]
        g0 = resnets[0].__dict__.get(_ATTR)
        if g0 is not None and all(r.__dict__.get(_ATTR, (None,))[0] is g0[0] for r in resnets) and g0[0].intact() \
                and len(g0[0].members) == len(resnets):
            continue
        resnets.sort(key=lambda r: r.time_emb_proj.weight.shape[0])  # equal widths adjacent: fewer runs
        projs = [r.time_emb_proj for r in resnets]
        w, b, offsets = stack_rows(projs)
        if g0 is not None:
            g0[0].remove_hooks()
        group = Group(w, b, [weakref.ref(r) for r in resnets], offsets,
                      _runs([p.weight.shape[0] for p in projs]))
        group.hooks = [model.register_forward_pre_hook(group.open),
                       model.register_forward_hook(group.close, always_call=True)]
        for r, o, p in zip(resnets, offsets, projs):
            r.__dict__[_ATTR] = (group, o, p.weight.shape[0])
        packed += len(resnets)
    return packed


def unpack(resnet: nn.Module) -> None:
    """Give this resnet's time_emb_proj its own storage again and forget the packing (the group's
    hooks on the model go with its first member unpacked)."""
    entry = resnet.__dict__.pop(_ATTR, None)
    if entry is None:
        return
    group = entry[0]
    group.remove_hooks()
    own_storage(resnet.time_emb_proj, group.weight, group.bias)


def _version(t: torch.Tensor) -> int | None:
    """t's version counter; None for an inference tensor (made under torch.inference_mode), which has none:
    it is keyed by identity alone, within the one forward the cache lives in (diffusers' UNets never write
    temb in place)."""
    return None if t.is_inference() else t._version


def projected(resnet: nn.Module, temb: torch.Tensor) -> torch.Tensor | None:
    """time_emb_proj(silu(temb)) of this resnet, [B, C], from the group's one GEMM; None where the packing
    does not hold (the caller projects as diffusers does)."""
    entry = resnet.__dict__.get(_ATTR)
    if entry is None or temb is None or torch.compiler.is_compiling():
        return None
    group, off, n = entry
    if not group.active:
        return None
    if torch.is_grad_enabled() and (temb.requires_grad or any(
            p.requires_grad for p in resnet.time_emb_proj.parameters())):
        return None
    key = group.key
    if key is None or key[0]() is not temb or key[1] != _version(temb):
        if not group.intact() or temb.dim() != 2 or temb.dtype != group.weight.dtype \
                or temb.shape[1] != group.weight.shape[1] or temb.device != group.weight.device:
            return None
        group.out = group.split(call_op("linear", F.silu(temb), group.weight, group.bias))
        group.key = (weakref.ref(temb), _version(temb))
    elif not group.member_intact(resnet, off, n):
        return None
    return group.out[off]
