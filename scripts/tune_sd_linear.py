"""Tune every linear (GEMM) workload of the SD 1.5 UNet (batch 2, 512x512) on this machine's GPU.

    python scripts/tune_sd_linear.py --trials 32 --db tuned.db --export tuning_logs/sm90_linear.jsonl.xz

Prints, per workload, the best verified TVM kernel, TVM's dlight default and the vendor path
(cuBLAS through torch), all measured in this run, and writes the summary as JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scheduler import jobs  # noqa: E402
from scheduler.extract import sd15_linear_workloads  # noqa: E402


def main():
    a = jobs.add_job_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), "sd_linear.db").parse_args()
    ops = sd15_linear_workloads(batch=2, height=512, width=512)
    jobs.run(jobs.select([op.workload for op in ops], a), a, vendor="torch.nn.functional.linear (cuBLAS)",
             calls={op.workload: op.calls for op in ops}, flops=lambda w: w.flops)


if __name__ == "__main__":
    main()
