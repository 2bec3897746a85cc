"""Verification: a candidate's output against the float64 PyTorch reference.

Tolerances per output dtype (written down, and why):
  float16  elementwise |out - ref| <= 1e-2 + 1e-2*|ref| and ‖out - ref‖/‖ref‖ <= 5e-3.
           fp16 keeps 11 significant bits (unit roundoff 4.9e-4); with fp32 accumulation the
           only sizable error is the final rounding of y, ~2.4e-4 relative. The elementwise
           bound catches a single wrong row or tile that a norm over 10^6 elements would hide.
  bfloat16 8 significant bits (3.9e-3 roundoff): 4e-2 elementwise, 2e-2 in norm.
  float32  accumulation order differs from the reference: ~sqrt(k)*6e-8; 1e-4 / 1e-5.
Any NaN or Inf fails (outputs are poisoned with NaN before the run, so an unwritten element fails).
The procedure (`verify`, what scheduler.runner runs before timing any candidate, vendor paths
included): on fresh random inputs per trial (never zeros), the float64 reference is computed before
the call (a kernel writing into its inputs cannot move it); the output is poisoned with NaN; every
input must come back bit-identical (`first_modified`: a kernel writing into its inputs is
wrong_result); then `check_output`. A bucket kernel is checked at its bounds and an odd size
(shapetune.buckets.verification_members), at least one trial each.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from shapetune.buckets import verification_members
from shapetune.workload import Workload

TOLERANCES = {  # dtype: (atol, rtol, max relative L2 error)
    "float16": (1e-2, 1e-2, 5e-3),
    "bfloat16": (4e-2, 4e-2, 2e-2),
    "float32": (1e-4, 1e-4, 1e-5),
    "float64": (1e-10, 1e-10, 1e-12),
}


@dataclass(frozen=True)
class Check:
    ok: bool
    rel_err: float | None
    reason: str = ""


def check_output(out: torch.Tensor, ref: torch.Tensor, dtype: str) -> Check:
    """out against the float64 reference, in float64 on the reference's device (where the op's
    reference ran: the GPU in a tuning run; only the verdict's scalars come back)."""
    atol, rtol, max_rel = TOLERANCES[dtype]
    r = ref.detach().to(torch.float64)
    o = out.detach().to(r.device, torch.float64)
    if o.shape != r.shape:
        return Check(False, float("inf"), f"shape {tuple(o.shape)} != reference {tuple(r.shape)}")
    finite = torch.isfinite(o)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        return Check(False, float("nan"), f"{bad} of {o.numel()} outputs are NaN/Inf (unwritten or overflow)")
    rel = float(torch.linalg.vector_norm(o - r) / torch.linalg.vector_norm(r).clamp_min(1e-30))
    err = (o - r).abs()
    viol = err > atol + rtol * r.abs()
    if bool(viol.any()):
        idx = tuple(int(i) for i in torch.nonzero(viol)[0])
        return Check(False, rel, f"{int(viol.sum())} elements out of tolerance, first at {idx}: "
                                 f"{float(o[idx]):.6g} vs {float(r[idx]):.6g}")
    if rel > max_rel:
        return Check(False, rel, f"relative L2 error {rel:.3g} > {max_rel:g}")
    return Check(True, rel)


# -- the procedure ------------------------------------------------------------------------------------
_SAME_WIDTH_INT = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


def first_modified(after: list, before: list) -> tuple[int, int] | None:
    """(index, number of changed elements) of the first tensor of `after` that differs from its
    clone in `before` bit for bit (integer views: NaN equals NaN, -0.0 differs from +0.0), None if
    none does."""
    for i, (a, b) in enumerate(zip(after, before)):
        as_int = getattr(torch, _SAME_WIDTH_INT[a.element_size()])
        changed = int((a.view(as_int) != b.view(as_int)).sum())
        if changed:
            return i, changed
    return None


def _input_names(od, w: Workload) -> list[str]:
    """The kernel's parameter names (its PrimFunc's buffers), inputs first."""
    return [p.name for p in od.prim_func(w).params]


def verify(od, w: Workload, prepare, call, restore, dev, gen: torch.Generator, trials: int,
           rng: random.Random, is_gpu: bool) -> Check:
    """Run one path (a kernel or a vendor path: prepare(inputs) -> its operands, call(operands +
    [out]) -> its output, restore(output) -> the op's layout) against od.reference on `trials` fresh
    inputs (at least one per bucket member checked). ok with the worst relative L2 error, or the
    first failure with its reason (and the member it failed at, for a bucket)."""
    members = verification_members(w, rng) if w.dynamic else [w]
    worst = 0.0
    for trial in range(max(trials, len(members))):
        mw = members[trial % len(members)]
        ins = od.inputs(mw, dev, gen)
        ref = od.reference(mw, ins)  # before the call: a kernel writing into ins cannot move it
        args = prepare(ins) + [od.output(mw, dev).fill_(float("nan"))]
        before = [t.clone() for t in args[:-1]]
        out = call(args)
        if is_gpu:
            torch.cuda.synchronize()
        where = f" at {mw.name}" if w.dynamic else ""
        clobbered = first_modified(args[:-1], before)
        if clobbered is not None:
            i, changed = clobbered
            return Check(False, None, f"input {i} ({_input_names(od, mw)[i]}) modified by the kernel: "
                                      f"{changed} of {args[i].numel()} elements changed{where}")
        chk = check_output(restore(out), ref, w.dtype)
        if not chk.ok:
            return Check(False, chk.rel_err, chk.reason + where)
        worst = max(worst, chk.rel_err)
    return Check(True, worst)
