"""Registry: (op, shape, dtype, device) -> the best verified kernel for this target, or a fallback.

Resolution, once per distinct call signature (then cached, so the hot path is one dict lookup):
  signature -> workload -> its exact record, else its shape bucket's (shapetune.buckets) -> best
  verified record for this target (an in-memory index of the DB) -> compare with the vendor
  baseline measured in the same run ->
  load the compiled module from the kernel cache (keyed by target: arch, GPU, versions), building
  it from the record's knobs on a miss.
Anything that stops a tuned kernel from running (no record, vendor faster, stale target, build or
load failure, SHAPETUNE_DISABLE=1) is a *fallback*: the op runs PyTorch's own implementation and the
reason is counted. `fallback_summary()` reports the counts; one line is logged at exit.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from shapetune import config
from shapetune.buckets import DEFAULT, BucketPolicy
from shapetune.records import MeasureResult, VendorBaseline
from shapetune.target import Target, detect
from shapetune.workload import Workload

log = logging.getLogger("shapetune")


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
    #                       | unverified | outside_buckets | vendor_faster | load_failed


class Registry:
    def __init__(self, db_path: str | Path | None = None, target: Target | None = None,
                 policy: BucketPolicy | None = None, require_faster: bool = True):
        """require_faster=False uses a tuned kernel even where the vendor path measured faster
        (tests, and benchmarks of the tuned kernel itself)."""
        self.db_path = Path(db_path) if db_path else None
        self.require_faster = require_faster
        self._target = target
        self.policy = policy or DEFAULT
        self._cache: dict[Any, Resolution] = {}
        self._index: tuple[dict, dict] | None = None  # best record / vendor baseline per workload
        self._lock = threading.Lock()
        self.calls: Counter = Counter()  # (op, "tuned" | fallback reason)

    @property
    def target(self) -> Target:
        if self._target is None:
            self._target = detect()
        return self._target

    def _db(self):
        from shapetune.db import TuningDB

        path = self.db_path or config.default_db_path()
        return TuningDB(path, create=False) if Path(path).exists() else None

    # -- resolution ---------------------------------------------------------------------------------
    def _load_index(self) -> tuple[dict, dict] | None:
        """Every best verified record and newest vendor baseline for this target, in memory: a
        new shape then resolves with dict lookups, no DB query."""
        if self._index is None:
            db = self._db()
            if db is None:
                return None
            with db:
                # Keyed by the Workload value itself: hashing its fields is cheaper than its key.
                best = {r.workload: r for r in db.best_all(target_key=self.target.key)}
                vendor = {}
                for b in db.baselines(target_key=self.target.key):  # newest first
                    vendor.setdefault(b.workload, b)
            self._index = (best, vendor)
        return self._index

    def resolve(self, w: Workload) -> Resolution:
        """Uncached resolution: exact record, else the shape bucket's, else a fallback with its
        reason (also what `shapetune db best OP --shape` reports)."""
        if config.disabled():
            return Resolution(w, "fallback", "disabled by SHAPETUNE_DISABLE=1", cause="disabled")
        index = self._load_index()
        if index is None:
            return Resolution(w, "fallback", f"no tuning DB at {self.db_path or config.default_db_path()}",
                              cause="no_db")
        best, vendors = index
        bucket, kind = w, "exact"
        if w not in best:
            bucket, kind = self.policy.bucket_of(w), "bucket"
            if bucket is None:
                return Resolution(w, "fallback", f"shape outside every {self.policy.name} bucket",
                                  cause="outside_buckets")
        rec, vendor = best.get(bucket), vendors.get(bucket)
        if rec is None:
            with self._db() as db:
                cause, why = self._why_missing(db, w, bucket)
            return Resolution(w, "fallback", why, vendor=vendor, bucket=bucket, cause=cause)
        where = "exact shape" if kind == "exact" else f"bucket {bucket.name}"
        if self.require_faster and vendor is not None and vendor.latency.median_us <= rec.latency.median_us:
            return Resolution(w, "fallback",
                              f"vendor faster at {where} ({vendor.latency.median_us:.2f} us vs tuned "
                              f"{rec.latency.median_us:.2f} us)", record=rec, vendor=vendor, bucket=bucket,
                              cause="vendor_faster")
        why = (f"{kind} hit ({where}): tuned {rec.latency.median_us:.2f} us"
               + (f" vs vendor {vendor.latency.median_us:.2f} us" if vendor else " (no vendor baseline)"))
        return Resolution(w, kind, why, record=rec, vendor=vendor, bucket=bucket)

    def _why_missing(self, db, w: Workload, bucket: Workload) -> tuple[str, str]:
        if any(db.pending(self.target.key, workload_key=x.key) for x in (w, bucket)):
            return "unverified", ("imported, not yet re-verified on this target: run `shapetune db verify` "
                                  "(or `shapetune prebuild`)")
        others = [t for t in db.targets() if t.key != self.target.key
                  and t.kind == self.target.kind and t.arch == self.target.arch
                  and (db.best(w.key, t.key, include_pending=True)
                       or db.best(bucket.key, t.key, include_pending=True)) is not None]
        if others:
            t = others[0]
            return "stale", (f"stale: only tuned for {t.describe()}; running {self.target.describe()} "
                             f"(records from another GPU or TVM/CUDA/torch version are never used)")
        if any(db.results(workload_key=x.key, target_key=self.target.key, limit=1) for x in (w, bucket)):
            return "all_failed", "no verified kernel (every measured candidate failed)"
        return "not_tuned", f"not tuned (neither the exact shape nor bucket {bucket.name})"

    def lookup(self, sig: tuple, make_workload: Callable[[], Workload]) -> Resolution:
        """Cached per call signature; builds/loads the kernel on first use."""
        res = self._cache.get(sig)
        if res is not None:
            return res
        with self._lock:
            res = self._cache.get(sig)
            if res is None:
                res = self._load(self.resolve(make_workload()))
                self._cache[sig] = res
        return res

    def _load(self, res: Resolution) -> Resolution:
        if res.record is None or res.kind == "fallback":
            return res
        try:
            fn = load_kernel(res.bucket or res.workload, self.target, res.record)
        except Exception as e:  # a record we cannot build or load here: fall back, loudly counted
            msg = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
            log.warning("shapetune: cannot load tuned kernel for %s: %s", res.workload.name, msg)
            return Resolution(res.workload, "fallback", f"load failed: {msg}", record=res.record,
                              vendor=res.vendor, bucket=res.bucket, cause="load_failed")
        return Resolution(res.workload, res.kind, res.reason, fn, res.record, res.vendor, res.bucket)

    def prebuild(self, jobs: int | None = None, timeout_s: float = 600) -> dict[str, int]:
        """Re-verify this target's pending imports first (scheduler.reverify, as `shapetune db
        verify`), then build every kernel this registry would dispatch to (each workload's best
        record, where it beats the vendor path if require_faster) into the kernel cache, in parallel
        isolated processes, so no call builds one on first use. Returns {"reverified",
        "reverify_failed" (imported records), "cached", "built", "failed"}."""
        from scheduler.builder import artifact_name, build_one, preload_for
        from scheduler.isolation import IsolatedPool
        from scheduler.reverify import reverify

        out = {"reverified": 0, "reverify_failed": 0, "cached": 0, "built": 0, "failed": 0}
        db = self._db()
        if db is None:
            return out
        db.close()
        for v in reverify(self.db_path or config.default_db_path(), self.target, jobs=jobs):
            out["reverified"] += v.passed is not None
            out["reverify_failed"] += len(v.failed)
        with self._lock:
            self._index = None  # what passed is served now
            self._cache.clear()
        index = self._load_index()
        if index is None:
            return out
        best, vendors = index
        cache = config.kernel_cache_dir(self.target.key)
        todo = []
        for w, rec in best.items():
            v = vendors.get(w)
            if self.require_faster and v is not None and v.latency.median_us <= rec.latency.median_us:
                continue
            if (cache / artifact_name(w, rec.candidate)).exists():
                out["cached"] += 1
            else:
                todo.append((w.to_json(), self.target.to_json(), rec.candidate.to_json(), str(cache)))
        if todo:
            cache.mkdir(parents=True, exist_ok=True)
            pool = IsolatedPool(jobs or config.build_jobs(), preload=preload_for(self.target))
            try:
                for r in pool.run_all(build_one, todo, timeout_s):
                    out["failed" if isinstance(r, BaseException) else "built"] += 1
            finally:
                pool.close()
        return out

    def count(self, op: str, res: Resolution):
        self.calls[(op, "tuned" if res.fn is not None else res.cause)] += 1

    def clear(self):
        """Forget resolutions, counts and the DB index (e.g. after tuning more in this process)."""
        with self._lock:
            self._cache.clear()
            self._index = None
            self.calls.clear()


def load_kernel(w: Workload, target: Target, record: MeasureResult) -> Callable:
    """The compiled function of a record: from the kernel cache, or built (once) into it."""
    from scheduler.builder import artifact_name, build_one

    from .runtime import load_function

    cache = config.kernel_cache_dir(target.key)
    path = cache / artifact_name(w, record.candidate)
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        build_one(w.to_json(), target.to_json(), record.candidate.to_json(), str(cache))
    return load_function(str(path), target.is_gpu)


# -- the process-wide registry ------------------------------------------------------------------------
_registry: Registry | None = None


def get_registry() -> Registry:
    global _registry
    if _registry is None:
        _registry = Registry()
    return _registry


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
