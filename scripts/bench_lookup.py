"""Registry lookup cost on the CPU: call signature -> bucket -> kernel, per call.

    python scripts/bench_lookup.py [--json out.json]

Measures (a) the per-call-site cached path the op takes on every call, and (b) the first call of
a new shape whose bucket is tuned (in-memory index, no DB query), against an empty Python call
measured in the same run. Budget (BlaDNN's figure): <= 2 us for (a).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.registry import Registry  # noqa: E402
from scheduler.templates import current_version  # noqa: E402
from shapetune.buckets import DEFAULT  # noqa: E402
from shapetune.db import TuningDB  # noqa: E402
from shapetune.records import Candidate, LatencyStats, MeasureResult  # noqa: E402
from shapetune.target import detect  # noqa: E402
from shapetune.ops.linear import linear_workload  # noqa: E402


def per_call_ns(fn, n: int) -> float:
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter_ns() - t0) / n)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    target = detect("llvm")
    with tempfile.TemporaryDirectory() as tmp:
        db_path = Path(tmp) / "t.db"
        with TuningDB(db_path) as db:  # one tuned bucket record: enough to resolve against
            b = DEFAULT.bucket_of(linear_workload(3000, 320, 320, "float32", False))
            cand = Candidate("gemm_llvm", (("tm", 4),), current_version("gemm_llvm", "linear"))  # served: this version's
            db.add_result(MeasureResult(b, target, cand, "ok", LatencyStats.of([10.0]), created=time.time()))
        reg = Registry(db_path, target, require_faster=False)
        reg._load = lambda res: res  # measure resolution, not module loading
        sig = ("linear", 3000, 320, 320, "float32", False, "cpu")
        make = lambda: linear_workload(3000, 320, 320, "float32", False)  # noqa: E731
        reg.lookup(sig, make)
        cached = per_call_ns(lambda: reg.lookup(sig, make), 200_000)
        empty = per_call_ns(lambda: None, 200_000)
        ms = iter(range(2049, 4097))  # every m of the bucket, each a first call

        def first_call():
            m = next(ms)
            reg.lookup(("linear", m, 320, 320, "float32", False, "cpu"),
                       lambda: linear_workload(m, 320, 320, "float32", False))

        first = per_call_ns(first_call, 400)
        kinds = {reg._cache[("linear", m, 320, 320, "float32", False, "cpu")].kind for m in range(2049, 2449)}
    out = {"cached_lookup_ns": cached, "empty_call_ns": empty, "first_call_new_shape_ns": first,
           "resolution_kinds": sorted(kinds), "budget_ns": 2000}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    print(f"cached lookup (every call):      {cached:8.0f} ns   (empty Python call {empty:.0f} ns; budget 2000 ns)")
    print(f"first call of a new shape:       {first:8.0f} ns   (bucket resolution from the in-memory index)")
    print(f"resolved as: {sorted(kinds)}")


if __name__ == "__main__":
    main()
