"""A tuning job over a model's workloads, as the scripts/tune_sd_*.py scripts run it.

Selection flags shared by every job, one summary row per workload with the vendor time measured in
the same run, and results written as they arrive: the JSON summary and the JSONL export are
rewritten after every workload, so a job cut off by a time limit keeps everything it measured.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
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
    ap.add_argument("--skip-tuned", action="append", default=[], metavar="FILE",
                    help="leave out workloads this DB / export holds verified records for, for this GPU's "
                         "kernels (repeatable): a job that fills the gaps of shipped records")
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


def select(workloads: list[Workload], a: argparse.Namespace, target=None) -> list[Workload]:
    """The workloads a job tunes: --only, --limit, --shard, --buckets, then --skip-tuned (against
    `target`'s kernels, default this machine's)."""
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
    if getattr(a, "skip_tuned", None):
        have = tuned_keys(a.skip_tuned, target or detect())
        kept = [w for w in workloads if w.key not in have]
        print(f"--skip-tuned: {len(workloads) - len(kept)} of {len(workloads)} workloads already tuned", flush=True)
        workloads = kept
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


# -- a shape grid ------------------------------------------------------------------------------------
@dataclass
class GridCalls:
    """Calls over every shape of a grid, each shape's model calls weighted (`models`): per bucket
    workload (most called first), and per op those no bucket serves (a dim beyond the last edge:
    they run torch's op, counted `outside_buckets`)."""

    calls: dict[Workload, float]
    outside: dict[str, float]
    shapes: int
    passes: int  # model calls extracted (one per shape class and model, or per shape and model)


def grid_bucket_calls(shapes: list[tuple[int, int, int]], families, models: dict[str, float] | None = None,
                      dtype: str = "float16", tiny: bool = False, shortcut: bool = True) -> GridCalls:
    """{bucket workload: calls} that serve every (batch, height, width) of `shapes` for the `models`
    (scheduler.extract.MODELS: {"unet": calls per shape, "vae": ..., "sdxl_unet": ...}; default one SD 1.5
    UNet step and one VAE decode each) and
    op `families` (scheduler.extract.FAMILY_RULES). One extraction per extract.shape_class (whose
    docstring says why every shape of a class has the same bucket calls), conv2d's classes apart
    (its h and w exact), each counted for the class's members; shortcut=False extracts every shape."""
    from .extract import SEQ, TINY_SEQ, grid_classes, model_workloads

    models = {"unet": 1.0, "vae": 1.0} if models is None else models
    families = tuple(families)
    rest, conv = tuple(f for f in families if f != "conv"), tuple(f for f in families if f == "conv")
    groups = [(g, g == ("conv",)) for g in (rest, conv) if g] if shortcut else [(families, False)]
    calls: dict[Workload, float] = {}
    outside: dict[str, float] = {}
    passes = 0
    for model, weight in models.items():
        for fams, exact_hw in groups:
            classes = (grid_classes(shapes, exact_hw, TINY_SEQ if tiny else SEQ) if shortcut
                       else {s: [s] for s in shapes})
            for members in classes.values():
                passes += 1
                for op in model_workloads(model, fams, *members[0], dtype=dtype, tiny=tiny):
                    n = op.calls * len(members) * weight
                    bw = DEFAULT.bucket_of(op.workload)
                    if bw is None:
                        outside[op.workload.op] = outside.get(op.workload.op, 0) + n
                    else:
                        calls[bw] = calls.get(bw, 0) + n
    return GridCalls(dict(sorted(calls.items(), key=lambda kv: -kv[1])), outside, len(shapes), passes)


def tuned_keys(paths: list[str], target) -> set[str]:
    """Workload keys that the DBs / JSONL exports at `paths` hold verified-ok records for, for a target
    whose kernels are this one's (Target.shares_kernels_with: `shapetune db import` + `db verify`
    serve them here)."""
    import tempfile

    if not paths:
        return set()
    with tempfile.TemporaryDirectory(prefix="shapetune-tuned-") as d, TuningDB(Path(d) / "have.db") as db:
        for p in paths:
            db.merge_from(p)
        targets = [t.key for t in db.targets() if target.shares_kernels_with(t)]
        return {r.workload.key for t in targets for _, r in db.iter_results(target_key=t, status="ok")}


def run_budget(weights: dict[Workload, float], a: argparse.Namespace, per: float = 1.0,
               per_name: str = "forward", meta: dict | None = None):
    """Tune `weights` ({workload: calls}) with the task scheduler for a.budget_s seconds (a.db, a.batch,
    a.seed, a.template, a.trials as a cap per workload); after every round the JSON summary (a.json)
    and this target's records (a.export) are rewritten, so a job cut off keeps what it measured.
    Prints a line per round, then the allocation and the scheduler's end-to-end estimate, per `per`
    units of `per_name` (e.g. the grid's shapes: calls are summed over them). Returns the Schedule."""
    from .task_scheduler import round_line, schedule

    target = detect()
    print(f"target: {target.describe()}  [{target.key}]")
    print(f"{len(weights)} workloads for {a.budget_s:g} s" + (f", at most {a.trials} trials each" if a.trials else "")
          + f", db {a.db}", flush=True)

    def rows(sched) -> list[dict]:
        return [{"workload": t.workload.name, "key": t.workload.key, "calls": t.weight, "rounds": t.rounds,
                 "measured": t.measured, "trials": t.trials, "vendor_us": t.vendor_us, "best_us": t.tuned_us,
                 "served_us": t.served_us, "done": t.done, "seconds": sum(sec for sec, _ in t.round_s),
                 "warmup_build_s": t.warmup_build_s} for t in sched.tasks]

    def estimate(sched) -> dict:
        est = sched.totals()
        return {**est, "per": per, "per_name": per_name, "vendor_ms_per": est["before_us"] / per / 1e3,
                "served_ms_per": est["after_us"] / per / 1e3,
                "saved_ms_per": (est["start_us"] - est["after_us"]) / per / 1e3,
                "gain_ms_per_gpu_min": est["gain_ms_per_min"] / per}

    def write(sched):
        if a.json:
            Path(a.json).write_text(json.dumps(
                {"target": target.to_json(), "target_key": target.key, "date": time.strftime("%Y-%m-%d"),
                 "budget_s": a.budget_s, "meta": meta or {}, "estimate": estimate(sched), "rows": rows(sched),
                 "order": sched.order}, indent=1))
        if a.export:
            with TuningDB(a.db) as db:
                db.export_jsonl(a.export, target_key=target.key)

    def on_round(t, sched):
        print(round_line(t, sched), flush=True)
        write(sched)

    opts = TuneOptions(batch=a.batch, seed=a.seed, templates=tuple(a.template))
    sched = schedule(weights, target, a.budget_s, a.db, opts, cap=a.trials or None, on_round=on_round)
    write(sched)
    f = lambda v: f"{v:9.2f}" if v is not None else "      n/a"  # noqa: E731
    print(f"\n{'workload':52s} {'calls':>8s} {'rounds':>6s} {'trials':>6s} {'vendor_us':>9s} {'best_us':>9s} "
          f"{'served':>6s}  done")
    reached = [r for r in rows(sched) if r["rounds"] or r["trials"]]
    for r in sorted(reached, key=lambda r: -r["calls"] * (r["vendor_us"] or 0)):
        print(f"{r['workload']:52s} {r['calls']:8g} {r['rounds']:6d} {r['trials']:6d} {f(r['vendor_us'])} "
              f"{f(r['best_us'])} {'yes' if r['served_us'] is not None else 'no':>6s}  {r['done'] or '-'}")
    if len(reached) < len(sched.tasks):
        rest = [t for t in sched.tasks if not (t.rounds or t.trials)]
        print(f"... and {len(rest)} workloads the budget did not reach ({sum(t.weight for t in rest):g} calls; "
              f"the JSON summary lists them)")
    e = estimate(sched)
    print(f"end to end (sum of calls x time over {e['tasks_timed']} timed workload(s), per {per_name}, "
          f"{per:g} of them): {e['vendor_ms_per']:.3f} ms on the vendor path, {e['served_ms_per']:.3f} ms as served; "
          f"this run saved {e['saved_ms_per']:.4f} ms in {sched.wall_s / 60:.1f} min: "
          f"{e['gain_ms_per_gpu_min']:.4f} ms per {per_name} per GPU-minute")
    return sched
