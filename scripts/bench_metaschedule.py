"""MetaSchedule vs dlight vs shapetune vs cuBLAS on SD-1.5 linear shapes, one trial budget for all.

    python scripts/bench_metaschedule.py --trials 32 --db sd_linear.db --json bench_ms.json
    python scripts/bench_metaschedule.py --dry-run          # no GPU: design space + builds only

Per shape (y[m, n] = x[m, k] @ w[n, k]^T (+ b[n]), fp16 in, fp32 accumulate):
  (a) MetaSchedule: tune_tir(max_trials_global=N) on the tensor-core space, measured by its own
      LocalRunner, then compile_tir -> best schedule -> built and exported here;
  (b) TVM's dlight default schedule;
  (c) shapetune's best verified record in --db (if any), rebuilt from its candidate;
and torch's own op (cuBLAS). All four are measured by the same procedure, in one worker process
with one seed per shape: scheduler.runner.measure_one (fresh inputs, NaN-poisoned output checked
against the float64 reference, then CUDA-event timing over inputs rotated past the L2).
Ratios are cuBLAS time / kernel time (1.0 = as fast as cuBLAS).

--dry-run needs no GPU: for the first shape it generates MetaSchedule's design space and a few
measure candidates on the CUDA target, builds them with the same LocalBuilder the real run uses,
pushes one through a JSONDatabase + compile_tir + export, and builds dlight (and the --db best).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_SHAPES = "m8192_n320_k320,m8192_n2560_k320+bias,m2048_n640_k640"
_SHAPE_RE = re.compile(r"^m(\d+)_n(\d+)_k(\d+)([+_]bias)?$")


def log(msg: str) -> None:
    print(msg, flush=True)


# -- shapes -----------------------------------------------------------------------------------
def parse_shapes(spec: str, dtype: str = "float16") -> list:
    """'m8192_n320_k320,m8192_n2560_k320+bias' -> [Workload, ...] ('_bias' works too)."""
    from shapetune.ops.linear import linear_workload

    out = []
    for s in (x.strip() for x in spec.split(",")):
        if not s:
            continue
        mt = _SHAPE_RE.match(s)
        if not mt:
            raise ValueError(f"bad shape {s!r}: expected m<M>_n<N>_k<K>[+bias]")
        m, n, k = (int(mt.group(i)) for i in (1, 2, 3))
        out.append(linear_workload(m, n, k, dtype, bias=bool(mt.group(4))))
    if not out:
        raise ValueError("no shapes given")
    return out


def shape_label(w) -> str:
    d = w.dim
    return f"m{d['m']}_n{d['n']}_k{d['k']}" + ("+bias" if "bias" in w.epilogue else "")


# -- MetaSchedule -----------------------------------------------------------------------------
def ms_space(target) -> str:
    """The space name tune_tir / TuneContext accept (SpaceGenerator.create -> PostOrderApply)."""
    return "cuda-tensorcore" if target.is_gpu else "llvm"


def ms_builder_init() -> None:
    """MetaSchedule builder worker setup (fresh Popen process, outside the task timeout): compile
    CUDA through nvcc like shapetune (the stock callback wants NVRTC via cuda-python)."""
    import os as _os
    import sys as _sys

    _os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
    root = _os.environ.get("SHAPETUNE_REPO")
    if root and root not in _sys.path:
        _sys.path.insert(0, root)
    from scheduler.cuda_compile import install_compile_callback

    install_compile_callback()


def ms_build(mod, target, _params):
    """MetaSchedule's default_build minus its `import tvm.s_tir.tensor_intrin` (~40-60 s per fresh
    worker, and LocalBuilder starts fresh workers on every batch); the candidates arrive already
    tensorized, so building needs no registered intrinsics."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    with target:  # the nvcc callback reads the arch from the current target
        return tvm_build(mod, target=target)


def ms_runner_init() -> None:
    import os as _os
    import sys as _sys

    root = _os.environ.get("SHAPETUNE_REPO")
    if root and root not in _sys.path:
        _sys.path.insert(0, root)
    from scheduler.loader import ensure_cuda_runtime

    ensure_cuda_runtime()


def ms_builder(target, timeout_s: float = 60.0):
    from tvm.s_tir import meta_schedule as ms

    return ms.builder.LocalBuilder(timeout_sec=timeout_s, f_build=ms_build, initializer=ms_builder_init)


def ms_runner(target):
    from tvm.s_tir import meta_schedule as ms

    return ms.runner.LocalRunner(initializer=ms_runner_init if target.is_gpu else None)


def ms_module(w):
    import tvm

    from shapetune.ops import opdef

    return tvm.IRModule({"main": opdef(w.op).prim_func(w)})


def ms_records_summary(db) -> dict:
    """Counts of MetaSchedule's own measurements and its best time (its LocalRunner, not ours)."""
    ok, failed, best = 0, 0, None
    for rec in db.get_all_tuning_records():
        secs = [float(s) for s in (rec.run_secs or [])]
        if secs and all(s < 1e9 for s in secs):
            ok += 1
            t = sum(secs) / len(secs) * 1e6
            best = t if best is None else min(best, t)
        else:
            failed += 1
    return {"ms_records_ok": ok, "ms_records_failed": failed, "ms_own_best_us": best}


def ms_build_best(db, w, target, out_dir: Path) -> str:
    """compile_tir(db) -> best Schedule -> built and exported .so (path)."""
    import tvm
    from tvm.s_tir.meta_schedule import tir_integration

    tvm_target = target.tvm_target()
    sch = tir_integration.compile_tir(db, ms_module(w), tvm_target)
    if sch is None:
        raise RuntimeError("MetaSchedule database holds no valid schedule for this workload")
    if target.is_gpu:
        from scheduler.cuda_compile import install_compile_callback

        install_compile_callback()
    with tvm_target:
        lib = tvm.compile(sch.mod, target=tvm_target)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{w.key}-metaschedule.so"
    lib.export_library(str(path))
    return str(path)


def ms_tune(w, target, trials: int, work_dir: Path, seed: int):
    """tune_tir with MetaSchedule's own defaults (evolutionary search, XGB cost model, LocalRunner)."""
    from tvm.s_tir import meta_schedule as ms

    work_dir.mkdir(parents=True, exist_ok=True)
    return ms.tune_tir(
        ms_module(w),
        target.tvm_target(),
        str(work_dir),
        max_trials_global=trials,
        num_trials_per_iter=min(64, trials),
        builder=ms_builder(target),
        runner=ms_runner(target),
        space=ms_space(target),
        seed=seed,
    )


# -- shapetune builds -------------------------------------------------------------------------
def build_candidate(w, target, candidate, out_dir: Path) -> str:
    """Build `candidate`'s knobs as this code's version (Candidate.version: what it is built from)."""
    import dataclasses

    from scheduler.builder import build_one
    from scheduler.templates import current_version

    out_dir.mkdir(parents=True, exist_ok=True)
    candidate = dataclasses.replace(candidate, version=current_version(candidate.template, w.op))
    path, _ = build_one(w.to_json(), target.to_json(), candidate.to_json(), str(out_dir))
    return path


def shapetune_db_path(db: str, work_dir: str) -> str:
    """--db as given, or a fresh DB imported from a JSONL(.xz) export (e.g. tuning_logs/*.jsonl.xz)."""
    if not db or not (db.endswith(".jsonl") or db.endswith(".jsonl.xz")):
        return db
    from shapetune.db import TuningDB

    path = Path(work_dir) / "imported_tuning.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    with TuningDB(path) as t:
        n_rec, n_base = t.import_jsonl(db)
    log(f"imported {n_rec} records, {n_base} baselines from {db} into {path}")
    return str(path)


def shapetune_best(db_path: str | None, w, target, match: str = "exact"):
    """(shapetune's best verified record, its target key), or (None, None).

    match "exact": only this target's key (device, arch, TVM/CUDA/torch versions).
    match "arch": if that has none, the best on any stored target of the same kind and arch (e.g.
    H200 records on an H100); the kernel is rebuilt and measured here either way."""
    if not db_path:
        return None, None
    from shapetune.db import TuningDB

    with TuningDB(db_path, create=False) as db:
        r = db.best(w.key, target.key, include_pending=True)  # imports too: measure_one verifies here
        if r is not None or match != "arch":
            return r, (target.key if r else None)
        found = [(x, t.key) for t in db.targets() if t.kind == target.kind and t.arch == target.arch
                 for x in [db.best(w.key, t.key, include_pending=True)] if x is not None]
        if not found:
            return None, None
        return min(found, key=lambda f: (f[0].target.device_name != target.device_name,
                                         f[0].latency.median_us))


def _err(e: BaseException) -> str:
    from scheduler.builder import _short_error

    return _short_error(e, 600)


# -- measurement ------------------------------------------------------------------------------
class Measurer:
    """One worker process (spawned on the GPU) that runs measure_one for every kernel in turn."""

    def __init__(self, target, timeout_s: float = 180):
        from scheduler.isolation import IsolatedPool
        from scheduler.runner import RunOptions

        self.target = target
        self.opts = RunOptions.for_target(target)
        self.timeout_s = timeout_s
        self.pool = IsolatedPool(1, method="spawn" if target.is_gpu else "forkserver")

    def measure(self, w, path: str, seed: int) -> dict:
        from scheduler.runner import measure_one

        r = self.pool.run_all(measure_one, [(w.to_json(), self.target.to_json(), path, self.opts, seed)],
                              self.timeout_s)[0]
        if isinstance(r, BaseException):
            return {"status": "runtime_error", "error": _err(r)}
        out = {"status": r["status"], "rel_err": r.get("rel_err")}
        if r.get("latency"):
            out["us"] = r["latency"]["median_us"]
        if r.get("error"):
            out["error"] = r["error"]
        return out

    def close(self):
        self.pool.close()


# -- runs -------------------------------------------------------------------------------------
def bench_shape(w, target, a, measurer: Measurer, skip_ms: bool) -> dict:
    from scheduler.runner import VENDOR
    from shapetune.records import Candidate

    label = shape_label(w)
    out_dir = Path(a.work_dir) / "kernels" / label
    row: dict = {"shape": label, "workload": w.name, "key": w.key, "flops": w.flops, "trials": a.trials}
    paths: dict[str, str] = {}

    # (a) MetaSchedule
    if skip_ms:
        row["metaschedule_error"] = "skipped: time budget"
        log(f"  [{label}] metaschedule: skipped (time budget)")
    else:
        log(f"  [{label}] metaschedule: tune_tir, {a.trials} trials, space {ms_space(target)} ...")
        t0 = time.perf_counter()
        try:
            db = ms_tune(w, target, a.trials, Path(a.work_dir) / "metaschedule" / label, a.seed)
            row["ms_tune_s"] = time.perf_counter() - t0
            row.update(ms_records_summary(db))
            paths["metaschedule"] = ms_build_best(db, w, target, out_dir)
        except Exception as e:  # noqa: BLE001  (a failed tuner is a result of the benchmark)
            row.setdefault("ms_tune_s", time.perf_counter() - t0)
            row["metaschedule_error"] = _err(e)
        log(f"  [{label}] metaschedule: {row['ms_tune_s']:.0f} s, {row.get('ms_records_ok', 0)} ok / "
            f"{row.get('ms_records_failed', 0)} failed records"
            + (f", error: {row['metaschedule_error'].splitlines()[-1]}" if "metaschedule_error" in row else ""))

    # (b) dlight
    try:
        paths["dlight"] = build_candidate(w, target, Candidate("dlight"), out_dir)
    except Exception as e:  # noqa: BLE001
        row["dlight_error"] = _err(e)

    # (c) shapetune's best
    try:
        best, from_key = shapetune_best(a.db, w, target, a.db_match)
        if best is None:
            row["shapetune_error"] = "no verified record in --db" if a.db else "no --db given"
        else:
            row["shapetune_candidate"] = best.candidate.to_json()
            row["shapetune_db_target"] = from_key
            row["shapetune_db_us"] = best.latency.median_us
            paths["shapetune"] = build_candidate(w, target, best.candidate, out_dir)
    except Exception as e:  # noqa: BLE001
        row["shapetune_error"] = _err(e)

    # the same measurement for everything, vendor included
    paths["cublas"] = VENDOR
    for name, path in paths.items():
        r = measurer.measure(w, path, a.seed)
        row[f"{name}_status"] = r["status"]
        row[f"{name}_rel_err"] = r.get("rel_err")
        if "us" in r:
            row[f"{name}_us"] = r["us"]
        if r.get("error"):
            row[f"{name}_error"] = r["error"]
        log(f"  [{label}] {name:12s} {r['status']:13s} "
            + (f"{r['us']:9.2f} us" if "us" in r else r.get("error", "")[:200]))
    vendor = row.get("cublas_us")
    for name in ("metaschedule", "dlight", "shapetune"):
        us = row.get(f"{name}_us")
        row[f"{name}_ratio"] = vendor / us if (vendor and us) else None
    return row


def print_table(rows: list[dict]) -> None:
    def f(v, w=9, p=2):
        return f"{v:{w}.{p}f}" if isinstance(v, (int, float)) else f"{'n/a':>{w}s}"

    log(f"\n{'shape':24s} {'ms_us':>9s} {'dlight_us':>9s} {'st_us':>9s} {'cublas_us':>9s} "
        f"{'ms/cb':>6s} {'dl/cb':>6s} {'st/cb':>6s} {'ms_tune_s':>9s}")
    for r in rows:
        log(f"{r['shape']:24s} {f(r.get('metaschedule_us'))} {f(r.get('dlight_us'))} "
            f"{f(r.get('shapetune_us'))} {f(r.get('cublas_us'))} {f(r.get('metaschedule_ratio'), 6, 3)} "
            f"{f(r.get('dlight_ratio'), 6, 3)} {f(r.get('shapetune_ratio'), 6, 3)} {f(r.get('ms_tune_s'), 9, 0)}")
    log("(ratios: cuBLAS time / kernel time; ms = MetaSchedule, dl = dlight, st = shapetune --db best)")


def run(a, target) -> dict:
    t_start = time.time()
    workloads = parse_shapes(a.shapes, a.dtype)
    if target.is_gpu:
        import tvm.s_tir.tensor_intrin  # noqa: F401  (tensor-core rules need the intrinsics)
    measurer = Measurer(target)
    rows: list[dict] = []
    last_tune = 0.0
    try:
        for i, w in enumerate(workloads):
            elapsed = time.time() - t_start
            # keep the whole run inside the budget: skip MetaSchedule when its next tune won't fit
            skip_ms = bool(a.budget_s) and i > 0 and elapsed + 1.3 * last_tune + 30 > a.budget_s
            log(f"[{i + 1}/{len(workloads)}] {w.name}  [{elapsed:.0f} s]")
            row = bench_shape(w, target, a, measurer, skip_ms)
            last_tune = max(last_tune, row.get("ms_tune_s", 0.0))
            rows.append(row)
            if a.json:  # partial results survive a kill
                _write_json(a.json, _summary(a, target, rows, t_start))
    finally:
        measurer.close()
    summary = _summary(a, target, rows, t_start)
    print_table(rows)
    log(f"total {summary['seconds']:.0f} s")
    return summary


def _summary(a, target, rows, t_start) -> dict:
    return {"target": target.to_json(), "target_key": target.key, "date": time.strftime("%Y-%m-%d"),
            "trials": a.trials, "dtype": a.dtype, "db": a.db, "rows": rows, "seconds": time.time() - t_start}


def _write_json(path: str, obj) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, p)


# -- dry run ----------------------------------------------------------------------------------
def dry_run(a, target) -> dict:
    """Everything but measuring: MetaSchedule space + candidates + LocalBuilder + compile_tir +
    export on the first shape, dlight build, --db lookup. Works without a GPU."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from shapetune.records import Candidate

    t0 = time.time()
    w = parse_shapes(a.shapes, a.dtype)[0]
    label = shape_label(w)
    work = Path(a.work_dir) / "dry_run" / label
    tvm_target = target.tvm_target()
    if target.is_gpu:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    log(f"dry run: {w.name} on {tvm_target}  [intrinsics {time.time() - t0:.0f} s]")
    out: dict = {"shape": label, "workload": w.name, "key": w.key, "space": ms_space(target)}

    mod = ms_module(w)
    builder = ms_builder(target, timeout_s=120)
    ok: list = []
    # Most tensor-core samples fail to lower (TVM_NOTES); draw again with another seed if none built.
    for attempt in range(a.dry_attempts):
        ctx = ms.TuneContext(mod, target=tvm_target, space_generator=ms_space(target),
                             search_strategy=ms.search_strategy.EvolutionarySearch(population_size=a.dry_population),
                             task_name="main", rand_state=a.seed + attempt, num_threads="physical")
        spaces = ctx.generate_design_space()
        out["design_spaces"] = len(spaces)
        log(f"  design spaces: {len(spaces)}  [{time.time() - t0:.0f} s]")
        n = a.dry_candidates
        ctx.pre_tuning(max_trials=n, num_trials_per_iter=n, design_spaces=spaces,
                       database=ms.database.MemoryDatabase(), cost_model=ms.cost_model.RandomModel())
        cands = ctx.generate_measure_candidates() or []
        ctx.post_tuning()
        log(f"  measure candidates: {len(cands)}  [{time.time() - t0:.0f} s]")
        results = builder.build([ms.builder.BuilderInput(c.sch.mod, tvm_target) for c in cands])
        ok = [c for c, r in zip(cands, results) if r.error_msg is None]
        errs = [r.error_msg.strip().splitlines()[-1] for r in results if r.error_msg is not None]
        out["candidates"] = out.get("candidates", 0) + len(cands)
        out["candidates_built"] = out.get("candidates_built", 0) + len(ok)
        out.setdefault("candidate_build_errors", []).extend(sorted(set(errs)))
        log(f"  LocalBuilder: {len(ok)}/{len(cands)} built  [{time.time() - t0:.0f} s]")
        for e in sorted(set(errs))[:3]:
            log(f"    build error: {e[:200]}")
        if ok:
            break

    if ok:
        # What tune_tir leaves behind: a JSONDatabase with a record; then compile_tir + export.
        (work / "ms_db").mkdir(parents=True, exist_ok=True)
        db = ms.database.JSONDatabase(work_dir=str(work / "ms_db"))
        wl = db.commit_workload(mod)
        db.commit_tuning_record(ms.database.TuningRecord(
            ok[0].sch.trace, wl, run_secs=[1e-4], target=tvm_target,
            args_info=ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
        try:
            out["metaschedule_path"] = ms_build_best(db, w, target, work)
            out.update(ms_records_summary(db))
            log(f"  compile_tir + build + export: {out['metaschedule_path']}  [{time.time() - t0:.0f} s]")
        except Exception as e:  # noqa: BLE001
            out["metaschedule_error"] = _err(e)
            log(f"  compile_tir + build failed: {out['metaschedule_error']}")
    else:
        out["metaschedule_error"] = "no candidate built"

    try:
        out["dlight_path"] = build_candidate(w, target, Candidate("dlight"), work)
        log(f"  dlight build: {out['dlight_path']}  [{time.time() - t0:.0f} s]")
    except Exception as e:  # noqa: BLE001
        out["dlight_error"] = _err(e)
        log(f"  dlight build failed: {out['dlight_error']}")

    if a.db:
        try:
            best, from_key = shapetune_best(a.db, w, target, a.db_match)
            if best is None:
                out["shapetune_error"] = "no verified record in --db for this target key"
            else:
                out["shapetune_candidate"] = best.candidate.to_json()
                out["shapetune_db_target"] = from_key
                out["shapetune_path"] = build_candidate(w, target, best.candidate, work)
        except Exception as e:  # noqa: BLE001
            out["shapetune_error"] = _err(e)
        log(f"  shapetune --db best: {out.get('shapetune_path') or out.get('shapetune_error')}")
    out["seconds"] = time.time() - t0
    out["ok"] = "metaschedule_path" in out and "dlight_path" in out
    log(f"dry run {'OK' if out['ok'] else 'FAILED'} in {out['seconds']:.0f} s")
    return out


# -- main -------------------------------------------------------------------------------------
def pick_target(kind: str, dry: bool):
    import torch

    from shapetune.target import cuda_target, detect

    if kind == "auto":
        kind = "cuda" if (torch.cuda.is_available() or dry) else "llvm"
    if kind == "cuda":
        return detect("cuda") if torch.cuda.is_available() else cuda_target()
    return detect("llvm")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=32, help="MetaSchedule max_trials_global per shape")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated m<M>_n<N>_k<K>[+bias]")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--db", default="", help="shapetune TuningDB (or a .jsonl[.xz] export) with tuned records (c)")
    ap.add_argument("--db-match", choices=("exact", "arch"), default="exact",
                    help="exact: records of this target key only; arch: else any target of this arch")
    ap.add_argument("--json", default="", help="write results here")
    ap.add_argument("--work-dir", default="out/bench_metaschedule", help="MetaSchedule logs, kernels")
    ap.add_argument("--target", choices=("auto", "cuda", "llvm"), default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=450,
                    help="skip MetaSchedule for later shapes once its next tune would pass this (0: never)")
    ap.add_argument("--dry-run", action="store_true", help="no measurement: space generation and builds")
    ap.add_argument("--dry-population", type=int, default=64)
    ap.add_argument("--dry-candidates", type=int, default=16)
    ap.add_argument("--dry-attempts", type=int, default=3)
    a = ap.parse_args(argv)

    # MetaSchedule's Popen workers and our spawned runner import the repo by name.
    os.environ["SHAPETUNE_REPO"] = str(REPO)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "scripts")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")

    target = pick_target(a.target, a.dry_run)
    log(f"target: {target.describe()}  [{target.key}]")
    a.db = shapetune_db_path(a.db, a.work_dir)
    if a.dry_run:
        out = dry_run(a, target)
        if a.json:
            _write_json(a.json, {"dry_run": out, "target": target.to_json(), "target_key": target.key})
        return 0 if out["ok"] else 1
    log(f"shapes: {a.shapes}; {a.trials} trials each; db: {a.db or '-'}")
    summary = run(a, target)
    if a.json:
        _write_json(a.json, summary)
        log(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
