"""Verification: a candidate's output against the float64 PyTorch reference.

Tolerances per output dtype (written down, and why):
  float16  elementwise |out - ref| <= 1e-2 + 1e-2*|ref| and ‖out - ref‖/‖ref‖ <= 5e-3.
           fp16 keeps 11 significant bits (unit roundoff 4.9e-4); with fp32 accumulation the
           only sizable error is the final rounding of y, ~2.4e-4 relative. The elementwise
           bound catches a single wrong row or tile that a norm over 10^6 elements would hide.
  bfloat16 8 significant bits (3.9e-3 roundoff): 4e-2 elementwise, 2e-2 in norm.
  float32  accumulation order differs from the reference: ~sqrt(k)*6e-8; 1e-4 / 1e-5.
Any NaN or Inf fails (outputs are poisoned with NaN before the run, so an unwritten element fails).
This checks the output only; scheduler.runner also computes the reference before the call and
requires every input to come back bit-identical (a kernel writing into its inputs is wrong_result).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOLERANCES = {  # dtype: (atol, rtol, max relative L2 error)
    "float16": (1e-2, 1e-2, 5e-3),
    "bfloat16": (4e-2, 4e-2, 2e-2),
    "float32": (1e-4, 1e-4, 1e-5),
    "float64": (1e-10, 1e-10, 1e-12),
}


@dataclass(frozen=True)
class Check:
    ok: bool
    rel_err: float
    reason: str = ""


def check_output(out: torch.Tensor, ref: torch.Tensor, dtype: str) -> Check:
    atol, rtol, max_rel = TOLERANCES[dtype]
    o = out.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
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
