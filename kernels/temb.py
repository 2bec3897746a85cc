"""One GEMM for a UNet's time-embedding projections: every ResnetBlock2D projects the same SiLU(temb)
(diffusers: `time_emb_proj(nonlinearity(temb))`, [B, 1280] -> [B, C_i]), so the first resnet of a
forward computes all of them at once, linear(silu(temb), W_all, b_all) -> [B, sum C_i], and each resnet
takes its columns, contiguous (members are stacked by width; each run of equal widths is laid out
member-major by one copy, Group.split: a tuned epilogue takes the shift as it is). SD 1.5: 22 SiLUs
and 22 launch-bound [2 x 1280] GEMMs become one of each.

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
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from shapetune.fusions import temb_groups

from .custom_op import call_op
from .packing import ModelGroup, holds_rows, hooked, own_storage, plain_linear, regroup, stack_rows

_ATTR = "_shapetune_temb"  # on each member resnet: (its Group, its column offset, its width)


@dataclass(eq=False)
class Group(ModelGroup):
    attr: ClassVar[str] = _ATTR
    runs: list[tuple[int, int, int]] = field(default_factory=list)  # (first column, members, width) per run

    def member_intact(self, resnet: nn.Module, off: int, n: int) -> bool:
        # the group's GEMM also applies the resnet's SiLU to temb: only while that module is still a SiLU
        # (not one replaced after patch, e.g. by nn.Mish), without hooks, applied to temb (no skip_time_act)
        p, act = resnet.time_emb_proj, resnet.nonlinearity
        return (plain_linear(p) and holds_rows(p, self.weight, self.bias, off, n) and type(act) is nn.SiLU
                and not hooked(act) and not resnet.skip_time_act)

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
    packed = 0
    for resnets, old in regroup(dict(model.named_modules()), temb_groups(model, plain_linear), _ATTR):
        resnets.sort(key=lambda r: r.time_emb_proj.weight.shape[0])  # equal widths adjacent: fewer runs
        projs = [r.time_emb_proj for r in resnets]
        w, b, offsets = stack_rows(projs)
        if old is not None:
            old.remove_hooks()
        group = Group(w, b, [weakref.ref(r) for r in resnets], offsets,
                      runs=_runs([p.weight.shape[0] for p in projs]))
        group.attach(model)
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


def projected(resnet: nn.Module, temb: torch.Tensor) -> torch.Tensor | None:
    """time_emb_proj(silu(temb)) of this resnet, [B, C], from the group's one GEMM; None where the packing
    does not hold (the caller projects as diffusers does)."""
    entry = resnet.__dict__.get(_ATTR)
    if entry is None or temb is None:
        return None
    group, off, _ = entry
    if not group.serve(resnet, temb, 2, resnet.time_emb_proj.parameters(),
                       lambda t: group.split(call_op("linear", F.silu(t), group.weight, group.bias))):
        return None
    return group.out[off]
