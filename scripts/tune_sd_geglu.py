"""Tune every GEGLU workload of the SD 1.5 UNet (batch 2, 512x512) on this machine's GPU.

    python scripts/tune_sd_geglu.py --trials 32 --db sd_geglu.db --export tuning_logs/sm90_geglu.jsonl.xz

Per workload: the best verified fused TVM kernel (one GEMM with the gated epilogue), TVM's dlight
default, and the vendor path as diffusers runs it (F.linear -> chunk -> h * F.gelu(g): cuBLAS plus
two elementwise kernels and the [m, 2f] projection in memory), all measured in this run; the summary
is printed as a table and written as JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scheduler import jobs  # noqa: E402
from scheduler.extract import sd15_geglu_workloads  # noqa: E402


def main():
    a = jobs.add_job_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), "sd_geglu.db").parse_args()
    ops = sd15_geglu_workloads(batch=2, height=512, width=512)
    jobs.run(jobs.select([op.workload for op in ops], a), a,
             vendor="F.linear + chunk + h * F.gelu(g) (diffusers GEGLU)",
             calls={op.workload: op.calls for op in ops}, flops=lambda w: w.flops)


if __name__ == "__main__":
    main()
