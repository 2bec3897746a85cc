"""Tune every GEGLU workload of the SD 1.5 UNet (batch 2, 512x512) on this machine's GPU.

    python scripts/tune_sd_geglu.py --trials 32 --db sd_geglu.db --export tuning_logs/sm90_geglu.jsonl.xz

Per workload: the best verified fused TVM kernel (one GEMM with the gated epilogue), TVM's dlight
default, and the vendor path as diffusers runs it (F.linear -> chunk -> h * F.gelu(g): cuBLAS plus
two elementwise kernels and the [m, 2f] projection in memory), all measured in this run; the summary
is printed as a table and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scheduler.extract import sd15_geglu_workloads  # noqa: E402
from scheduler.tuner import TuneOptions, tune  # noqa: E402
from shapetune.db import TuningDB  # noqa: E402
from shapetune.target import detect  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--db", default="sd_geglu.db")
    ap.add_argument("--only", default="", help="comma-separated substrings of workload names")
    ap.add_argument("--export", default="", help="write this target's records as JSONL(.xz)")
    ap.add_argument("--json", default="", help="write the summary here")
    a = ap.parse_args()

    target = detect()
    ops = sd15_geglu_workloads(batch=2, height=512, width=512)
    calls = {op.workload: op.calls for op in ops}
    workloads = [op.workload for op in ops]
    if a.only:
        keys = a.only.split(",")
        workloads = [w for w in workloads if any(k in w.name for k in keys)]
    print(f"target: {target.describe()}  [{target.key}]")
    print(f"{len(workloads)} geglu workloads, {a.trials} trials each, db {a.db}", flush=True)

    t0 = time.time()

    def on_workload(rep):
        best = rep.best.latency.median_us if rep.best else float("nan")
        print(f"  {rep.workload.name:48s} measured {rep.measured:3d} {rep.by_status} best {best:9.2f} us "
              f"vendor {rep.vendor.latency.median_us:9.2f} us  [{time.time() - t0:6.0f} s]", flush=True)

    reports = tune(workloads, target, a.db, TuneOptions(trials=a.trials, batch=a.batch), on_workload=on_workload)

    rows = []
    for rep in reports:
        w = rep.workload
        best_us = rep.best.latency.median_us if rep.best else None
        rows.append({
            "workload": w.name, "key": w.key, "flops": w.flops, "calls_per_unet_step": calls.get(w, 0),
            "best_us": best_us, "best": str(rep.best.candidate) if rep.best else None,
            "dlight_us": rep.dlight.latency.median_us if rep.dlight else None,
            "vendor_us": rep.vendor.latency.median_us,
            "best_tflops": w.flops / best_us / 1e6 if best_us else None,
            "ratio_vs_vendor": rep.vendor.latency.median_us / best_us if best_us else None,
            "by_status": rep.by_status,
        })
    summary = {"target": target.to_json(), "target_key": target.key, "date": time.strftime("%Y-%m-%d"),
               "trials": a.trials, "vendor": "F.linear + chunk + h * F.gelu(g) (diffusers GEGLU)",
               "rows": rows, "seconds": time.time() - t0}
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=1))
    if a.export:
        with TuningDB(a.db) as db:
            n = db.export_jsonl(a.export, target_key=target.key)
        print(f"exported {n} lines to {a.export}")
    print(f"\n{'workload':48s} {'tvm_us':>9s} {'dlight_us':>9s} {'vendor_us':>9s} {'vendor/tvm':>10s}  best")
    for r in rows:
        f = lambda v: f"{v:9.2f}" if v else "      n/a"  # noqa: E731
        ratio = f"{r['ratio_vs_vendor']:10.3f}" if r["ratio_vs_vendor"] else "       n/a"
        print(f"{r['workload']:48s} {f(r['best_us'])} {f(r['dlight_us'])} {f(r['vendor_us'])} {ratio}  {r['best']}")


if __name__ == "__main__":
    main()
