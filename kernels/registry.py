"""Registry: (op, shape, dtype, device) -> the best verified kernel for this target, or a fallback.

Resolution, once per distinct call signature (then cached; the ops' per-call plans, kernels.dispatch.plan,
live here too, so clearing or swapping the registry drops them):
  signature -> workload -> its exact records, else its shape bucket's (shapetune.buckets) ->
  `Registry.dispatch`: each tuning run's fastest verified record, compared with the fastest vendor
  path measured in THE SAME run (an in-memory index of the DB); the fastest record that beats its
  run's vendor by MARGIN is served (a run whose record beat its first vendor timing timed the vendor
  once more, scheduler.tuner and scheduler.reverify, so one disturbed timing is outvoted here) ->
  load the compiled module from the kernel cache (keyed by target: arch, GPU, versions), building
  it from the record's knobs on a miss.
Anything that stops a tuned kernel from running (no record, vendor faster, no vendor timed in the
record's run, stale target, records of another version of the template or op definition only, build
or load failure, SHAPETUNE_DISABLE=1) is a *fallback*: the op runs PyTorch's own implementation and
the reason is counted. `fallback_summary()` reports the counts; one line is logged at exit.

Serving from a pack (kernels.pack: `load_pack(path)` or SHAPETUNE_PACK=path): the pack's DB, and its
artifacts only, checked against its manifest; nothing is built.
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import os
import sqlite3
import threading
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from shapetune import config
from shapetune.buckets import DEFAULT, BucketPolicy
from shapetune.db.errors import DBError
from shapetune.records import MeasureResult, VendorBaseline
from shapetune.serving import MARGIN, UNSTABLE, servable, vendor_us  # noqa: F401 (the rule, importable here)
from shapetune.target import Target, detect
from shapetune.workload import Workload

log = logging.getLogger("shapetune")

@dataclass(frozen=True)
class _Index:
    """This target's DB in memory. Keyed by the Workload value itself: hashing its fields is
    cheaper than its key."""

    runs: dict[Workload, dict[str, MeasureResult]]  # workload -> run id -> its fastest verified record
    vendors: dict[tuple[Workload, str], VendorBaseline]  # (workload, run id) -> its fastest vendor path
    stale: dict[Workload, MeasureResult]  # workload -> its fastest verified record of another version


@dataclass(frozen=True)
class Resolution:
    """What a call signature resolves to: a kernel, or the reason there is none."""

    workload: Workload
    kind: str  # "exact" | "bucket" | "fallback"
    reason: str  # human-readable, with numbers
    fn: Callable | None = None
    record: MeasureResult | None = None
    vendor: VendorBaseline | None = None
    bucket: Workload | None = None
    cause: str = "tuned"  # short, countable: tuned | disabled | no_db | not_tuned | stale | all_failed
    #                       | unverified | stale_version | outside_buckets | vendor_faster | no_baseline | load_failed
    #                       | db_unreadable | pack_target | pack_missing | pack_mismatch | pack_unreadable


class Registry:
    def __init__(self, db_path: str | Path | None = None, target: Target | None = None,
                 policy: BucketPolicy | None = None, require_faster: bool = True, pack=None):
        """require_faster=False uses a tuned kernel even where the vendor path measured faster
        (tests, and benchmarks of the tuned kernel itself). pack: a kernels.pack.Pack to serve
        from (its DB replaces db_path)."""
        self.pack = pack
        if pack is not None:
            db_path = pack.db_path
        self.db_path = Path(db_path) if db_path else None
        self.require_faster = require_faster
        self._target = target
        self.policy = policy or DEFAULT
        self._cache: dict[Any, Resolution] = {}
        # The ops' per-call plans (kernels.dispatch.plan): a call's metadata key -> what it resolved
        # to. Cleared with _cache; a new registry starts without any.
        self.plans: dict[Any, tuple] = {}
        self._index: _Index | None = None
        self._lock = threading.Lock()
        self.calls: Counter = Counter()  # (op, "tuned" | fallback reason)
        self._db_error: str | None = None  # why the DB could not be read, once it could not
        self.refusal: tuple[str, str] | None = None  # (cause, reason) that every call falls back with

    @property
    def target(self) -> Target:
        if self._target is None:
            self._target = self._detect()
        return self._target

    def _detect(self) -> Target:
        """This machine's target. Serving a pack, one that cannot be detected (runtime-only TVM cannot
        name an llvm CPU) is the pack's, with every call falling back ("pack_target"): never a crash,
        never a kernel for another machine."""
        if self.pack is None:
            return detect()
        try:
            return detect()
        except (AttributeError, RuntimeError, ValueError) as e:
            why = (str(e).splitlines() or [type(e).__name__])[0][:200]
            self.refusal = ("pack_target", f"cannot detect this machine's target to check pack "
                            f"{self.pack.path} against ({why})")
            log.warning("shapetune: %s; every op runs torch's path", self.refusal[1])
            return self.pack.target

    def _db(self):
        from shapetune.db import TuningDB

        path = self.db_path or config.default_db_path()
        return TuningDB(path, create=False) if Path(path).exists() else None

    # -- resolution ---------------------------------------------------------------------------------
    def _load_index(self) -> _Index | None:
        """Each run's fastest verified record (measured here: imports count once re-verified; of the
        current version of its template and op definition, Candidate.version, the others kept apart
        as stale) and fastest vendor baseline, per workload of this target, in memory: a new shape
        then resolves with dict lookups, no DB query."""
        if self._index is None:
            from scheduler.templates import current_version

            version = functools.cache(current_version)
            db = self._db()
            if db is None:
                return None
            with db:
                key = self.target.key
                # measured here, in the one query (a second one by row id could meet other records: prune)
                rows = db.iter_results(target_key=key, status="ok", origin="measured")
                runs: dict[Workload, dict[str, MeasureResult]] = {}
                stale: dict[Workload, MeasureResult] = {}
                for _, r in reversed(rows):  # oldest first: ties go to the earliest stored
                    us = r.latency.median_us
                    if not math.isfinite(us):
                        continue
                    if r.candidate.version != version(r.candidate.template, r.workload.op):  # never served
                        if r.workload not in stale or us < stale[r.workload].latency.median_us:
                            stale[r.workload] = r
                        continue
                    best = runs.setdefault(r.workload, {}).get(r.run_id)
                    if best is None or us < best.latency.median_us:
                        runs[r.workload][r.run_id] = r
                vendors: dict[tuple[Workload, str], VendorBaseline] = {}
                for b in db.baselines(target_key=key):
                    v = vendors.get((b.workload, b.run_id))
                    if v is None or vendor_us(b) < vendor_us(v):
                        vendors[(b.workload, b.run_id)] = b
            self._index = _Index(runs, vendors, stale)
        return self._index

    def resolve(self, w: Workload) -> Resolution:
        """Uncached resolution: exact records, else the shape bucket's, through `dispatch`; else a
        fallback with its reason (also what `shapetune db best OP --shape` reports)."""
        if config.disabled():
            return Resolution(w, "fallback", "disabled by SHAPETUNE_DISABLE=1", cause="disabled")
        index = self._load_index()
        if index is None:
            return Resolution(w, "fallback", f"no tuning DB at {self.db_path or config.default_db_path()}",
                              cause="no_db")
        bucket, kind = w, "exact"
        if w not in index.runs:
            bucket, kind = self.policy.bucket_of(w), "bucket"
            if bucket is None:
                return Resolution(w, "fallback", f"shape outside every {self.policy.name} bucket",
                                  cause="outside_buckets")
        if bucket not in index.runs:
            with self._db() as db:
                cause, why = self._why_missing(db, w, bucket)
            return Resolution(w, "fallback", why, bucket=bucket, cause=cause)
        return self.dispatch(w, bucket, kind)

    def dispatch(self, w: Workload, tuned: Workload | None = None, kind: str = "exact") -> Resolution:
        """What runs for shape `w` given the records of workload `tuned` (w itself, or its bucket),
        which has verified records: the one rule `resolve` and `prebuild` share.

        Each run's fastest record is compared with the fastest vendor path timed in that run (over
        the op's vendor variants: the patched model would otherwise run one of them, and the
        fastest is the conservative yardstick). The fastest record with
        ``servable(tuned_us, vendor_us(baseline))`` is served. A run that timed no vendor proves
        nothing: with no other run to go by, the cause is "no_baseline". require_faster=False serves the
        fastest record, compared with nothing.
        """
        index = self._load_index()
        tuned = tuned or w
        recs = sorted(index.runs[tuned].values(), key=lambda r: (r.latency.median_us, r.created))
        where = "exact shape" if kind == "exact" else f"bucket {tuned.name}"
        pairs = [(r, index.vendors[(tuned, r.run_id)]) for r in recs if (tuned, r.run_id) in index.vendors]
        if not self.require_faster:
            r = recs[0]
            return Resolution(w, kind, f"{kind} hit ({where}): tuned {r.latency.median_us:.2f} us, run "
                              f"{r.run_id} (require_faster=False: vendor not compared)",
                              record=r, vendor=index.vendors.get((tuned, r.run_id)), bucket=tuned)
        wins = [(r, v) for r, v in pairs if servable(r.latency.median_us, vendor_us(v))]
        unproven = len(recs) - len(pairs)
        if wins:
            r, v = wins[0]
            why = f"{kind} hit ({where}): {_versus(r, v)}"
            if r is not recs[0]:
                why += (f"; the faster {recs[0].latency.median_us:.2f} us of run {recs[0].run_id} is "
                        f"not proven faster in its own run")
            return Resolution(w, kind, why, record=r, vendor=v, bucket=tuned)
        if pairs:
            r, v = pairs[0]
            why = (f"vendor faster at {where}: {_versus(r, v)}; serving needs tuned <= "
                   f"{vendor_us(v) / (1 + MARGIN):.2f} us"
                   + (f"; {unproven} more run(s) timed no vendor" if unproven else ""))
            return Resolution(w, "fallback", why, record=r, vendor=v, bucket=tuned, cause="vendor_faster")
        r = recs[0]
        return Resolution(w, "fallback",
                          f"not proven faster at {where}: fastest tuned {r.latency.median_us:.2f} us "
                          f"(run {r.run_id}), but no run of its records timed the vendor path (retune: "
                          f"the tuner times both in one run)", record=r, bucket=tuned, cause="no_baseline")

    def _why_missing(self, db, w: Workload, bucket: Workload) -> tuple[str, str]:
        if any(db.pending(self.target.key, workload_key=x.key) for x in (w, bucket)):
            return "unverified", ("imported, not yet re-verified on this target: run `shapetune db verify` "
                                  "(or `shapetune prebuild`)")
        old = self._index.stale.get(w) or self._index.stale.get(bucket)
        if old is not None:
            from scheduler.templates import current_version

            now = current_version(old.candidate.template, old.workload.op)
            return "stale_version", (f"stale: tuned only with another version of its code ({old.candidate}, "
                                     f"version {old.candidate.version or '1.1'}; this code's is {now or '1.1'}): "
                                     f"`shapetune db verify` (or `shapetune prebuild`) re-verifies and re-times "
                                     f"it as this version")
        others = [t for t in db.targets() if t.key != self.target.key
                  and t.kind == self.target.kind and t.arch == self.target.arch
                  and (db.best(w.key, t.key, include_pending=True)
                       or db.best(bucket.key, t.key, include_pending=True)) is not None]
        if others:
            t = others[0]
            if self.target.shares_kernels_with(t):
                return "stale", (f"stale: only tuned for another target: {'; '.join(self.target.differences(t))}; "
                                 f"its kernels are the same here: `shapetune db verify` (or `shapetune prebuild`) "
                                 f"re-verifies and re-times them on this target")
            return "stale", (f"stale: only tuned for another target: {'; '.join(self.target.differences(t))} "
                             f"(records from another GPU architecture or TVM/CUDA version are never used)")
        if any(db.results(workload_key=x.key, target_key=self.target.key, limit=1) for x in (w, bucket)):
            return "all_failed", "no verified kernel (every measured candidate failed)"
        return "not_tuned", f"not tuned (neither the exact shape nor bucket {bucket.name})"

    def lookup(self, sig: tuple, make_workload: Callable[[], Workload]) -> Resolution:
        """Cached per call signature; builds/loads the kernel on first use. Serving never fails
        because of the DB: an unreadable one (corrupt, truncated, not SQLite, another schema
        version, a directory) resolves every call to torch's op, cause "db_unreadable", with one
        warning per registry."""
        res = self._cache.get(sig)
        if res is not None:
            return res
        with self._lock:
            res = self._cache.get(sig)
            if res is None:
                w = make_workload()
                res = self._load(self._resolve_serving(w))
                self._cache[sig] = res
        return res

    def _resolve_serving(self, w: Workload) -> Resolution:
        if self.refusal is None and self.pack is not None and self.pack.target_key != self.target.key:
            self.refusal = ("pack_target", f"pack {self.pack.path} is for {self.pack.target_description} "
                            f"(key {self.pack.target_key}), not this machine's target key {self.target.key}")
            log.warning("shapetune: %s; every op runs torch's path", self.refusal[1])
        if self.refusal is not None:
            return Resolution(w, "fallback", self.refusal[1], cause=self.refusal[0])
        if self._db_error is None:
            try:
                return self.resolve(w)
            except (DBError, sqlite3.Error, OSError) as e:
                self._db_error = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                log.warning("shapetune: tuning DB %s unreadable (%s); every op runs torch's path",
                            self.db_path or config.default_db_path(), self._db_error)
        return Resolution(w, "fallback", f"tuning DB unreadable: {self._db_error}", cause="db_unreadable")

    def _load(self, res: Resolution) -> Resolution:
        if res.record is None or res.kind == "fallback":
            return res
        try:
            if self.pack is not None:
                fn = self.pack.load(res.record, self.target.is_gpu)
            else:
                fn = load_kernel(res.bucket or res.workload, self.target, res.record)
        except Exception as e:  # a record we cannot build or load here: fall back, loudly counted
            msg = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
            log.warning("shapetune: cannot load tuned kernel for %s: %s", res.workload.name, msg)
            return Resolution(res.workload, "fallback", f"load failed: {msg}", record=res.record,
                              vendor=res.vendor, bucket=res.bucket, cause=getattr(e, "cause", "load_failed"))
        return Resolution(res.workload, res.kind, res.reason, fn, res.record, res.vendor, res.bucket)

    def prebuild(self, jobs: int | None = None, timeout_s: float = 600,
                 keys: Collection[str] | None = None) -> dict[str, int]:
        """Re-verify this target's pending imports first, and its records of an older template or op
        version and the other targets' portable ones (scheduler.reverify, as `shapetune db
        verify`; with require_faster only the claims that beat the vendor path in their own run,
        the ones this registry could serve), then build every kernel this registry would dispatch to
        (each workload's best record, where it beats the vendor path if require_faster) into the
        kernel cache, in parallel isolated processes, so no call builds one on first use. keys: only
        these workloads (a model's shapes and their buckets: scheduler.extract.workload_keys).
        Returns {"reverified", "reverify_failed" (imported records), "cached", "built", "failed"}."""
        from scheduler.builder import artifact_name, build_one
        from scheduler.isolation import IsolatedPool
        from scheduler.reverify import reverify

        out = {"reverified": 0, "reverify_failed": 0, "cached": 0, "built": 0, "failed": 0}
        db = self._db()
        if db is None:
            return out
        db.close()
        for v in reverify(self.db_path or config.default_db_path(), self.target, jobs=jobs, keys=keys,
                          servable_only=self.require_faster):
            out["reverified"] += v.passed is not None
            out["reverify_failed"] += len(v.failed)
        with self._lock:
            self._index = None  # what passed is served now
            self._cache.clear()
            self.plans.clear()
        cache = config.kernel_cache_dir(self.target.key)
        todo = []
        for res in self.served():
            w, rec = res.workload, res.record
            if keys is not None and w.key not in keys:
                continue
            if (cache / artifact_name(w, rec.candidate)).exists():
                out["cached"] += 1
            else:
                todo.append((w.to_json(), self.target.to_json(), rec.candidate.to_json(), str(cache)))
        if todo:
            cache.mkdir(parents=True, exist_ok=True)
            with IsolatedPool(jobs or config.build_jobs()) as pool:
                for r in pool.run_all(build_one, todo, timeout_s):
                    out["failed" if isinstance(r, BaseException) else "built"] += 1
        return out

    def served(self) -> list[Resolution]:
        """What `dispatch` serves per tuned workload (exact shape or bucket) of this target's DB:
        what prebuild builds and a pack holds."""
        index = self._load_index()
        if index is None:
            return []
        return [res for res in map(self.dispatch, index.runs) if res.kind != "fallback"]

    def clear(self):
        """Forget resolutions, counts and the DB index (e.g. after tuning more in this process)."""
        with self._lock:
            self._cache.clear()
            self.plans.clear()
            self._index = None
            self.calls.clear()


def _versus(r: MeasureResult, v: VendorBaseline) -> str:
    us = vendor_us(v)
    disturbed = "" if us == v.latency.median_us else (
        f" (its fastest sample: the median {v.latency.median_us:.2f} us is over {UNSTABLE}x that, a "
        f"disturbed timing)")
    return (f"tuned {r.latency.median_us:.2f} us vs vendor {v.name} {us:.2f} us{disturbed}, both in "
            f"run {r.run_id} (margin {MARGIN:.0%})")


def load_kernel(w: Workload, target: Target, record: MeasureResult) -> Callable:
    """The compiled function of a record: from the kernel cache, or built (once) into it."""
    from scheduler.builder import artifact_name, build_one

    from scheduler.loader import load_function

    cache = config.kernel_cache_dir(target.key)
    path = cache / artifact_name(w, record.candidate)
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        build_one(w.to_json(), target.to_json(), record.candidate.to_json(), str(cache))
    return load_function(str(path), target.is_gpu)


# -- the process-wide registry ------------------------------------------------------------------------
_registry: Registry | None = None


PACK_ENV = "SHAPETUNE_PACK"  # path of a pack (kernels.pack) the process-wide registry serves from


def get_registry() -> Registry:
    global _registry
    if _registry is None:
        _registry = _from_env()
    return _registry


def _from_env() -> Registry:
    """Registry() on the tuning DB, or on the pack SHAPETUNE_PACK names; a pack that cannot be read
    makes every call fall back ("pack_unreadable"), with one warning, never the DB's kernels."""
    path = os.environ.get(PACK_ENV)
    if not path:
        return Registry()
    from .pack import Pack, PackError

    try:
        return Registry(pack=Pack(path))
    except PackError as e:
        log.warning("shapetune: %s=%s unusable: %s; every op runs torch's path", PACK_ENV, path, e)
        reg = Registry()
        reg.refusal = ("pack_unreadable", f"pack unusable: {e}")
        return reg


def set_registry(reg: Registry | None) -> Registry | None:
    """Swap the process-wide registry (e.g. to point at another DB); returns the previous one."""
    global _registry
    prev, _registry = _registry, reg
    return prev


def fallback_summary() -> dict[str, dict[str, int]]:
    """{op: {"tuned": n, "<fallback cause>": n, ...}} over every call so far
    (`Registry.resolve` gives the full reason for one shape)."""
    out: dict[str, dict[str, int]] = {}
    if _registry is not None:
        for (op, why), n in _registry.calls.items():
            out.setdefault(op, {})[why] = n
    return out


@atexit.register
def _log_summary():
    s = fallback_summary()
    fell = {op: {k: v for k, v in d.items() if k != "tuned"} for op, d in s.items()}
    if any(fell.values()):
        log.info("shapetune: calls per op and outcome: %s", s)
