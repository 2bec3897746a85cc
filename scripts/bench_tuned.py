"""Benchmark the tuned kernels of a DB on this machine's GPU, against the vendor path in the same run.

    python scripts/bench_tuned.py --db tuning_logs/sm90_h200_sd15_norms.jsonl.xz --json norms_bench.json
    python scripts/bench_tuned.py --db sd.db --op attention --only sq4096

For every workload with a verified record for this machine's target: the best candidate is rebuilt
from its knobs (in parallel, isolated), verified again on fresh NaN-poisoned inputs against the
float64 reference, and timed next to the vendor path (torch's own op, as models call it) in this
same process, one workload after the other. Memory-bound ops (group_norm, layer_norm) are also timed
against a device-to-device copy of their minimal traffic (inputs read once + output written once):
`frac_of_copy` = copy time / kernel time is the achieved share of the copy's bandwidth. Compute ops
report TFLOP/s where a flop count is known. Prints a table with geomeans and writes JSON.

--db takes a SQLite tuning DB or a JSONL(.xz) export (imported into a temporary DB).
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

from scheduler.builder import build_one, preload_for  # noqa: E402
from scheduler.isolation import IsolatedPool  # noqa: E402
from scheduler.runner import COPY, VENDOR, Runner  # noqa: E402
from shapetune import config  # noqa: E402
from shapetune.db import TuningDB  # noqa: E402
from shapetune.target import detect  # noqa: E402

MEMORY_BOUND = {"group_norm", "layer_norm"}


def flops(w) -> float | None:
    if w.op == "attention":
        from kernels.defs_attn import attention_flops

        return attention_flops(w)
    if w.op == "conv2d":
        from kernels.defs_conv import conv2d_flops

        return conv2d_flops(w)
    try:
        return w.flops
    except NotImplementedError:
        return None


def open_db(path: str, tmp: Path) -> TuningDB:
    if path.endswith((".jsonl", ".jsonl.xz")):
        db = TuningDB(tmp / "bench.db")
        db.import_jsonl(path)
        return db
    return TuningDB(path)


def geomean(xs):
    xs = [x for x in xs if x]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", required=True, help="tuning DB or JSONL(.xz) export")
    ap.add_argument("--op", default="", help="comma-separated ops (default: all)")
    ap.add_argument("--only", default="", help="comma-separated substrings of workload names")
    ap.add_argument("--json", default="")
    a = ap.parse_args()

    target = detect()
    tmp = Path(tempfile.mkdtemp(prefix="shapetune-bench-"))
    with open_db(a.db, tmp) as db:
        ops = set(a.op.split(",")) if a.op else None
        pairs = []
        for w in db.workloads():
            if ops and w.op not in ops or a.only and not any(s in w.name for s in a.only.split(",")):
                continue
            best = db.best(w.key, target.key)
            if best is not None:
                pairs.append((w, best))
    print(f"target: {target.describe()}  [{target.key}]\n{len(pairs)} tuned workloads in {a.db}", flush=True)
    if not pairs:
        raise SystemExit("nothing tuned for this target in that DB")

    t0 = time.time()
    pool = IsolatedPool(config.build_jobs(), preload=preload_for(target))

    built = pool.run_all(build_one, [(w.to_json(), target.to_json(), b.candidate.to_json(), str(tmp))
                                     for w, b in pairs], 600)
    pool.close()
    print(f"built {sum(not isinstance(r, BaseException) for r in built)}/{len(pairs)} in {time.time() - t0:.0f} s",
          flush=True)

    runner, rows = Runner(target, timeout_s=120), []
    for (w, best), art in zip(pairs, built):
        row = {"workload": w.name, "key": w.key, "candidate": str(best.candidate),
               "tuned_when": best.created, "tuned_us_in_tuning": best.latency.median_us}
        if isinstance(art, BaseException):
            row.update(status="build_error", error=str(art)[-400:])
        else:
            k = runner.run(w, art[0])
            row.update(status=k.status, rel_err=k.rel_err, error=k.error[-400:])
            if k.status == "ok":
                row["tuned_us"] = k.latency.median_us
        v = runner.run(w, VENDOR)
        row["vendor_us"] = v.latency.median_us if v.status == "ok" else None
        if row.get("tuned_us") and row["vendor_us"]:
            row["speedup"] = row["vendor_us"] / row["tuned_us"]
        if w.op in MEMORY_BOUND:
            c = runner.run(w, COPY)
            row["copy_us"] = c.latency.median_us
            row["tuned_frac_of_copy"] = row["copy_us"] / row["tuned_us"] if row.get("tuned_us") else None
            row["vendor_frac_of_copy"] = row["copy_us"] / row["vendor_us"] if row["vendor_us"] else None
        f = flops(w)
        if f and row.get("tuned_us"):
            row["tuned_tflops"] = f / row["tuned_us"] / 1e6
            row["vendor_tflops"] = f / row["vendor_us"] / 1e6 if row["vendor_us"] else None
        rows.append(row)
        fmt = lambda x: f"{x:8.2f}" if x else "     n/a"  # noqa: E731
        extra = (f" copy {fmt(row['copy_us'])} us  tuned/copy {fmt(row['tuned_frac_of_copy'])}"
                 f" torch/copy {fmt(row['vendor_frac_of_copy'])}") if "copy_us" in row else ""
        print(f"  {w.name:60s} {row['status']:12s} tuned {fmt(row.get('tuned_us'))} us vendor "
              f"{fmt(row['vendor_us'])} us  x{fmt(row.get('speedup'))}{extra}", flush=True)
    runner.close()

    summary = {"geomean_speedup": geomean(r.get("speedup") for r in rows),
               "min_speedup": min((r["speedup"] for r in rows if r.get("speedup")), default=None),
               "max_speedup": max((r["speedup"] for r in rows if r.get("speedup")), default=None),
               "geomean_tuned_frac_of_copy": geomean(r.get("tuned_frac_of_copy") for r in rows),
               "geomean_vendor_frac_of_copy": geomean(r.get("vendor_frac_of_copy") for r in rows),
               "dispatch_geomean_speedup": geomean(max(r.get("speedup") or 1.0, 1.0) for r in rows)}
    print("\n" + "  ".join(f"{k} {v:.3f}" for k, v in summary.items() if v is not None))
    if a.json:
        Path(a.json).write_text(json.dumps({"target": target.to_json(), "target_key": target.key,
                                            "date": time.strftime("%Y-%m-%d"), "db": a.db, "summary": summary,
                                            "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
