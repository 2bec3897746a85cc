"""Tune every GroupNorm / LayerNorm workload of the SD 1.5 UNet (batch 2, 512x512) on this GPU.

    python scripts/tune_sd_norms.py --trials 32 --db sd_norms.db --json sd_norms.json \
        --export tuning_logs/sm90_norms.jsonl.xz

`--shapes 1x512,2x512,...` tunes the shape buckets (shapetune/buckets.py: group_norm by batch and
positions, layer_norm by rows) of every listed shape's workloads instead, the most called first.
GroupNorms followed by SiLU in the model (ResnetBlock2D norm1/norm2, conv_norm_out) are tuned with
the SiLU fused, and each ResnetBlock2D's norm2 with the shift step (conv1's bias and the time embedding
added as it reads; torch: the two adds, then the norm). Prints, per workload, the best verified TVM
kernel, TVM's dlight default and torch (F.group_norm (+ F.silu) on a channels_last NCHW tensor /
F.layer_norm), all measured in this run, and the achieved bandwidth: bytes of x read + y written over
the time, as a fraction of a device-to-device copy of the same bytes (torch.empty_like(x).copy_(x))
timed the same way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scheduler import jobs  # noqa: E402
from scheduler.extract import sd15_norm_workloads  # noqa: E402


def bandwidth(rep) -> dict:
    """Achieved bandwidth of the tuned kernel and of torch, as fractions of a device copy moving the
    op's minimal bytes (x read once + y written once), timed like a kernel in this run."""
    from scheduler.runner import COPY, RunOptions, measure_one

    w = rep.workload
    r = measure_one(w.to_json(), rep.vendor.target.to_json(), COPY, RunOptions(), 0)
    cp = r["latency"]["median_us"]
    moved = 2 * 2 * (w.dim["n"] * w.dim["hw"] * w.dim["c"] if w.op == "group_norm" else w.dim["m"] * w.dim["c"])
    best_us = rep.best.latency.median_us if rep.best else None
    return {"copy_us": cp, "copy_gbps": moved / cp / 1e3,
            "best_gbps": moved / best_us / 1e3 if best_us else None,
            "vendor_gbps": moved / rep.vendor.latency.median_us / 1e3,
            "best_frac_of_copy": cp / best_us if best_us else None,
            "vendor_frac_of_copy": cp / rep.vendor.latency.median_us}


def main():
    ap = jobs.add_job_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), "sd_norms.db")
    ap.add_argument("--no-silu", action="store_true",
                    help="do not fuse the SiLU that follows GroupNorms (nor the resnets' shift step)")
    ap.add_argument("--shapes", default="",
                    help="BATCHxSIZE[xWIDTH] in pixels, comma-separated: tune the shape buckets of every "
                         "shape's workloads (most called first) instead of batch 2, 512x512's exact ones")
    a = ap.parse_args()
    if a.shapes:
        calls = jobs.bucketed_calls(lambda **kw: sd15_norm_workloads(fuse_silu=not a.no_silu, **kw),
                                    jobs.parse_shapes(a.shapes))
        workloads = jobs.select(list(calls), a)
    else:
        ops = sd15_norm_workloads(fuse_silu=not a.no_silu)
        calls = {op.workload: op.calls for op in ops}
        workloads = jobs.select([op.workload for op in ops], a)
    rows = jobs.run(workloads, a, vendor="F.group_norm (+F.silu) on channels_last / F.layer_norm", calls=calls,
                    extra=bandwidth)
    f = lambda v: f"{v:6.2f}" if v else "   n/a"  # noqa: E731
    print(f"\n{'workload':52s} {'tvm/copy':>8s} {'torch/copy':>10s}  (fraction of copy bandwidth)")
    for r in rows:
        print(f"{r['workload']:52s} {f(r['best_frac_of_copy']):>8s} {f(r['vendor_frac_of_copy']):>10s}")


if __name__ == "__main__":
    main()
