"""The one dispatch preamble every shapetune op runs: call signature -> registry -> the tuned kernel,
or None with the reason counted in `fallback_summary()`.

An op keeps only its checks, its signature and workload, its argument preparation and its torch
fallback; the checks and the resolution run once per call-metadata key (`plan`):

    def _plan(x, weight, bias):                      # on a key's first call only
        _check(x, weight, bias)
        sig = ("linear", m, n, k, x.dtype, bias is not None, x.device.type)
        return resolve("linear", sig, lambda: linear_workload(...), x.dtype, x.is_cuda, empty=m == 0) + ((m, n, k),)

    _, res, (m, n, k) = plan(("linear", x.shape, x.dtype, x.device, weight.shape, ...), _plan, x, weight, bias)
    if res is None:
        return torch.nn.functional.linear(x, weight, bias)
    call_on_current_stream(res.fn, args, x.is_cuda)

Counted causes, checked in this order before any lookup: "unsupported_dtype" (x.dtype not in
SUPPORTED), "empty", "no_affine" (norms without weight or bias), "other_device" (x on the CPU
under a GPU registry or the reverse). After the lookup the registry counts "tuned" or its
Resolution's cause (not_tuned, vendor_faster, ...).

After a key's first call, `plan` is one dict lookup and one count: no checks, no signature, no
registry lookup (tests/kernels/test_host_plans.py counts the Python calls).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from shapetune.ops import SUPPORTED  # torch dtype -> workload dtype served (re-exported to the ops)
from shapetune.workload import Workload

from . import registry as _registry
from .registry import Resolution, get_registry


def resolve(op: str, sig: tuple, make_workload: Callable[[], Workload], dtype: torch.dtype, is_gpu: bool,
            empty: bool = False, no_affine: bool = False) -> tuple[tuple[str, str], Optional[Resolution]]:
    """((op, outcome) to count the call under, the Resolution with a kernel (`.fn`) or None: take
    torch's path). Counting is the caller's (`plan` counts on every call).

    op : the name counted under, (op, cause)
    sig : the call signature, hashable, the registry's cache key (dtype and device type included)
    make_workload : builds the Workload, called once per new sig (dtype is then in SUPPORTED)
    dtype, is_gpu : the op's leading tensor's dtype and `is_cuda` ("unsupported_dtype", "other_device")
    empty, no_affine : the op's own early causes
    """
    reg = get_registry()
    cause = ("unsupported_dtype" if dtype not in SUPPORTED else "empty" if empty else "no_affine" if no_affine
             else "other_device" if is_gpu != reg.target.is_gpu else None)
    if cause is not None:
        return (op, cause), None
    res = reg.lookup(sig, make_workload)
    return ((op, "tuned"), res) if res.fn is not None else ((op, res.cause), None)


def plan(key: tuple, make: Callable[..., tuple], *args) -> tuple:
    """The plan of an op call: `make(*args)` on the registry's first call with this `key`, then one
    dict lookup; its first element, the (op, outcome) pair, is counted on every call.

    key : everything the op's checks and signature read: the op's name, its tensors' shapes, dtypes
        and devices (None for an absent one), its other arguments. Never a tensor's values.
    make : runs the op's checks (raising on bad input: nothing is stored) and `resolve`; returns
        ((op, outcome), Resolution or None, what else the call needs that the key determines)

    Plans live in the registry (`Registry.plans`), so a registry swapped in (set_registry), cleared
    or prebuilt starts without any. A plan holds no tensor: weights are read on every call.
    """
    reg = _registry._registry or get_registry()
    p = reg.plans.get(key)
    if p is None:
        p = reg.plans[key] = make(*args)
    reg.calls[p[0]] += 1
    return p


def planned(key: tuple, make: Callable[..., tuple], *args) -> tuple:
    """The plan of an op call (`plan`'s key and make) without counting the call: for a caller that
    chooses between paths by it (kernels.patch fuses an op's neighbours into it only where it is tuned)."""
    reg = _registry._registry or get_registry()
    p = reg.plans.get(key)
    if p is None:
        p = reg.plans[key] = make(*args)
    return p


def served(key: tuple, make: Callable[..., tuple], *args) -> bool:
    """Whether the plan of an op call runs a tuned kernel (as `planned`, written out: a block's host path
    asks this per fusion). Not counted where it does (the op's own call counts it); counted under the
    plan's (op, cause) where not: the caller runs the unfused path instead."""
    reg = _registry._registry or get_registry()
    p = reg.plans.get(key)
    if p is None:
        p = reg.plans[key] = make(*args)
    if p[1] is None:
        reg.calls[p[0]] += 1
    return p[1] is not None


def count(op: str, what: str) -> None:
    """Count an event next to the call's outcome (a relayout copy), under (op, what)."""
    get_registry().calls[(op, what)] += 1


def meta(t: Optional[torch.Tensor]) -> Optional[tuple]:
    """What a plan key holds of an optional tensor argument: shape, dtype, device (None: absent).
    (The ops' hot paths write the expression out: a Python call per argument is measurable.)"""
    return None if t is None else (t.shape, t.dtype, t.device)
