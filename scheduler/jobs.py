"""A tuning job over a model's workloads, as the scripts/tune_sd_*.py scripts run it.

Selection flags shared by every job, one summary row per workload with the vendor time measured in
the same run, and results written as they arrive: the JSON summary and the JSONL export are
rewritten after every workload, so a job cut off by a time limit keeps everything it measured.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

from shapetune.buckets import DEFAULT
from shapetune.db import TuningDB
from shapetune.target import detect
from shapetune.workload import Workload

from .tuner import TuneOptions, WorkloadReport, tune


def add_job_args(ap: argparse.ArgumentParser, default_db: str) -> argparse.ArgumentParser:
    ap.add_argument("--trials", type=int, default=32,
                    help="measured candidates per workload in the DB (a rerun tops up to this, so a job cut "
                         "off by a time limit resumes where it stopped)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--db", default=default_db)
    ap.add_argument("--only", default="", help="comma-separated substrings of workload names")
    ap.add_argument("--limit", type=int, default=0, help="tune only the first N workloads")
    ap.add_argument("--shard", default="", metavar="K/N",
                    help="take every N-th workload from the K-th (0-based): N processes, one per GPU "
                         "(CUDA_VISIBLE_DEVICES), tune a job together; merge their exports with `shapetune db import`")
    ap.add_argument("--template", action="append", default=[],
                    help="only these templates (repeatable); --trials then counts their records only")
    ap.add_argument("--buckets", action="store_true", help="tune each workload's shape bucket instead")
    ap.add_argument("--export", default="", help="write this target's records as JSONL(.xz)")
    ap.add_argument("--json", default="", help="write the summary here")
    return ap


def parse_shapes(spec: str) -> list[tuple[int, int, int]]:
    """A --shapes value, BATCHxSIZE or BATCHxHEIGHTxWIDTH in pixels, comma-separated:
    "2x512,1x512x768" -> [(2, 512, 512), (1, 512, 768)]."""
    out = []
    for s in spec.split(","):
        try:
            v = [int(p) for p in s.split("x")]
        except ValueError:
            v = []
        if len(v) not in (2, 3) or min(v) < 1:
            raise SystemExit(f"--shapes: {s!r} is not BATCHxSIZE or BATCHxHEIGHTxWIDTH")
        out.append((v[0], v[1], v[-1]))
    return out


def bucketed_calls(extract: Callable, shapes: list[tuple[int, int, int]]) -> dict[Workload, int]:
    """{bucket workload: calls} over every shape, most called first (a job cut off by its time limit
    has tuned what pays most): extract(batch=, height=, width=) -> ExtractedOps of one forward pass."""
    calls: dict[Workload, int] = {}
    for b, h, w in shapes:
        for op in extract(batch=b, height=h, width=w):
            bw = DEFAULT.bucket_of(op.workload)
            if bw is not None:
                calls[bw] = calls.get(bw, 0) + op.calls
    return dict(sorted(calls.items(), key=lambda kv: -kv[1]))


def select(workloads: list[Workload], a: argparse.Namespace) -> list[Workload]:
    if a.only:
        keys = a.only.split(",")
        workloads = [w for w in workloads if any(k in w.name for k in keys)]
    if a.limit:
        workloads = workloads[: a.limit]
    if getattr(a, "shard", ""):
        k, n = (int(v) for v in a.shard.split("/"))
        if not 0 <= k < n:
            raise SystemExit(f"--shard {a.shard}: need 0 <= K < N")
        workloads = workloads[k::n]
    if a.buckets:
        workloads = list(dict.fromkeys(DEFAULT.bucket_of(w) for w in workloads))
    return workloads


def measured_summary(rep: WorkloadReport, trials: int) -> str:
    """What this run measured: counts per status, or why it measured nothing (a rerun of a finished job)."""
    if rep.measured:
        return str(rep.by_status)
    vendor = f"vendor from run {rep.vendor.run_id}" if rep.vendor_reused else "vendor timed"
    why = "already in the DB" if rep.held >= trials else "in the DB, no untried candidate left"
    return f"nothing measured: {rep.held}/{trials} trials {why} ({vendor})"


def run(workloads: list[Workload], a: argparse.Namespace, vendor: str, calls: dict | None = None,
        flops: Callable[[Workload], float] | None = None,
        extra: Callable[[WorkloadReport], dict] | None = None) -> list[dict]:
    """Tune, print a progress line per workload and a table at the end; returns the rows."""
    target = detect()
    print(f"target: {target.describe()}  [{target.key}]")
    print(f"{len(workloads)} workloads, {a.trials} trials each, db {a.db}", flush=True)
    t0, rows = time.time(), []

    def on_workload(rep: WorkloadReport):
        w = rep.workload
        best_us = rep.best.latency.median_us if rep.best else None
        row = {"workload": w.name, "key": w.key, "calls": (calls or {}).get(w),
               "best_us": best_us, "best": str(rep.best.candidate) if rep.best else None,
               "dlight_us": rep.dlight.latency.median_us if rep.dlight else None,
               "vendor_us": rep.vendor.latency.median_us,
               "ratio_vs_vendor": rep.vendor.latency.median_us / best_us if best_us else None,
               "measured": rep.measured, "by_status": rep.by_status}
        if flops and best_us:
            row["best_tflops"] = flops(w) / best_us / 1e6
        row.update(extra(rep) if extra else {})
        rows.append(row)
        print(f"  {w.name:52s} {measured_summary(rep, a.trials)} best {best_us or float('nan'):9.2f} us "
              f"vendor {row['vendor_us']:9.2f} us  [{time.time() - t0:5.0f} s]", flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(
                {"target": target.to_json(), "target_key": target.key, "date": time.strftime("%Y-%m-%d"),
                 "trials": a.trials, "vendor": vendor, "rows": rows, "seconds": time.time() - t0}, indent=1))
        if a.export:
            with TuningDB(a.db) as db:
                db.export_jsonl(a.export, target_key=target.key)

    tune(workloads, target, a.db, TuneOptions(trials=a.trials, batch=a.batch,
                                                  templates=tuple(a.template)), on_workload=on_workload)
    f = lambda v: f"{v:9.2f}" if v else "      n/a"  # noqa: E731
    print(f"\n{'workload':52s} {'tvm_us':>9s} {'dlight_us':>9s} {'vendor_us':>9s} {'vendor/tvm':>10s}  best")
    for r in rows:
        print(f"{r['workload']:52s} {f(r['best_us'])} {f(r['dlight_us'])} {f(r['vendor_us'])} "
              f"{f(r['ratio_vs_vendor']):>10s}  {r['best']}")
    return rows
