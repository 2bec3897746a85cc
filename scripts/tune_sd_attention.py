"""Tune every attention workload of the SD 1.5 UNet (batch 2, 512x512) on this machine's GPU.

    python scripts/tune_sd_attention.py --trials 32 --db sd_attn.db --export tuning_logs/sm90_attention.jsonl.xz

Self-attention at 4096/1024/256/64 latent tokens and cross-attention to 77 text tokens, 8 heads,
head dim 40/80/160/160, fp16, "bshd" tensors (shapetune/ops/attention.py). Per workload: the best verified
flash-style TVM kernel and the vendor path as diffusers runs it (torch SDPA on the [b, h, s, d]
views, output transposed back), both measured in this run, with TFLOP/s (4·b·h·sq·skv·d flops);
the summary is printed as a table and written as JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shapetune.ops.attention import attention_flops  # noqa: E402
from scheduler import jobs  # noqa: E402
from scheduler.extract import sd15_attention_workloads  # noqa: E402


def main():
    a = jobs.add_job_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), "sd_attn.db").parse_args()
    ops = sd15_attention_workloads(batch=2, height=512, width=512)
    jobs.run(jobs.select([op.workload for op in ops], a), a,
             vendor="torch SDPA as diffusers' AttnProcessor2_0 calls it",
             calls={op.workload: op.calls for op in ops}, flops=attention_flops)


if __name__ == "__main__":
    main()
