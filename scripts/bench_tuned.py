"""Benchmark the tuned kernels of a DB on this machine's GPU, against the vendor paths in the same run.

    python scripts/bench_tuned.py --db tuning_logs/sm90_h200_sd15_norms.jsonl.xz --json norms_bench.json
    python scripts/bench_tuned.py --db sd.db --op attention --only sq4096

For every workload with a verified record for this machine's target: the best candidate is rebuilt
from its knobs (in parallel, isolated), verified again by scheduler.runner (fresh NaN-poisoned inputs
against the float64 reference, every input required unchanged after the call), and timed next to
every vendor path of the op (torch's own op as models call it: the default, and each of
OpDef.vendor_variants, e.g. group_norm's NCHW-contiguous "nchw") in this same process, one workload
after the other. Memory-bound ops (group_norm, layer_norm) are also timed against the runner's copy
yardstick: an aligned device copy whose read + write traffic is the op's minimal bytes (rounded up to
whole 256-byte buffers). Once per run, a large copy (>= 1 GiB) measures the device's copy bandwidth
the same way. Compute ops report TFLOP/s where a flop count is known. Prints a table with geomeans
and writes JSON.

--db takes a SQLite tuning DB or a JSONL(.xz) export (imported into a temporary DB; imported records
are benchmarked too, since each is rebuilt and re-verified here). --export writes this run (every
re-verified record and every vendor baseline, under one run id) as a JSONL(.xz) export, so the records
we ship can carry a same-run vendor comparison measured with the current runner.

JSON written by --json (times are medians in µs, bandwidths in GB/s = 1e9 bytes/s):
  target, target_key, date, db, run_id, command
  large_copy   {"bytes": read + write traffic (2 x the bytes copied), "us", "gbps": bytes / us / 1e3}
               (null if that copy failed)
  summary      geomean_speedup, min_speedup, max_speedup (tuned vs the default vendor path),
               geomean_speedup_vs_<variant> (vs each vendor variant, e.g. geomean_speedup_vs_nchw),
               geomean_tuned_frac_of_copy, geomean_vendor_frac_of_copy, dispatch_geomean_speedup
               (max(speedup, 1): what dispatch gains, serving a tuned kernel only where it is faster)
  rows[]       one per workload:
    workload, key, candidate, tuned_when, tuned_us_in_tuning   the stored best record
    status, rel_err, error    re-verification here (ok | wrong_result | runtime_error | timeout |
                              build_error)
    tuned_us                  the tuned kernel, timed in this run (only when status is ok)
    vendor_us                 the default vendor path (OpDef.vendor; group_norm: channels_last)
    vendors                   {baseline name: us or null} for the default and every variant, named by
                              OpDef.baseline_name ("torch.nn.functional.group_norm",
                              "torch.nn.functional.group_norm[nchw]")
    speedup                   vendor_us / tuned_us (vs the default vendor path)
    dispatch                  "tuned" | "vendor": what kernels.registry would serve given this run
                              alone (tuned beats the run's fastest vendor path by its MARGIN)
    speedup_vs_<variant>      vendors[baseline_name(variant)] / tuned_us, e.g. speedup_vs_nchw
    bytes                     minimal traffic (scheduler.runner.min_traffic_bytes: every input read
                              once + the output written once)
    memory-bound ops only:
    copy_us, copy_bytes       the copy yardstick and its read + write traffic (>= bytes, < bytes + 512)
    copy_gbps                 copy_bytes / copy_us / 1e3
    tuned_gbps, vendor_gbps   bytes / tuned_us (vendor_us) / 1e3
    tuned_frac_of_copy, vendor_frac_of_copy   tuned_gbps (vendor_gbps) / copy_gbps
    compute ops with a known flop count: tuned_tflops, vendor_tflops
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shapetune.ops import opdef  # noqa: E402
from scheduler.builder import build_one  # noqa: E402
from scheduler.isolation import IsolatedPool  # noqa: E402
from kernels.registry import servable, vendor_us  # noqa: E402
from scheduler.runner import (COPY, LARGE_COPY_BYTES, Runner, aligned_copy_bytes, copy_bytes,  # noqa: E402
                              min_traffic_bytes)
from shapetune import config  # noqa: E402
from shapetune.db import TuningDB  # noqa: E402
from shapetune.records import MeasureResult, VendorBaseline  # noqa: E402
from shapetune.target import detect  # noqa: E402

MEMORY_BOUND = {"group_norm", "layer_norm"}


def flops(w) -> float | None:
    if w.op == "attention":
        from shapetune.ops.attention import attention_flops

        return attention_flops(w)
    if w.op == "conv2d":
        from shapetune.ops.conv import conv2d_flops

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


def _us(r) -> float | None:
    return r.latency.median_us if r.status == "ok" else None


def _ratio(a, b):
    return a / b if a and b else None


def bench_row(runner: Runner, w, best, art, run: list, run_id: str) -> dict:
    """One workload: re-verify and time the tuned kernel, every vendor path and (memory-bound) the
    copy. Appends what it measured (the record and every vendor baseline, under run_id) to `run`."""
    od = opdef(w.op)
    row = {"workload": w.name, "key": w.key, "candidate": str(best.candidate),
           "tuned_when": best.created, "tuned_us_in_tuning": best.latency.median_us}
    if isinstance(art, BaseException):
        row.update(status="build_error", error=str(art)[-400:])
    else:
        k = runner.run(w, art[0])
        row.update(status=k.status, rel_err=k.rel_err, error=k.error[-400:])
        if k.status == "ok":
            row["tuned_us"] = k.latency.median_us
            run.append(MeasureResult(w, runner.target, best.candidate, "ok", k.latency, max_rel_err=k.rel_err,
                                     build_s=art[1], run_id=run_id, created=time.time()))
    vendors = runner.vendors(w)
    baselines = [VendorBaseline(w, runner.target, od.baseline_name(v), r.latency, run_id=run_id,
                                created=time.time()) for v, r in vendors.items() if r.status == "ok"]
    run.extend(baselines)
    row["vendors"] = {od.baseline_name(v): _us(r) for v, r in vendors.items()}
    row["vendor_us"] = row["vendors"][od.baseline_name()]
    # What the registry would serve given this run alone (kernels.registry: the fastest vendor
    # path of the run, MARGIN, a disturbed vendor timing read as its fastest sample).
    row["dispatch"] = ("tuned" if row.get("tuned_us") and baselines
                       and servable(row["tuned_us"], min(vendor_us(b) for b in baselines)) else "vendor")
    row["speedup"] = _ratio(row["vendor_us"], row.get("tuned_us"))
    for v in od.vendor_variants:
        row[f"speedup_vs_{v}"] = _ratio(row["vendors"][od.baseline_name(v)], row.get("tuned_us"))
    row["bytes"] = min_traffic_bytes(w)
    if w.op in MEMORY_BOUND:
        row["copy_us"], row["copy_bytes"] = _us(runner.run(w, COPY)), copy_bytes(w)
        row["copy_gbps"] = _ratio(row["copy_bytes"] / 1e3, row["copy_us"])
        row["tuned_gbps"] = _ratio(row["bytes"] / 1e3, row.get("tuned_us"))
        row["vendor_gbps"] = _ratio(row["bytes"] / 1e3, row["vendor_us"])
        row["tuned_frac_of_copy"] = _ratio(row["tuned_gbps"], row["copy_gbps"])
        row["vendor_frac_of_copy"] = _ratio(row["vendor_gbps"], row["copy_gbps"])
    f = flops(w)
    if f and row.get("tuned_us"):
        row["tuned_tflops"] = f / row["tuned_us"] / 1e6
        row["vendor_tflops"] = _ratio(f / 1e6, row["vendor_us"])
    return row


def large_copy(runner: Runner, nbytes: int) -> dict | None:
    r = runner.large_copy(nbytes)
    if r.status != "ok":
        print(f"large copy failed: {r.error}", flush=True)
        return None
    moved = aligned_copy_bytes(nbytes)
    return {"bytes": moved, "us": r.latency.median_us, "gbps": moved / r.latency.median_us / 1e3}


def summarize(rows: list[dict]) -> dict:
    variants = sorted({k for r in rows for k in r if k.startswith("speedup_vs_")})
    return {"geomean_speedup": geomean(r.get("speedup") for r in rows),
            "min_speedup": min((r["speedup"] for r in rows if r.get("speedup")), default=None),
            "max_speedup": max((r["speedup"] for r in rows if r.get("speedup")), default=None),
            **{f"geomean_{k}": geomean(r.get(k) for r in rows) for k in variants},
            "geomean_tuned_frac_of_copy": geomean(r.get("tuned_frac_of_copy") for r in rows),
            "geomean_vendor_frac_of_copy": geomean(r.get("vendor_frac_of_copy") for r in rows),
            "dispatch_geomean_speedup": geomean(max(r.get("speedup") or 1.0, 1.0) for r in rows)}


def _print_row(row: dict):
    fmt = lambda x: f"{x:8.2f}" if x else "     n/a"  # noqa: E731
    others = "".join(f" x{fmt(v)} {k[len('speedup_'):]}" for k, v in row.items() if k.startswith("speedup_vs_"))
    extra = (f" copy {fmt(row['copy_us'])} us {fmt(row['copy_gbps'])} GB/s  tuned {fmt(row['tuned_gbps'])}"
             f" torch {fmt(row['vendor_gbps'])} GB/s") if "copy_us" in row else ""
    print(f"  {row['workload']:60s} {row['status']:12s} tuned {fmt(row.get('tuned_us'))} us vendor "
          f"{fmt(row['vendor_us'])} us  x{fmt(row['speedup'])}{others}{extra}", flush=True)


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", required=True, help="tuning DB or JSONL(.xz) export")
    ap.add_argument("--op", default="", help="comma-separated ops (default: all)")
    ap.add_argument("--only", default="", help="comma-separated substrings of workload names")
    ap.add_argument("--json", default="")
    ap.add_argument("--export", default="",
                    help="also write this run (each re-verified record and every vendor baseline, one run "
                         "id) as a JSONL(.xz) export: what dispatch compares within one run")
    ap.add_argument("--large-copy-bytes", type=int, default=LARGE_COPY_BYTES,
                    help="bytes of the once-per-run bandwidth copy (default 1 GiB)")
    a = ap.parse_args(argv)

    target = detect()
    tmp = Path(tempfile.mkdtemp(prefix="shapetune-bench-"))
    with open_db(a.db, tmp) as db:
        ops = set(a.op.split(",")) if a.op else None
        pairs = []
        for w in db.workloads():
            if ops and w.op not in ops or a.only and not any(s in w.name for s in a.only.split(",")):
                continue
            # Imported records too: every one is rebuilt and re-verified here before it is timed.
            best = db.best(w.key, target.key, include_pending=True)
            if best is not None:
                pairs.append((w, best))
    print(f"target: {target.describe()}  [{target.key}]\n{len(pairs)} tuned workloads in {a.db}", flush=True)
    if not pairs:
        raise SystemExit("nothing tuned for this target in that DB")

    t0 = time.time()
    with IsolatedPool(config.build_jobs()) as pool:
        built = pool.run_all(build_one, [(w.to_json(), target.to_json(), b.candidate.to_json(), str(tmp))
                                         for w, b in pairs], 600)
    print(f"built {sum(not isinstance(r, BaseException) for r in built)}/{len(pairs)} in {time.time() - t0:.0f} s",
          flush=True)

    rows, run, run_id = [], [], uuid.uuid4().hex[:12]
    with Runner(target, timeout_s=120) as runner:
        big = large_copy(runner, a.large_copy_bytes)
        if big:
            print(f"large copy: {big['bytes'] / 2**30:.2f} GiB moved in {big['us']:.1f} us, {big['gbps']:.0f} GB/s")
        for (w, best), art in zip(pairs, built):
            rows.append(bench_row(runner, w, best, art, run, run_id))
            _print_row(rows[-1])

    if a.export:
        with TuningDB(tmp / "run.db") as out:
            for m in run:
                (out.add_result if isinstance(m, MeasureResult) else out.add_baseline)(m)
            out.export_jsonl(a.export)
        print(f"this run ({run_id}): {sum(isinstance(m, MeasureResult) for m in run)} records and "
              f"{sum(isinstance(m, VendorBaseline) for m in run)} vendor baselines -> {a.export}")
    summary = summarize(rows)
    print("\n" + "  ".join(f"{k} {v:.3f}" for k, v in summary.items() if v is not None))
    if a.json:
        Path(a.json).write_text(json.dumps({"target": target.to_json(), "target_key": target.key,
                                            "date": time.strftime("%Y-%m-%d"), "db": a.db, "run_id": run_id,
                                            "command": " ".join(["python", *sys.argv]), "large_copy": big,
                                            "summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
