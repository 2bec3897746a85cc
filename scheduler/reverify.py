"""Re-verification: an imported record is rebuilt and re-verified on this target before it is served.

A JSONL export is a claim made on another machine (or edited since): its sha256 only shows that
no line was edited without recomputing it. So `shapetune db verify` (and `Registry.prebuild`,
first) takes this target's imported records that could be served -- per workload the fastest claim,
then, if it fails, the next, until one passes or none is left -- and for each: checks its knobs
against the template's space (`knob_error`), builds it with `builder.build_one` and verifies and
times it with `runner.Runner`, exactly as the tuner does. One that passes is appended as a record
measured here (this run's id, the latency measured here, the vendor path timed in the same run);
the import is marked reverified, or reverify_failed with the reason, and never retried. A workload
whose vendor path fails to run in this run (a crashed worker: no yardstick to judge its records by)
is left out of the run: its imports stay pending, to be tried by a later run, and the rest go on. The kernel
that passed (the very artifact verified and timed) is moved into the kernel cache, so prebuild and the
first call do not build it a second time; one that failed is deleted. As in the
tuner (scheduler.tuner): where the record that passed is `servable` against the vendor path timed
in this run, the vendor path is timed once more in the run, so that one disturbed vendor timing
cannot make it served (dispatch takes the run's fastest vendor; a workload passes at most once, so
this is one extra vendor timing per adopted record that beats the vendor).

Portable records (shapetune/target.py KERNEL_FIELDS): where this target has no verified record of a
workload, the best records of the other targets that share its kernels (another torch version,
another GPU of the same architecture) are candidates too, re-verified and re-timed here the same way,
after this target's imports. One that passes is stored as measured here; one that fails is stored as
the failed result it gave here (so it is not tried again). Nothing of the other target is served as
measured here.

Versions (Candidate.version): a candidate carries the version of the code that makes its kernel, its
template's (Template.version) and its op definition's (OpDef.version); bump one when a change alters
the generated kernel for some knobs. Records of another version are never served as measured (the
registry skips them) nor loaded from the kernel cache (the version is in the candidate's key, so in
the artifact's name). Where this target has no verified record of the current version, its records of
an older version (`stale`: each run's fastest) are candidates too, after its imports and before the
portable records: the same knobs, rebuilt as the current version, verified and re-timed here, stored
as measured (the current version's record) or as the failed result. Whatever is re-verified (an
import, a portable or stale record) is rebuilt and stored as the current version of its knobs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from shapetune import config
from shapetune.db import TuningDB
from shapetune.records import STATUSES, Candidate, MeasureResult
from shapetune.serving import servable, vendor_us
from shapetune.target import Target
from shapetune.workload import Workload

from . import builder, templates, workspaces
from .runner import Runner, vendor_baselines


def knob_error(r: MeasureResult) -> str | None:
    """Why a record's candidate is not in its template's space for its workload and target, or
    None (the `validate` of `TuningDB.import_jsonl`).

    A failed record (no kernel: never built, verified or served) needs only a known template: it is
    the history of a search, and an earlier version's attempt with a template that no longer applies
    there, or with knobs its space has since dropped, stays importable (an export of that version
    would otherwise be refused whole). The knobs are compared whatever the candidate's version: a
    record of another version is a candidate for the current one (`stale`)."""
    try:
        t = templates.get(r.candidate.template)
    except ValueError:
        return f"unknown template {r.candidate.template!r}"
    if not r.verified:
        return None
    if not t.applies(r.workload, r.target):
        return f"template {t.name} does not apply to {r.workload.op} on {r.target.kind}"
    if current(r).key not in _space_keys(t, r.workload, r.target):
        return f"{r.candidate} is outside {t.name}'s space for {r.workload.name}"
    return None


def current(r: MeasureResult) -> Candidate:
    """The record's candidate as this code's version of its knobs (what re-verification builds)."""
    return dataclasses.replace(r.candidate, version=templates.current_version(r.candidate.template, r.workload.op))


_spaces: dict[tuple[str, str, str, str], frozenset[str]] = {}


def _space_keys(t, w: Workload, target: Target) -> frozenset[str]:
    k = (t.name, w.key, target.key, templates.current_version(t.name, w.op))
    if k not in _spaces:
        _spaces[k] = frozenset(c.key for c in t.space(w, target))
    return _spaces[k]


@dataclass
class Verdict:
    """What re-verifying one workload's imported records did."""

    workload: Workload
    passed: MeasureResult | None = None  # the record measured here, now served
    claimed_us: float | None = None  # the import's latency, for the passed one
    failed: list[tuple[MeasureResult, str]] = field(default_factory=list)

    def line(self) -> str:
        """One line: the workload and what became of its imports."""
        fails = f"; {len(self.failed)} failed" if self.failed else ""
        if self.passed is not None:
            return (f"{self.workload.name}: reverified {self.passed.candidate} (claimed "
                    f"{self.claimed_us:.2f} us, {self.passed.latency.median_us:.2f} us here){fails}")
        why = self.failed[-1][1].splitlines()[0][:160] if self.failed else "nothing to try"
        return f"{self.workload.name}: none passed, {len(self.failed)} failed (last: {why})"


def reverify(db_path: str | Path, target: Target, op: str | None = None, jobs: int | None = None,
             build_timeout_s: float = 180, run_timeout_s: float = 60, runner: Runner | None = None,
             keys: Collection[str] | None = None, servable_only: bool = False) -> list[Verdict]:
    """Re-verify this target's pending imports in the DB at `db_path`; one Verdict per workload
    that had any (none: an empty list, no process started). runner: what verifies and times the
    records and the vendor path (default: a Runner of run_timeout_s); closed here.

    keys: only the workloads of these keys (a model's shapes and their buckets).
    servable_only: only the claims that beat the vendor path of their own run (`claims_won`), what a
    registry that requires faster kernels serves; the others stay pending (`db verify` takes them all).

    Builds run in parallel (`jobs`, default config.build_jobs()), one candidate per still
    unresolved workload per round; runs are one at a time, as the tuner measures.
    """
    with TuningDB(db_path) as db:
        todo = claims(db, target, op)
        if keys is not None:
            todo = {w: rs for w, rs in todo.items() if w.key in keys}
        if servable_only:
            won = claims_won(db)
            todo = {w: kept for w, rs in todo.items() if (kept := [(i, r) for i, r in rs if won(r)])}
        if not todo:
            return []
        verdicts = {w: Verdict(w) for w in todo}
        run_id = uuid.uuid4().hex[:12]
        with builder.IsolatedPool(jobs or config.build_jobs()) as pool, \
                (runner or Runner(target, timeout_s=run_timeout_s)) as runner:
            with tempfile.TemporaryDirectory(prefix="shapetune-reverify-") as tmp:
                vendor = {}
                for w in list(todo):
                    try:
                        vendor[w] = _measure_vendor(db, runner, w, run_id)
                    except RuntimeError as e:  # no yardstick this run: its imports stay pending
                        verdicts[w].failed += [(r, f"vendor_failed: {e}") for _, r in todo.pop(w)]
                while todo:
                    batch = {w: todo[w].pop(0) for w in todo}
                    for w, (i, r), why in _build_and_run(pool, runner, batch, target, run_id, tmp,
                                                         build_timeout_s):
                        if i is None:
                            _adopt(db, verdicts[w], r, why, run_id)
                        else:
                            _decide(db, verdicts[w], i, r, why)
                        passed = verdicts[w].passed
                        if passed is not None and servable(passed.latency.median_us, vendor[w]):
                            try:
                                _measure_vendor(db, runner, w, run_id)  # once: w is resolved now
                            except RuntimeError:
                                pass  # the run's first vendor timing stays its yardstick
                    todo = {w: rest for w, rest in todo.items()
                            if rest and verdicts[w].passed is None}
    return list(verdicts.values())


def claims(db: TuningDB, target: Target, op: str | None = None
           ) -> dict[Workload, list[tuple[int | None, MeasureResult]]]:
    """What re-verification can take on `target`, per workload in the order it tries them: this
    target's pending imports ((row id, record)), then its records of an older version (`stale`) and
    the other targets' portable records ((None, record); one per candidate of the current version)."""
    out: dict[Workload, list[tuple[int | None, MeasureResult]]] = {}
    for i, r in db.pending(target.key, op=op):
        out.setdefault(r.workload, []).append((i, r))
    seen = set()
    for r in stale(db, target, op) + portable(db, target, op):
        if (r.workload, current(r)) not in seen:
            seen.add((r.workload, current(r)))
            out.setdefault(r.workload, []).append((None, r))
    return out


def claims_won(db: TuningDB):
    """A predicate on records: whether the record beat the vendor path timed in its own run by the
    registry's margin (`servable`; the run, not the target, names the baseline: a portable record
    is re-targeted here but keeps its run id); True where that run stored no vendor baseline (or
    the record names no run)."""
    vendor: dict[tuple[str, str], float] = {}
    for b in db.baselines():
        if b.run_id:
            k = (b.workload.key, b.run_id)
            vendor[k] = min(vendor.get(k, float("inf")), vendor_us(b))

    def won(r: MeasureResult) -> bool:
        v = vendor.get((r.workload.key, r.run_id)) if r.run_id else None
        return v is None or servable(r.latency.median_us, v)

    return won


def _build_and_run(pool, runner: Runner, batch: dict, target: Target, run_id: str, tmp: str,
                   timeout_s: float):
    """Yield (workload, (id, import), MeasureResult measured here, or the reason it failed)."""
    checked = {w: knob_error(r) for w, (_, r) in batch.items()}
    ok = [w for w in batch if checked[w] is None]
    args = [(w.to_json(), target.to_json(), current(batch[w][1]).to_json(), tmp) for w in ok]
    built = dict(zip(ok, pool.run_all(builder.build_one, args, timeout_s)))
    for w, (i, r) in batch.items():
        if checked[w] is not None:
            yield w, (i, r), f"knobs: {checked[w]}"
            continue
        b = built[w]
        if isinstance(b, BaseException):
            kind = "timeout" if type(b).__name__ == "WorkerTimeout" else "build_error"
            yield w, (i, r), f"{kind}: {builder._short_error(b)}"
            continue
        path, build_s = b
        res = runner.run(w, path)
        if res.status != "ok":
            workspaces.remove(path)
            yield w, (i, r), f"{res.status}: {res.error}"
            continue
        _keep(Path(path), target)
        yield w, (i, r), MeasureResult(w, target, current(r), "ok", res.latency,
                                       max_rel_err=res.rel_err, build_s=build_s, run_id=run_id,
                                       created=time.time())


def _keep(path: Path, target: Target) -> None:
    """Move a kernel that passed into this target's kernel cache (the name the registry loads it by,
    builder.artifact_name), so prebuild and the first call do not build it again. Only the artifact
    that was verified and timed is kept; one already cached stays (the same build inputs)."""
    cache = config.kernel_cache_dir(target.key)
    dest = cache / path.name
    try:
        if dest.exists():
            return
        cache.mkdir(parents=True, exist_ok=True)
        workspaces.copy_spec(path, dest)  # its scratch buffers' spec first, as builder.build_one writes
        tmp = dest.with_suffix(f".{os.getpid()}.tmp.so")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)  # atomic, as builder.build_one writes: a reader never sees half a module
    except OSError:
        pass  # a cache that cannot be written costs a build later, nothing else
    finally:
        workspaces.remove(path)


def portable(db: TuningDB, target: Target, op: str | None = None) -> list[MeasureResult]:
    """The other targets' records that are candidates here: for each workload without a verified
    record of the current version on `target`, each other target's best record (imports included)
    where that target shares this one's kernels (Target.shares_kernels_with) and `target` has not
    tried its candidate (as the current version) yet; re-targeted to `target`, by workload name,
    fastest first."""
    others = [t for t in db.targets() if t.key != target.key and target.shares_kernels_with(t)]
    served = {r.workload for r in _measured(db, target, op) if current(r) == r.candidate}
    out: dict[tuple[str, str], MeasureResult] = {}
    for t in others:
        for r in db.best_all(target_key=t.key, op=op, include_pending=True):
            k = (r.workload.key, current(r).key)
            if k in out or r.workload in served or k[1] in db.held(r.workload, target)[0]:
                continue
            out[k] = dataclasses.replace(r, target=target)
    return sorted(out.values(), key=lambda r: (r.workload.name, r.workload.key, r.latency.median_us))


def stale(db: TuningDB, target: Target, op: str | None = None) -> list[MeasureResult]:
    """This target's records of an older version that are candidates here: for each workload without
    a verified record of the current version on `target`, each run's fastest record measured here
    (imports count once re-verified: their measured copy) whose candidate is of another version than
    the current one and whose knobs `target` has not tried as the current version yet; by workload
    name, fastest first."""
    runs: dict[tuple[Workload, str], MeasureResult] = {}
    served = set()
    for r in _measured(db, target, op):  # newest first
        k = (r.workload, r.run_id)
        if current(r) == r.candidate:
            served.add(r.workload)
        elif k not in runs or r.latency.median_us <= runs[k].latency.median_us:
            runs[k] = r  # ties: the earliest stored
    out: dict[tuple[str, str], MeasureResult] = {}
    for r in sorted(runs.values(), key=lambda r: (r.workload.name, r.workload.key, r.latency.median_us)):
        k = (r.workload.key, current(r).key)
        if k not in out and r.workload not in served and k[1] not in db.held(r.workload, target)[0]:
            out[k] = r
    return list(out.values())


def _measured(db: TuningDB, target: Target, op: str | None) -> list[MeasureResult]:
    """`target`'s verified records with a finite time measured there (an import counts by its
    re-verified copy), newest first."""
    return [r for _, r in db.iter_results(target_key=target.key, op=op, status="ok", origin="measured")
            if math.isfinite(r.latency.median_us)]


def _adopt(db: TuningDB, v: Verdict, foreign: MeasureResult, outcome: MeasureResult | str, run_id: str) -> None:
    """Store what re-verifying another target's (or an older version's) record here gave: the record
    measured here, or the failed result of its current version (its status from the outcome's prefix,
    else build_error), so it is not retried."""
    if isinstance(outcome, str):
        status = outcome.split(":", 1)[0]
        db.add_result(MeasureResult(foreign.workload, foreign.target, current(foreign),
                                    status if status in STATUSES and status != "ok" else "build_error",
                                    error=outcome[:2000], run_id=run_id))
        v.failed.append((foreign, outcome))
    elif db.add_result(outcome):
        v.passed, v.claimed_us = outcome, foreign.latency.median_us


def _decide(db: TuningDB, v: Verdict, record_id: int, imported: MeasureResult,
            outcome: MeasureResult | str) -> None:
    if isinstance(outcome, str):
        db.add_reverification(record_id, error=outcome, uid=imported.uid)
        v.failed.append((imported, outcome))
    elif db.add_reverification(record_id, measured=outcome, uid=imported.uid):
        v.passed, v.claimed_us = outcome, imported.latency.median_us


def _measure_vendor(db: TuningDB, runner: Runner, w: Workload, run_id: str) -> float:
    """Every vendor path, timed in this run as the tuner times them (dispatch compares within a
    run); returns the fastest (`vendor_us`)."""
    out = vendor_baselines(runner, w, run_id).values()
    for b in out:
        db.add_baseline(b)
    return min(vendor_us(b) for b in out)
