"""The one dispatch preamble every shapetune op runs: call signature -> registry -> the tuned kernel,
or None with the reason counted in `fallback_summary()`.

An op keeps only its checks, its signature and workload, its argument preparation and its torch
fallback:

    is_gpu = x.is_cuda
    res = tuned("linear", sig, lambda: linear_workload(...), x.dtype, is_gpu, empty=m == 0)
    if res is None:
        return torch.nn.functional.linear(x, weight, bias)
    call_on_current_stream(res.fn, args, is_gpu)

Counted causes, checked in this order before any lookup: "unsupported_dtype" (x.dtype not in
SUPPORTED), "empty", "no_affine" (norms without weight or bias), "other_device" (x on the CPU
under a GPU registry or the reverse). After the lookup the registry counts "tuned" or its
Resolution's cause (not_tuned, vendor_faster, ...). The cached path costs one dict lookup.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from shapetune.ops import SUPPORTED  # torch dtype -> workload dtype served (re-exported to the ops)
from shapetune.workload import Workload

from .registry import Resolution, get_registry


def tuned(op: str, sig: tuple, make_workload: Callable[[], Workload], dtype: torch.dtype, is_gpu: bool,
          empty: bool = False, no_affine: bool = False) -> Optional[Resolution]:
    """The Resolution with a kernel (`.fn`) for this call, or None: take torch's path.

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
        reg.calls[(op, cause)] += 1
        return None
    res = reg.lookup(sig, make_workload)
    reg.count(op, res)
    return res if res.fn is not None else None


def count(op: str, what: str) -> None:
    """Count an event next to the call's outcome (a relayout copy), under (op, what)."""
    get_registry().calls[(op, what)] += 1
