"""The copy yardstick before and after issue 8 item 2, timed in one run on this GPU.

    python scripts/bench_copy_yardstick.py --db tuning_logs/sm90_h200_sd15_norms.jsonl.xz \
        --json tuning_logs/bench/bench_copy_yardstick_h200.json

For every memory-bound workload (group_norm, layer_norm) of the DB, two copies of the op's minimal
traffic, both timed by scheduler.runner's method (CUDA events while the GPU is held busy, rotation over
>= 2x L2, median) one after the other in this process:
  old      `dst.copy_(src)` of two fp16 buffers of sum(bytes of inputs and output) // 4 elements each
           (the yardstick before: an element count that is odd or not a multiple of 8 for most ops)
  aligned  the runner's yardstick now: two buffers of scheduler.runner.copy_bytes(w) / 2 bytes each,
           a multiple of COPY_ALIGN

JSON: target, target_key, date, command, rows[] {workload, key, bytes, old_us, aligned_us, old_over_aligned},
summary {geomean_old_over_aligned, min, max}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scheduler.runner import (RunOptions, _rotate_bytes, _time, copy_bytes, min_traffic_bytes,  # noqa: E402
                              rotation_set_count)
from shapetune.db import TuningDB  # noqa: E402
from shapetune.target import detect  # noqa: E402

MEMORY_BOUND = ("group_norm", "layer_norm")


def time_copy(elems: int, dev, opts: RunOptions) -> float:
    """Median µs of `dst.copy_(src)` for fp16 buffers of `elems` elements, rotated like the runner."""
    import torch

    n = rotation_set_count(4 * elems, _rotate_bytes(opts, dev))
    gen = torch.Generator(device=dev).manual_seed(7)
    sets = [(torch.randn(elems, generator=gen, device=dev, dtype=torch.half),
             torch.empty(elems, device=dev, dtype=torch.half)) for _ in range(n)]
    samples = sorted(_time(lambda s: s[1].copy_(s[0]), sets, opts, True))
    del sets
    return samples[len(samples) // 2]


def main(argv: list[str] | None = None):
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", required=True, help="tuning DB or JSONL(.xz) export: its memory-bound workloads")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    target = detect()
    if not target.is_gpu:
        raise SystemExit("needs a GPU")
    dev, opts = torch.device("cuda", torch.cuda.current_device()), RunOptions.for_target(target)
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = a.db.endswith((".jsonl", ".jsonl.xz"))
        db = TuningDB(Path(tmp) / "w.db" if jsonl else a.db)
        if jsonl:
            db.import_jsonl(a.db)
        with db:
            workloads = [w for w in db.workloads() if w.op in MEMORY_BOUND]
    rows = []
    for w in workloads:
        old = time_copy(min_traffic_bytes(w) // 4, dev, opts)
        aligned = time_copy(copy_bytes(w) // 4, dev, opts)
        rows.append({"workload": w.name, "key": w.key, "bytes": min_traffic_bytes(w),
                     "old_elems": min_traffic_bytes(w) // 4, "old_us": old, "aligned_us": aligned,
                     "old_over_aligned": old / aligned})
        print(f"  {w.name:60s} old {old:8.2f} us ({rows[-1]['old_elems']} elems)  aligned {aligned:8.2f} us  "
              f"x{old / aligned:.3f}", flush=True)
    rs = [r["old_over_aligned"] for r in rows]
    summary = {"geomean_old_over_aligned": math.exp(sum(map(math.log, rs)) / len(rs)), "min": min(rs),
               "max": max(rs)}
    print("  ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    if a.json:
        Path(a.json).write_text(json.dumps({"target": target.to_json(), "target_key": target.key,
                                            "date": time.strftime("%Y-%m-%d"),
                                            "command": " ".join(["python", *sys.argv]),
                                            "summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
