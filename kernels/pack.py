"""Packs: the compiled kernels a registry serves, with the DB subset they need, for a machine that
has TVM's runtime only (no compiler library, no nvcc, no C compiler).

A pack is a directory (not a .tar.gz: TVM dlopens a module and SQLite opens a file, both in
place, so a directory serves as it lies, with no extraction step or temporary copy; tar it to ship
it):

    OUT/manifest.json   target (key, description, fields); per artifact: file, workload key,
                        record id (in OUT's DB) and uid, sha256 (and its scratch-buffer spec's)
    OUT/tuning.db       a real tuning DB (shapetune.db's store): the served records, the vendor
                        baselines of their runs, the bucket rows of their ops
    OUT/kernels/*.so    the exported modules: machine code (a CUDA module holds its fatbin, never
                        CUDA source to compile at load)
    OUT/kernels/*.ws.json  a GPU module's scratch buffers, which the loader allocates per call
                        (scheduler/workspaces.py), where it has any

`write_pack` packs what `Registry.dispatch` serves on the target (each workload's best record
that beats its run's vendor), building into the kernel cache what is not there yet. A kernel that
fails to build refuses the whole pack (`PackError`, nothing written): a pack that silently serves
less than its DB would is a surprise found in production.

`Pack` serves from a pack (`load_pack`, or SHAPETUNE_PACK=path): a kernel is loaded only from the
pack, after its sha256 matched the manifest; nothing is ever built or compiled. Where it cannot
be, the op falls back to torch, counted: "pack_target" (a pack for another target key),
"pack_missing" (no artifact for the record), "pack_mismatch" (sha256 differs, or a scratch-buffer
spec added, removed or altered). Nothing derived
from weights is packed (weight caches are made in the serving process).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from shapetune import config
from shapetune.records import MeasureResult
from shapetune.target import Target

log = logging.getLogger("shapetune")

FORMAT = "shapetune-pack"
VERSION = 1
MANIFEST = "manifest.json"
DB_NAME = "tuning.db"
KERNELS = "kernels"
# TVM's CUDA codegen writes every kernel as `extern "C" __global__`: a module holding these bytes
# carries CUDA source, which only a compiler turns into machine code at load.
CUDA_SOURCE_MARK = b'extern "C" __global__'


class PackError(Exception):
    """A pack that cannot be written or read; the message is one line for the user."""


class ArtifactError(Exception):
    """One kernel of a pack that cannot be served; `cause` is counted as the op's fallback."""

    def __init__(self, cause: str, msg: str):
        super().__init__(msg)
        self.cause = cause


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- writing ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PackSummary:
    out: Path
    target: Target
    kernels: int  # artifacts packed (one per served record)
    built: int  # of them, built now (the others were in the kernel cache)
    baselines: int
    buckets: int


def write_pack(out: str | Path, db_path: str | Path | None = None, target: Target | None = None,
               jobs: int | None = None, timeout_s: float = 600) -> PackSummary:
    """Write the pack of what the registry serves from `db_path` on `target` into directory `out`
    (new, or empty). Written beside `out` first and renamed: a failure leaves nothing. Imports not
    yet re-verified here are not served, so not packed (`shapetune db verify` first)."""
    from .registry import Registry

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PackError(f"{out} exists and is not an empty directory (a pack is written into a new one)")
    db_path = Path(db_path or config.default_db_path())
    if not db_path.is_file():
        raise PackError(f"no tuning DB at {db_path} (nothing tuned yet, or a wrong --db path)")
    reg = Registry(db_path=db_path, target=target)
    served = reg.served()
    if not served:
        raise PackError(f"nothing to pack: no kernel of {db_path} is "
                        f"served on {reg.target.describe()} (`shapetune db best` says why per shape)")
    built = _build_missing(reg.target, [r.record for r in served], jobs, timeout_s)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        summary = _write(tmp, reg, served, built)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dataclasses.replace(summary, out=out)


def _build_missing(target: Target, records: list[MeasureResult], jobs: int | None, timeout_s: float) -> int:
    """Build into the kernel cache the records' modules not there yet (isolated processes, as
    prebuild); the first failure refuses the pack."""
    from scheduler.builder import _short_error, artifact_name, build_one
    from scheduler.isolation import IsolatedPool

    cache = config.kernel_cache_dir(target.key)
    todo = [r for r in records if not (cache / artifact_name(r.workload, r.candidate)).exists()]
    if not todo:
        return 0
    cache.mkdir(parents=True, exist_ok=True)
    with IsolatedPool(jobs or config.build_jobs()) as pool:
        args = [(r.workload.to_json(), target.to_json(), r.candidate.to_json(), str(cache)) for r in todo]
        results = pool.run_all(build_one, args, timeout_s)
    for r, res in zip(todo, results):
        if isinstance(res, BaseException):
            why = (_short_error(res).splitlines() or [type(res).__name__])[-1][:200]
            raise PackError(f"cannot build the kernel of {r.workload.name} ({r.candidate}): {why}; "
                            f"nothing packed")
    return len(todo)


def _write(tmp: Path, reg, served, built: int) -> PackSummary:
    from scheduler.builder import artifact_name
    from scheduler.workspaces import copy_spec, spec_path

    from shapetune.db import TuningDB

    target = reg.target
    cache = config.kernel_cache_dir(target.key)
    (tmp / KERNELS).mkdir(parents=True)
    with reg._db() as src, TuningDB(tmp / DB_NAME) as db:
        records = [r.record for r in served]
        baselines = [b for r in records for b in src.baselines(r.workload.key, target.key)
                     if b.run_id == r.run_id]  # every vendor variant of the record's run
        ops = {r.workload.op for r in records}
        buckets = [row for row in src.buckets() if row["op"] in ops]
        db.add_results(records)
        for b in baselines:
            db.add_baseline(b)
        db.add_buckets(buckets)
        artifacts = []
        for r in records:
            name = artifact_name(r.workload, r.candidate)
            dst = tmp / KERNELS / name
            shutil.copyfile(cache / name, dst)
            if target.is_gpu and CUDA_SOURCE_MARK in dst.read_bytes():
                raise PackError(f"the kernel of {r.workload.name} in {cache / name} carries CUDA source "
                                f"(built without nvcc?): delete it and pack again")
            entry = {"file": f"{KERNELS}/{name}", "workload_key": r.workload.key,
                     "workload": r.workload.name, "record_id": db.find(r.uid)[0],
                     "record_uid": r.uid, "sha256": sha256_file(dst)}
            copy_spec(cache / name, dst)  # the kernel's scratch buffers (scheduler/workspaces.py), if any
            if spec_path(dst).exists():
                entry["workspaces_sha256"] = sha256_file(spec_path(dst))
            artifacts.append(entry)
    manifest = {"format": FORMAT, "version": VERSION, "created": time.time(),
                "target_key": target.key, "target_description": target.describe(),
                "target": target.to_json(), "db": DB_NAME, "artifacts": artifacts}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return PackSummary(tmp, target, len(artifacts), built, len(baselines), len(buckets))


# -- serving ----------------------------------------------------------------------------------------
class Pack:
    """A pack read from disk: its DB path, its target key and its artifacts by record uid."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mf = self.path / MANIFEST
        try:
            m = json.loads(mf.read_text())
        except FileNotFoundError:
            raise PackError(f"{self.path} is not a shapetune pack (no {MANIFEST})") from None
        except (OSError, ValueError) as e:
            raise PackError(f"cannot read {mf}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
            raise PackError(f"{mf} is not a {FORMAT} manifest of version {VERSION}")
        try:
            self.target = Target.from_json(m["target"])
            self.target_key = str(m["target_key"])
            self.target_description = str(m["target_description"])
            self.db_path = self.path / str(m["db"])
            self.artifacts = {str(a["record_uid"]): a for a in m["artifacts"]}
        except (KeyError, TypeError, AttributeError) as e:
            raise PackError(f"{mf} lacks a field or has a malformed one ({e})") from None

    def describe(self) -> str:
        return f"{self.path} ({len(self.artifacts)} kernels for {self.target_description})"

    def load(self, record: MeasureResult, is_gpu: bool) -> Callable:
        """The record's function, from the pack only and only where its bytes are the manifest's;
        raises ArtifactError (the cause counted) otherwise. Never builds or compiles."""
        from scheduler.loader import load_function
        from scheduler.workspaces import spec_path

        a = self.artifacts.get(record.uid)
        path = self.path / str(a["file"]) if a else None
        if path is None or not path.is_file():
            raise ArtifactError("pack_missing", f"no artifact in pack {self.path} for record {record.uid}"
                                f" of {record.workload.name}")
        if sha256_file(path) != a.get("sha256"):
            raise ArtifactError("pack_mismatch", f"{path} does not match the sha256 of {self.path / MANIFEST}"
                                f" (altered after packing)")
        spec = spec_path(path)  # its scratch buffers' spec: present exactly where the manifest hashes one
        if (a.get("workspaces_sha256") is None) == spec.exists() or \
                (spec.exists() and sha256_file(spec) != a["workspaces_sha256"]):
            raise ArtifactError("pack_mismatch", f"{spec} does not match {self.path / MANIFEST} (added, removed or "
                                f"altered after packing)")
        return load_function(str(path), is_gpu, compile_source=False)


def load_pack(path: str | Path):
    """Make the process-wide registry serve from the pack at `path` (its DB and artifacts, never
    building); returns the registry. Raises PackError for a path that is no readable pack."""
    from .registry import Registry, set_registry

    reg = Registry(pack=Pack(path))
    set_registry(reg)
    return reg
