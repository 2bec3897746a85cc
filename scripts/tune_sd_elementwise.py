"""Tune the elementwise passes of the SD 1.5 UNet (GEGLU's gate, conv bias + residual / time
embedding) over a grid of shapes, as shape buckets, on this machine's GPU.

    python scripts/tune_sd_elementwise.py --shapes 1x512,2x512,4x512,2x768,2x512x768 --trials 16 \
        --db sd_elementwise.db --export tuning_logs/sm90_h200_sd15_elementwise.jsonl.xz

Each shape is BATCHxSIZE or BATCHxHEIGHTxWIDTH (pixels); the workloads of every shape are bucketed
(shapetune/buckets.py: gelu_gate by rows, bias_add by batch and positions) and each bucket is tuned
once, the most called first. Prints, per bucket, the best verified TVM kernel against torch's kernels for the same pass
(chunk + F.gelu + product; the conv's broadcast bias add + the residual / time-embedding add), both
measured in this run. `--list` prints the buckets and exits (no GPU needed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scheduler import jobs  # noqa: E402
from scheduler.extract import sd15_elementwise_workloads  # noqa: E402


def main():
    ap = jobs.add_job_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), "sd_elementwise.db")
    ap.add_argument("--shapes", default="2x512", help="comma-separated BATCHxSIZE[xWIDTH] in pixels")
    ap.add_argument("--list", action="store_true", help="print the buckets and exit")
    a = ap.parse_args()
    calls = jobs.bucketed_calls(sd15_elementwise_workloads, jobs.parse_shapes(a.shapes))
    workloads = jobs.select(list(calls), a)
    if a.list:
        for w in workloads:
            print(f"{w.name:60s} calls {calls[w]:3d}")
        return
    jobs.run(workloads, a, vendor="torch: chunk + F.gelu + mul / conv bias add + residual|temb add",
             calls=calls)


if __name__ == "__main__":
    main()
