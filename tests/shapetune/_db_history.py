"""The tuning history shared by the store and codec tests: two targets (H100, CPU), two linear
workloads (W1, W2), 8 records (5 ok, build_error, wrong_result, timeout) and 3 vendor baselines; the
`db` fixture is an empty TuningDB under tmp_path, `full` the same DB holding that history."""

import pytest

from shapetune.db import TuningDB
from shapetune.records import Candidate, LatencyStats, MeasureResult, VendorBaseline
from shapetune.target import Target
from shapetune.ops.linear import linear_workload

H100 = Target("cuda", "sm_90", "NVIDIA H100 80GB HBM3", 132, "0.27.0", "13.0", "2.11.0")
CPU = Target("llvm", "znver3", "AMD EPYC 7B13", 16, "0.27.0", "", "2.11.0")
W1 = linear_workload(8192, 320, 320)
W2 = linear_workload(1024, 1280, 320, bias=False)


def cand(tile=64, name="mma"):
    return Candidate(name, (("tile_m", tile), ("vec", "f16x8"), ("swizzle", True), ("stages", 3)))


def ok(w=W1, t=H100, us=10.0, tile=64, created=1.7e9, run="run-a"):
    lat = LatencyStats.of([us * 0.9, us, us * 1.3])
    return MeasureResult(w, t, cand(tile), "ok", lat, max_rel_err=1.25e-4, build_s=0.731,
                         run_id=run, created=created)


def failed(status="build_error", w=W1, t=H100, created=1.7e9 + 0.5):
    return MeasureResult(w, t, cand(999), status, None, error=f"{status}: boom\nline 2",
                         max_rel_err=0.5 if status == "wrong_result" else None, created=created)


def base(w=W1, t=H100, us=12.0, created=1.7e9 + 0.25):
    return VendorBaseline(w, t, "torch.nn.functional.linear", LatencyStats.of([us, us + 1]),
                          run_id="run-a", created=created)


def history():
    rs = [ok(us=10.0, tile=64), ok(us=7.5, tile=128, created=1.7e9 + 1.123456789),
          ok(us=9.0, tile=32, created=1.7e9 + 2), failed(), failed("wrong_result", created=1.7e9 + 0.6),
          failed("timeout", created=1.7e9 + 0.7), ok(W2, us=3.0, created=1.7e9 + 3), ok(t=CPU, us=400.0)]
    bs = [base(), base(us=11.0, created=1.7e9 + 5), base(W2, us=4.0)]
    return rs, bs


@pytest.fixture
def db(tmp_path):
    with TuningDB(tmp_path / "sub" / "t.db") as d:
        yield d


@pytest.fixture
def full(db):
    rs, bs = history()
    db.add_results(rs)
    for b in bs:
        db.add_baseline(b)
    return db
