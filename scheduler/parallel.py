"""A tuning job over several GPUs (or CPU worker processes): one process per device, merged DB.

Each worker is a separate Python process (`python -m scheduler.parallel WORKFILE`) with
CUDA_VISIBLE_DEVICES set to its GPU, its own SQLite DB (`<db>.shard<i>`) and its share of the
workloads (round robin); a shard DB starts as a copy of the job DB's records, so `trials` counts what
the job already holds, and is deleted once merged (also after a failure). A worker that crashes or hangs loses nothing already measured: its DB
holds every result up to that point, every shard DB is merged into the job's DB at the end (and a
rerun resumes: `trials` is a per-workload total there too), and the crash is reported per shard.
Builds split the host's cores between the workers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from shapetune.db import TuningDB
from shapetune.workload import Workload

from .isolation import die_with_parent
from .tuner import TuneOptions


@dataclass
class ShardResult:
    shard: int
    device: str  # CUDA_VISIBLE_DEVICES value ("" for a CPU worker)
    workloads: int
    returncode: int
    db: str
    log: str
    merged: int = 0  # records and baselines added to the job's DB


def tune_parallel(workloads: list[Workload], db_path: str | Path, options: TuneOptions,
                  devices: list[str], target_kind: str | None = None,
                  timeout_s: float | None = None) -> list[ShardResult]:
    """Tune `workloads` with one worker per entry of `devices` (GPU ids; "" = a CPU worker) and merge
    the shard DBs into `db_path`. Returns one ShardResult per worker (returncode != 0: it failed;
    its results so far are merged anyway)."""
    if not devices:
        raise ValueError("tune_parallel: no devices")
    db_path = Path(db_path)
    work = Path(tempfile.mkdtemp(prefix="shapetune-job-"))
    out = _run_shards(workloads, db_path, options, devices, target_kind, timeout_s, work)
    with TuningDB(db_path) as db:
        for res in out:
            if Path(res.db).exists():
                res.merged = db.merge_from(res.db)[0]
    for res in out:  # all merged (a merge that raised keeps every shard DB for a rerun to merge)
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(res.db + suffix).unlink(missing_ok=True)
    return out


def _run_shards(workloads, db_path: Path, options: TuneOptions, devices: list[str], target_kind,
                timeout_s, work: Path) -> list[ShardResult]:
    """Start one worker per device on its shard DB, seeded with the job DB's records (so `trials`
    counts what the job already holds), and wait for them all; a worker still running when this
    returns or raises is killed."""
    jobs = max(1, (os.cpu_count() or 1) // len(devices))
    procs = []
    try:
        for i, dev in enumerate(devices):
            mine = workloads[i::len(devices)]
            shard_db = db_path.with_name(f"{db_path.name}.shard{i}")
            with TuningDB(shard_db) as db:
                if db_path.exists():
                    db.merge_from(db_path)
            spec = {"workloads": [w.to_json() for w in mine], "db": str(shard_db), "target": target_kind,
                    "options": asdict(options)}
            spec_path = work / f"shard{i}.json"
            spec_path.write_text(json.dumps(spec))
            env = dict(os.environ, SHAPETUNE_BUILD_JOBS=str(jobs))
            if dev:
                env["CUDA_VISIBLE_DEVICES"] = dev
            log = work / f"shard{i}.log"
            with open(log, "w") as fp:
                p = subprocess.Popen([sys.executable, "-m", "scheduler.parallel", str(spec_path)], env=env,
                                     stdout=fp, stderr=subprocess.STDOUT,
                                     cwd=str(Path(__file__).resolve().parents[1]), preexec_fn=die_with_parent)
            procs.append((p, ShardResult(i, dev, len(mine), 0, str(shard_db), str(log))))
        for p, res in procs:
            try:
                res.returncode = p.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                res.returncode = p.wait()
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [res for _, res in procs]


def _worker(spec_path: str) -> None:
    from shapetune.target import detect

    from .tuner import tune

    spec = json.loads(Path(spec_path).read_text())
    workloads = [Workload.from_json(w) for w in spec["workloads"]]
    opts = spec["options"]
    opts["templates"] = tuple(opts.get("templates") or ())
    target = detect(spec["target"])
    print(f"target {target.describe()}; {len(workloads)} workloads -> {spec['db']}", flush=True)
    for rep in tune(workloads, target, spec["db"], TuneOptions(**opts)):
        best = f"{rep.best.latency.median_us:.2f} us" if rep.best else "none"
        print(f"  {rep.workload.name}: {rep.by_status} best {best}", flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1])
