"""Bucket efficiency: how close one bucket kernel comes to a kernel tuned for the exact shape.

    python scripts/bench_buckets.py --trials 32 --db buckets.db --json out.json

For each off-representative shape s: tune s's bucket and s itself with the same trial budget (or
reuse what the DB has), then time both best kernels *on s* in this run, plus the vendor path.
efficiency(s) = time(exact kernel on s) / time(bucket kernel on s); goal >= 99%, floor 95%.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scheduler.builder import build_one  # noqa: E402
from scheduler.runner import VENDOR, RunOptions, measure_one  # noqa: E402
from scheduler.tuner import TuneOptions, tune  # noqa: E402
from shapetune.buckets import DEFAULT  # noqa: E402
from shapetune.db import TuningDB  # noqa: E402
from shapetune.target import detect  # noqa: E402
from shapetune.ops.linear import linear_workload  # noqa: E402

# SD 1.5 GEMMs at other batch sizes and resolutions than the 512² batch-2 representatives.
GPU_SHAPES = [(12800, 320, 320, False), (3200, 640, 640, False), (800, 1280, 1280, False),
              (200, 1280, 1280, True), (6000, 320, 1280, True), (77, 320, 768, False),
              (1000, 5120, 640, True), (2, 1280, 320, True)]
CPU_SHAPES = [(37, 48, 40, True), (100, 64, 64, False), (13, 24, 40, True)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--db", default="buckets.db")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    target = detect()
    dtype = "float16" if target.is_gpu else "float32"
    shapes = [linear_workload(m, n, k, dtype, b) for m, n, k, b in (GPU_SHAPES if target.is_gpu else CPU_SHAPES)]
    buckets = [DEFAULT.bucket_of(s) for s in shapes]
    print(f"target: {target.describe()}\n{len(shapes)} shapes, {a.trials} trials per exact shape and per bucket",
          flush=True)
    t0 = time.time()
    tune(list(dict.fromkeys(buckets)) + shapes, target, a.db, TuneOptions(trials=a.trials, batch=a.batch),
         on_workload=lambda r: print(f"  tuned {r.workload.name} {r.by_status} [{time.time() - t0:.0f} s]",
                                     flush=True))
    opts, rows = RunOptions.for_target(target), []
    with TuningDB(a.db) as db, tempfile.TemporaryDirectory() as tmp:
        for s, b in zip(shapes, buckets):
            times = {}
            for label, owner in (("exact", s), ("bucket", b)):
                rec = db.best(owner.key, target.key)
                path, _ = build_one(owner.to_json(), target.to_json(), rec.candidate.to_json(), tmp)
                r = measure_one(s.to_json(), target.to_json(), path, opts, random.randrange(2**31))
                assert r["status"] == "ok", (label, s.name, r)
                times[label] = r["latency"]["median_us"]
            v = measure_one(s.to_json(), target.to_json(), VENDOR, opts, 0)
            rows.append({"shape": s.name, "bucket": b.name, "exact_us": times["exact"],
                         "bucket_us": times["bucket"], "vendor_us": v["latency"]["median_us"],
                         "efficiency": times["exact"] / times["bucket"]})
    effs = [r["efficiency"] for r in rows]
    geo = math.exp(sum(math.log(e) for e in effs) / len(effs))
    summary = {"target": target.to_json(), "date": time.strftime("%Y-%m-%d"), "trials": a.trials,
               "op": "linear", "rows": rows, "geomean_efficiency": geo, "min_efficiency": min(effs)}
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=1))
    print(f"\n{'shape':32s} {'bucket':34s} {'exact_us':>9s} {'bucket_us':>9s} {'vendor_us':>9s} {'eff':>6s}")
    for r in rows:
        print(f"{r['shape']:32s} {r['bucket']:34s} {r['exact_us']:9.2f} {r['bucket_us']:9.2f} "
              f"{r['vendor_us']:9.2f} {r['efficiency']:6.3f}")
    print(f"linear bucket efficiency on {target.device_name}: geomean {geo:.3f}, min {min(effs):.3f}")


if __name__ == "__main__":
    main()
