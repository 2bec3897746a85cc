"""`shapetune tune` (workloads into the DB) and `shapetune prebuild` (the kernel cache)."""

from __future__ import annotations

import json

import click

from shapetune import config
from shapetune.db import DBError

# Small GEMM sets for the default job: SD 1.5 UNet shapes on a GPU, CPU-sized ones on llvm.
PRESETS = {
    "demo": {
        "cuda": [(8192, 320, 320, False), (154, 320, 768, False), (2048, 640, 640, True), (2, 1280, 1280, True)],
        "llvm": [(64, 64, 64, False), (77, 96, 64, True), (128, 48, 96, True)],
    },
}


OPS = ["linear", "linear_gelu", "linear_residual", "geglu", "group_norm", "layer_norm", "conv2d", "attention"]
# The fused linears: linear's parameters, and this step after the bias (kernels.linear_gelu / linear_residual).
EPILOGUE_OPS = {"linear_gelu": "gelu", "linear_residual": "residual"}
SD15_PRESETS = ["sd15", "sd15-linear", "sd15-geglu", "sd15-norms", "sd15-conv", "sd15-attention", "sd15-elementwise"]


@click.command()
@click.option("--op", default="linear", show_default=True, type=click.Choice(OPS), help="The op of --shape.")
@click.option("--shape", "shapes", multiple=True,
              help="Repeatable. linear, linear_gelu, linear_residual: m=..,n=..,k=.. (linear also takes "
                   "epilogue=gelu or epilogue=residual); other ops: their workload's parameters, e.g. "
                   "--op attention --shape b=2,sq=1024,skv=77,h=8,d=80 (see `shapetune db best --help`).")
@click.option("--workloads", "workload_file", type=click.Path(exists=True, dir_okay=False),
              help="JSON workload file (scripts/extract_workloads.py --out).")
@click.option("--preset", type=click.Choice(sorted(PRESETS) + SD15_PRESETS),
              help="Built-in workload set (default: demo, a few GEMMs). sd15: every op family's workloads of "
                   "the SD 1.5 UNet at batch 2, 512² (130; GPU-sized); sd15-<family>: one family.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]),
              help="Default: float16 on cuda, float32 on llvm.")
@click.option("--bias/--no-bias", default=True, show_default=True, help="For --shape workloads.")
@click.option("--target", "target_kind", type=click.Choice(["auto", "cuda", "llvm"]), default="auto",
              show_default=True, help="auto: the GPU if present, else the CPU (llvm).")
@click.option("--trials", type=click.IntRange(min=1), default=None,
              help="Measured candidates per workload (the dlight baseline included)  [default: 16; with "
                   "--budget: a cap per workload, none by default].")
@click.option("--budget", "budget_s", callback=lambda ctx, param, v: _budget(v), metavar="TIME",
              help="Tune for this long (90s, 20m, 1h), round by round where the next round is expected "
                   "to save the most model time (calls x time x headroom); prints the allocation.")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Candidates built in parallel and measured per round.")
@click.option("--buckets/--exact", default=False, show_default=True,
              help="Tune each workload's shape bucket (one kernel for every m in its range) "
                   "instead of the exact shape.")
@click.option("--template", "templates", multiple=True, help="Only these templates (repeatable).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--gpus", default="", help="Comma-separated GPU ids: one worker process per GPU, workloads "
                                         "shared round robin, shard DBs merged into --db (e.g. 0,1,2,3).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="With the llvm target: this many CPU worker processes, the cores split between them.")
@click.option("--db", "db_path", type=click.Path(dir_okay=False), default=None,
              help="Tuning DB (default: $SHAPETUNE_DB or the user cache dir).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def tune(op, shapes, workload_file, preset, dtype, bias, target_kind, trials, budget_s, batch, buckets,
         templates, seed, gpus, workers, db_path, fmt):
    """Tune workloads: rank candidates with the cost model, build, verify, time, store."""
    try:
        _tune(op, shapes, workload_file, preset, dtype, bias, target_kind, trials, budget_s, batch, buckets,
              templates, seed, gpus, workers, db_path, fmt)
    except DBError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"{e.filename or ''}: {e.strerror or e}") from None


def _budget(text: str | None) -> float | None:
    """--budget in seconds; a bad value is one line of error."""
    from scheduler.task_scheduler import parse_budget

    try:
        return None if text is None else parse_budget(text)
    except ValueError as e:
        raise click.ClickException(str(e)) from None


def _tune(op, shapes, workload_file, preset, dtype, bias, target_kind, trials, budget_s, batch, buckets,
          templates, seed, gpus, workers, db_path, fmt):
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from scheduler.jobs import measured_summary
    from scheduler.tuner import TuneOptions
    from scheduler.tuner import tune as run_tune

    from shapetune.target import detect
    from shapetune.ops.linear import linear_workload

    try:
        target = detect(None if target_kind == "auto" else target_kind)
    except RuntimeError as e:
        raise click.ClickException(str(e)) from None
    dtype = dtype or ("float16" if target.is_gpu else "float32")
    # A bad shape or workload file is the user's input: one line, not the constructor's traceback.
    try:
        workloads = [_shape_workload(op, s, dtype, bias) for s in shapes]
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    if workload_file:
        from scheduler.extract import load_workload_file

        try:
            workloads += load_workload_file(workload_file)
        except ValueError as e:  # JSON errors do not name the file
            msg = str(e)
            raise click.ClickException(msg if msg.startswith(workload_file) else f"{workload_file}: {msg}") from None
    calls: dict = {}  # workload -> calls per forward, where the preset's extraction says
    if preset in SD15_PRESETS:
        from scheduler.extract import SD15_FAMILIES, sd15_workloads

        fams = tuple(SD15_FAMILIES) if preset == "sd15" else (preset.split("-", 1)[1],)
        ops = sd15_workloads(fams, dtype=dtype)
        workloads += [o.workload for o in ops]
        calls = {o.workload: o.calls for o in ops}
    elif preset or not workloads:
        workloads += [linear_workload(m, n, k, dtype, b) for m, n, k, b in PRESETS[preset or "demo"][target.kind]]
    if buckets:
        from shapetune.buckets import DEFAULT

        mapped = [DEFAULT.bucket_of(w) for w in workloads]
        if None in mapped:
            raise click.ClickException(f"{workloads[mapped.index(None)].name} is outside every bucket")
        bucket_calls: dict = {}
        for w, b in dict(zip(workloads, mapped)).items():  # a bucket is called wherever its shapes are
            bucket_calls[b] = bucket_calls.get(b, 0) + calls.get(w, 1)
        workloads, calls = list(dict.fromkeys(mapped)), bucket_calls
    db_path = db_path or str(config.default_db_path())
    err = Console(stderr=True)
    if budget_s is not None:
        if gpus or workers:
            raise click.ClickException("--budget tunes in one process: drop --gpus / --workers")
        return _tune_budget(workloads, calls, target, db_path, budget_s, trials, batch, seed, templates, fmt, err)
    trials = trials or 16
    err.print(f"target  {target.describe()}\ndb      {db_path}\n"
              f"tuning  {len(workloads)} workload(s) x {trials} trials")
    opts = TuneOptions(trials=trials, batch=batch, seed=seed, templates=tuple(templates))
    if gpus or workers:
        rows = _tune_parallel(workloads, target, db_path, opts, gpus, workers, err)
        return _report(rows, target, db_path, fmt)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=err,
                        transient=False, disable=not err.is_terminal)
    with progress:
        task = progress.add_task("tuning", total=trials * len(workloads))
        done_names = []

        def on_result(r):
            progress.update(task, advance=1, description=escape(f"{r.workload.name} [{r.status}]"))

        def on_workload(rep):
            done_names.append(rep.workload.name)
            progress.update(task, completed=trials * len(done_names))
            if not err.is_terminal:
                best = f"{rep.best.latency.median_us:.2f} us" if rep.best else "none"
                # one line per workload when piped (a log, grep), not folded at 80 columns
                err.print(escape(f"  {rep.workload.name}: {measured_summary(rep, trials)} best {best}"),
                          soft_wrap=True)

        try:
            reports = run_tune(workloads, target, db_path, opts, on_result=on_result, on_workload=on_workload)
        except ValueError as e:
            raise click.ClickException(str(e)) from None

    rows = []
    for rep in reports:
        rows.append({
            "workload": rep.workload.name,
            "measured": rep.measured,
            "ok": rep.by_status.get("ok", 0),
            "failed": rep.measured - rep.by_status.get("ok", 0),
            "best_us": rep.best.latency.median_us if rep.best else None,
            "best": str(rep.best.candidate) if rep.best else None,
            "dlight_us": rep.dlight.latency.median_us if rep.dlight else None,
            "vendor_us": rep.vendor.latency.median_us if rep.vendor else None,
            "speedup_vs_vendor": rep.speedup,
        })
    _report(rows, target, db_path, fmt)


@click.command()
@click.option("--db", "db_path", type=click.Path(dir_okay=False), default=None,
              help="Tuning DB (default: $SHAPETUNE_DB or the user cache dir).")
@click.option("--all", "all_records", is_flag=True,
              help="Also kernels that measured slower than the vendor path (normally never dispatched).")
@click.option("--jobs", type=click.IntRange(min=1), default=None, help="Parallel builds (default: cores).")
@click.option("--models", default=None,
              help="Only what these models dispatch (unet, vae, sdxl_unet, sdxl_vae; sd15 = unet,vae; sdxl) "
                   "at --shapes (default with --shapes: sd15).")
@click.option("--shapes", default=None,
              help="With --models: BATCHxSIZE[xWIDTH] in pixels, comma-separated (e.g. 1x512,2x768): only the "
                   "workloads of those calls and their buckets are re-verified and built.")
def prebuild(db_path, all_records, jobs, models, shapes):
    """Compile every kernel the registry would dispatch to on this machine, into the kernel cache.

    Imported records are re-verified here first (as `shapetune db verify`); without --all only the
    claims that beat the vendor path in their own run, the others stay pending. With --shapes, only
    the workloads a model dispatches at those shapes."""
    from kernels.registry import Registry

    reg = Registry(db_path=db_path, require_faster=not all_records)
    keys = None
    if shapes is not None:  # the models' dtype on this target: fp16 on a GPU, fp32 on the CPU
        from scheduler.extract import parse_models, workload_keys
        from scheduler.jobs import parse_shapes

        try:
            keys = workload_keys(parse_models(models or "sd15"), parse_shapes(shapes),
                                 "float16" if reg.target.is_gpu else "float32")
        except ValueError as e:
            raise click.BadParameter(str(e))
    elif models is not None:
        raise click.BadParameter("--models needs --shapes")
    out = reg.prebuild(jobs=jobs, keys=keys)
    click.echo(f"{reg.target.describe()}: {out['reverified']} imports re-verified ({out['reverify_failed']} "
               f"failed), {out['built']} built, {out['cached']} already cached, {out['failed']} failed  "
               f"(cache {config.kernel_cache_dir(reg.target.key)})")
    if left := _claims_left(reg):
        why = ([] if keys is None else ["outside --shapes"]) + \
              ([] if all_records else ["no claim beat the vendor path in its own run"])
        click.echo(f"{left} workload(s) keep unverified claims here" + (f" ({' or '.join(why)})" if why else "")
                   + "; `shapetune db verify` re-verifies every claim")
    if out["failed"]:
        raise SystemExit(1)


def _claims_left(reg) -> int:
    """Workloads with imported or portable claims this target has not re-verified (after a prebuild:
    the ones its filters left out)."""
    from scheduler.reverify import claims
    from shapetune.db import TuningDB

    path = reg.db_path or config.default_db_path()
    if not path.exists():
        return 0
    with TuningDB(path) as db:
        return len(claims(db, reg.target))


def _tune_budget(workloads, calls, target, db_path, budget_s, cap, batch, seed, templates, fmt, err) -> None:
    """--budget: the task scheduler over the workloads, weighted by their calls per forward (1 where
    nothing says), then its allocation table and end-to-end estimate."""
    from rich.markup import escape

    from scheduler.task_scheduler import round_line, schedule
    from scheduler.tuner import TuneOptions

    weights = {w: calls.get(w, 1) for w in dict.fromkeys(workloads)}
    err.print(f"target  {target.describe()}\ndb      {db_path}\ntuning  {len(weights)} workload(s) for "
              f"{budget_s:g} s" + (f", at most {cap} trials each" if cap else ""))

    def on_round(t, sched):
        err.print(escape(round_line(t, sched)), soft_wrap=True)

    opts = TuneOptions(batch=batch, seed=seed, templates=tuple(templates))
    try:
        sched = schedule(weights, target, budget_s, db_path, opts, cap=cap, on_round=on_round)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    rows = [{"workload": t.workload.name, "weight": t.weight, "rounds": t.rounds, "measured": t.measured,
             "trials": t.trials, "vendor_us": t.vendor_us, "best_us": t.tuned_us, "served_us": t.served_us,
             "served": t.served_us is not None, "done": t.done} for t in sched.tasks]
    if fmt == "json":
        click.echo(json.dumps({"target": target.to_json(), "db": db_path, "budget_s": budget_s,
                               "tasks": rows, "estimate": sched.totals()}, indent=1))
        return
    _allocation_table(rows, sched.totals(), target, db_path)


def _allocation_table(rows: list[dict], est: dict, target, db_path: str) -> None:
    from rich.markup import escape
    from rich.table import Table

    from .db_cmd import _print_table

    t = Table(title=f"tuning time spent on {target.device_name} ({target.kind} {target.arch}), heaviest first")
    for col in ("workload", "calls", "rounds", "measured", "trials", "vendor us", "best us", "served",
                "saved us/forward", "stopped"):
        t.add_column(col, justify="left" if col in ("workload", "stopped") else "right")
    f = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    for r in sorted(rows, key=lambda r: (-r["weight"] * (r["vendor_us"] or 0), -r["weight"])):
        saved = r["weight"] * (r["vendor_us"] - r["served_us"]) if r["served"] else 0.0
        t.add_row(escape(r["workload"]), f"{r['weight']:g}", str(r["rounds"]), str(r["measured"]),
                  str(r["trials"]), f(r["vendor_us"]), f(r["best_us"]), "yes" if r["served"] else "no",
                  f(saved if r["vendor_us"] is not None else None), escape(r["done"] or "-"))
    _print_table(t)
    click.echo(f"end to end (sum of calls x time over {est['tasks_timed']} timed workload(s)): "
               f"{est['before_us'] / 1e3:.3f} ms per forward on the vendor path, {est['after_us'] / 1e3:.3f} ms "
               f"as served now; this run: {(est['start_us'] - est['after_us']) / 1e3:.3f} ms saved in "
               f"{est['wall_s'] / 60:.1f} min, {est['gain_ms_per_min']:.4f} ms per forward per tuning minute")
    click.echo(f"DB: {db_path}  (a rerun continues: the state is the DB's)")


def _tune_parallel(workloads, target, db_path, opts, gpus, workers, err) -> list[dict]:
    """One worker process per GPU (or CPU worker); rows from the merged DB."""
    from scheduler.parallel import tune_parallel

    from shapetune.db import TuningDB

    if gpus and target.kind != "cuda":
        raise click.UsageError("--gpus needs the cuda target")
    if workers and target.kind != "llvm":
        raise click.UsageError("--workers is for the llvm target; use --gpus on GPUs")
    devices = [g.strip() for g in gpus.split(",") if g.strip()] if gpus else [""] * workers
    err.print(f"workers {len(devices)} ({', '.join(f'GPU {d}' if d else 'CPU' for d in devices)})")
    shards = tune_parallel(workloads, db_path, opts, devices, target.kind)
    for s in shards:
        err.print(f"  shard {s.shard}: {s.workloads} workload(s), exit {s.returncode}, "
                  f"{s.merged} new entries merged (log {s.log})")
    rows = []
    with TuningDB(db_path) as db:
        for w in workloads:
            rs = db.results(w.key, target.key)
            best = db.best(w.key, target.key)
            dl = [r for r in rs if r.candidate.template == "dlight" and r.status == "ok"]
            vendor = db.baseline(w.key, target.key)
            rows.append({
                "workload": w.name, "measured": len(rs), "ok": sum(r.status == "ok" for r in rs),
                "failed": sum(r.status != "ok" for r in rs),
                "best_us": best.latency.median_us if best else None,
                "best": str(best.candidate) if best else None,
                "dlight_us": min(r.latency.median_us for r in dl) if dl else None,
                "vendor_us": vendor.latency.median_us if vendor else None,
                "speedup_vs_vendor": vendor.latency.median_us / best.latency.median_us if best and vendor else None,
            })
    if any(s.returncode for s in shards):
        failed = ", ".join(str(s.shard) for s in shards if s.returncode)
        err.print(f"[red]shard(s) {failed} failed; what they measured is merged, the logs say why[/red]")
    return rows


def _shape_workload(op: str, shape: str, dtype: str, bias: bool):
    """--shape's workload for --op; linear_gelu / linear_residual (or linear with epilogue=gelu|residual)
    are linear's GEMM with that step after the bias, the workloads kernels.linear_gelu / linear_residual call."""
    from shapetune.ops.linear import linear_workload

    from .db_cmd import shape_workload

    parts = [p for p in shape.replace(" ", "").split(",") if p]
    steps = [p.split("=", 1)[1] for p in parts if p.startswith("epilogue=")]
    if steps and op != "linear":
        raise click.BadParameter(f"epilogue= is for --op linear, not {op}")
    if steps:
        if len(steps) > 1 or steps[0] not in EPILOGUE_OPS.values():
            raise click.BadParameter(f"epilogue must be one of {', '.join(EPILOGUE_OPS.values())}, "
                                     f"got {', '.join(steps)}")
        op = next(o for o, step in EPILOGUE_OPS.items() if step == steps[0])
        shape = ",".join(p for p in parts if not p.startswith("epilogue="))
    if op not in EPILOGUE_OPS:
        return shape_workload(op, shape, dtype, bias)
    w = shape_workload("linear", shape, dtype, bias)
    return linear_workload(*(v for _, v in w.dims), dtype, epilogue=w.epilogue + (EPILOGUE_OPS[op],))


def _report(rows: list[dict], target, db_path: str, fmt: str) -> None:
    if fmt == "json":
        click.echo(json.dumps({"target": target.to_json(), "db": db_path, "workloads": rows}, indent=1))
        return
    from rich.markup import escape
    from rich.table import Table

    from .db_cmd import _print_table  # piped: the table's natural width, as the db tables

    t = Table(title=f"tuned on {target.device_name} ({target.kind} {target.arch})")
    for col in ("workload", "ok/measured", "best us", "dlight us", "vendor us", "vendor/best", "best candidate"):
        t.add_column(col, justify="left" if col in ("workload", "best candidate") else "right")
    f = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    for r in rows:
        t.add_row(r["workload"], f"{r['ok']}/{r['measured']}", f(r["best_us"]), f(r["dlight_us"]),
                  f(r["vendor_us"]), f(r["speedup_vs_vendor"], 3), escape(r["best"] or "-"))
    _print_table(t)
    click.echo(f"DB: {db_path}  (query it: shapetune db best --db {db_path})")
    click.echo("vendor/best > 1: the tuned kernel is faster and the op (kernels.linear, ...) uses it; "
               "otherwise it falls back to torch's.")
