"""Tune every conv2d workload of the SD 1.5 UNet (batch 2, 512x512) on this machine's GPU.

    python scripts/tune_sd_conv.py --trials 32 --db sd_conv.db --json sd_conv.json \
        --export tuning_logs/sm90_conv.jsonl.xz

Convs are channels-last implicit GEMMs (shapetune/ops/conv.py). ResnetBlock2D's conv2 and
Transformer2DModel's proj_out are tuned with the residual add fused (diffusers adds it right
after). Prints, per workload, the best verified TVM kernel, TVM's dlight default and the vendor
path (cuDNN through F.conv2d on channels_last tensors), all measured in this run, and writes the
summary as JSON.
`--list` prints the workloads and exits (no GPU needed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shapetune.ops.conv import conv2d_flops  # noqa: E402
from scheduler import jobs  # noqa: E402
from scheduler.extract import sd15_conv_workloads  # noqa: E402


def main():
    ap = jobs.add_job_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), "sd_conv.db")
    ap.add_argument("--list", action="store_true", help="print the workloads and exit")
    a = ap.parse_args()
    ops = sd15_conv_workloads(batch=2, height=512, width=512)
    workloads = jobs.select([op.workload for op in ops], a)
    if a.list:
        calls = {op.workload: (op.calls, op.modules[0]) for op in ops}
        for w in workloads:
            n, first = calls.get(w, (0, ""))
            print(f"{w.name:60s} {w.layout:18s} calls {n:2d}  {conv2d_flops(w) / 1e9:7.2f} GFLOP  {first}")
        return
    jobs.run(workloads, a, vendor="F.conv2d on channels_last (cuDNN)",
             calls={op.workload: op.calls for op in ops}, flops=conv2d_flops)


if __name__ == "__main__":
    main()
