"""The batched warm-up (scheduler.task_scheduler, Tuner.tune_batch, Builder.build_many), on llvm with
real TVM: K cold tasks' candidates build in one pool batch and the cost model is fitted once for them,
the DB ends with what warming them one by one stores, and one failing task, build or candidate of a
batch leaves the others alone.

Pool batches are counted by `CountingPool`, an IsolatedPool whose run_all notes each batch's size,
swapped in for scheduler.builder.IsolatedPool as tests/conftest.py's `bad_templates` does; budgets
are counts of records (`_records_clock`, tests/scheduler/test_task_scheduler.py).
"""

from __future__ import annotations

import functools
import importlib
import sqlite3
from collections import Counter

import pytest

import scheduler.builder
import scheduler.tuner
from cost_model.xgb import XGBCostModel
from scheduler.isolation import IsolatedPool
from scheduler.runner import Runner, RunResult
from scheduler.task_scheduler import Task, schedule, warmup_size
from scheduler.tuner import TuneOptions, Tuner
from shapetune.db import TuningDB
from shapetune.ops.linear import linear_workload
from shapetune.target import detect

from .test_task_scheduler import _records_clock

# four small GEMMs, weighted so the warm-up order is theirs
WS = [linear_workload(16, n, 16, "float32", False) for n in (8, 16, 24, 32)]
WEIGHTS = {w: 40 - 10 * i for i, w in enumerate(WS)}
GOOD = TuneOptions(batch=4, seed=0, templates=("dlight", "gemm_llvm"))  # every candidate verifies
# dlight (ok), raising_gemm (a build error), wrong_gemm x2 (wrong output): 4 candidates, the warm-up's
BAD = TuneOptions(batch=4, seed=0, templates=("dlight", "raising_gemm", "wrong_gemm"))
WARMUP = 4 * len(WS)  # records of a warm-up of every task: the budget that ends right after it



class CountingPool(IsolatedPool):
    """An IsolatedPool that notes the size of every batch run_all is given (SIZES, class-wide: the
    Builder makes its own pool)."""

    SIZES: list[int] = []

    def run_all(self, fn, argsets, timeout_s):
        if fn is scheduler.builder.build_one:
            CountingPool.SIZES.append(len(argsets))
        return super().run_all(fn, argsets, timeout_s)


@pytest.fixture
def counted(bad_templates, monkeypatch):
    """Builder pools count their batches; their workers know tests/_bad_templates.py's templates."""
    CountingPool.SIZES = []
    monkeypatch.setattr(scheduler.builder, "IsolatedPool", functools.partial(
        CountingPool, initializer=importlib.import_module, initargs=(bad_templates.__name__,)))
    return CountingPool.SIZES


def _by_task(db) -> dict[str, Counter]:
    """Per workload name, its records' status counts."""
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT w.name, r.status FROM records r JOIN workloads w ON w.id = r.workload_id").fetchall()
    finally:
        con.close()
    out: dict[str, Counter] = {}
    for name, status in rows:
        out.setdefault(name, Counter())[status] += 1
    return out


def _warm_up(db, opts, k):
    return schedule(WEIGHTS, detect("llvm"), WARMUP, db, opts, warmup_tasks=k, clock=_records_clock(db))


# -- the batch size ----------------------------------------------------------------------------------
def test_warmup_size_fills_the_pool_within_the_budget():
    cold = [Task(w, space=100) for w in WS]
    assert warmup_size(cold, 16, 4, None, 100.0) == 4  # 16 builders, 4 candidates each
    assert warmup_size(cold, 2, 4, None, 100.0) == 1  # one task already fills 2 builders
    assert warmup_size(cold, 64, 4, None, 100.0) == 4  # no more than the cold tasks left
    assert warmup_size(cold, 16, 4, 10.0, 25.0) == 3  # 25 s left at 10 s a task: rounded up
    assert warmup_size(cold, 16, 4, 10.0, 0.5) == 1  # at least one
    small = [Task(w, space=1) for w in WS]  # one candidate each (--template dlight)
    assert warmup_size(small, 2, 4, None, 100.0) == 2
    small[0].trials = 1  # nothing untried: still one build slot's worth, not none
    assert warmup_size(small, 3, 4, None, 100.0) == 3


# -- one pool batch, the same records ----------------------------------------------------------------
@pytest.mark.parametrize("opts", [BAD, GOOD], ids=["status-mix", "all-ok"])
def test_a_batched_warm_up_stores_what_one_by_one_does_in_one_pool_batch(cheap, counted, tmp_path, opts):
    one = _warm_up(tmp_path / "one.db", opts, 1)
    assert counted == [4] * len(WS)  # one by one: a batch of 4 per task
    counted.clear()
    seen = []
    batched = schedule(WEIGHTS, detect("llvm"), WARMUP, tmp_path / "all.db", opts, warmup_tasks=len(WS),
                       clock=_records_clock(tmp_path / "all.db"), on_round=lambda t, s: seen.append(t.workload.name))
    assert counted == [4 * len(WS)]  # every task's candidates in ONE pool batch
    # the same warm-up order (priorities recomputed only between batches: here they agree), each task
    # reported as its own round
    assert batched.order == one.order == seen == [w.name for w in WS]
    for a, b in zip(one.tasks, batched.tasks):
        done = "exhausted" if opts is BAD else ""  # BAD's space is the warm-up's 4 candidates
        assert (a.rounds, a.measured, a.trials, a.done) == (b.rounds, b.measured, b.trials, b.done) == (1, 4, 4, done)
        assert b.vendor_us is not None and b.tuned_us is not None and len(b.round_s) == 1
    got = _by_task(tmp_path / "all.db")
    assert got == _by_task(tmp_path / "one.db")  # per task: as many records, the same status mix
    if opts is BAD:  # one failing build, two wrong kernels per task: the dlight default still verified
        assert all(c["ok"] == 1 and c["build_error"] == 1 and sum(c.values()) == 4 for c in got.values()), got


# -- the cost model is fitted once per batch ---------------------------------------------------------
class CountingModel(XGBCostModel):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.fits = 0

    def fit(self, results):
        self.fits += 1
        return super().fit(results)


def test_tune_batch_fits_the_cost_model_once_and_matches_tune(cheap, tmp_path):
    cpu, opts = detect("llvm"), TuneOptions(trials=1 << 20, batch=3, seed=0, templates=GOOD.templates)
    with TuningDB(tmp_path / "b.db") as db, Tuner(db, cpu, opts, model=CountingModel(seed=0)) as tuner:
        reps = tuner.tune_batch(WS[:3])
        assert tuner.model.fits == 1
        assert [r.measured for r in reps] == [3, 3, 3] and all(r.dlight is not None for r in reps)
        reps = tuner.tune_batch(WS[:3])  # the next batch sees the first one's records
        assert tuner.model.fits == 2 and [r.measured for r in reps] == [3, 3, 3]
        assert all(len({r.candidate.key for r in db.results(w.key)}) == 6 for w in WS[:3])
    with TuningDB(tmp_path / "t.db") as db, Tuner(db, cpu, opts, model=CountingModel(seed=0)) as tuner:
        reps = [tuner.tune(w, rounds=1) for w in WS[:3]]
        assert tuner.model.fits == 3 and [r.measured for r in reps] == [3, 3, 3]


# -- one failing task ---------------------------------------------------------------------------------
class FailingVendor(Runner):
    """A Runner whose vendor path fails on WS[1] (as a broken torch op would); all else is real."""

    def vendors(self, workload):
        out = super().vendors(workload)
        if workload == WS[1]:
            return {v: RunResult("runtime_error", error="deliberately broken vendor path") for v in out}
        return out


def test_a_failing_vendor_path_fails_its_task_alone(cheap, tmp_path):
    cpu = detect("llvm")
    with TuningDB(tmp_path / "t.db") as db, Tuner(db, cpu, TuneOptions(trials=1 << 20, batch=2, seed=0,
                                                  templates=GOOD.templates), runner=FailingVendor(cpu)) as tuner:
        reps = tuner.tune_batch(WS[:3])
        assert isinstance(reps[1], RuntimeError) and "deliberately broken" in str(reps[1])
        assert [reps[0].measured, reps[2].measured] == [2, 2]
        assert db.held(WS[1], cpu, GOOD.templates) == (set(), 0)  # no record, its claims released
        assert all(len(db.results(w.key)) == 2 for w in (WS[0], WS[2]))


def test_the_scheduler_marks_a_failed_task_and_warms_the_rest(cheap, tmp_path, monkeypatch):
    monkeypatch.setattr(scheduler.tuner, "Runner", FailingVendor)  # the Tuner's default runner
    db = tmp_path / "t.db"
    sched = schedule(WEIGHTS, detect("llvm"), WARMUP - 4, db, GOOD, warmup_tasks=len(WS), clock=_records_clock(db))
    by = {t.workload: t for t in sched.tasks}
    assert by[WS[1]].done.startswith("failed: vendor path") and by[WS[1]].measured == 0
    assert all(by[w].rounds == 1 and by[w].measured == 4 and not by[w].done for w in WS if w != WS[1])
    assert sched.order == [w.name for w in WS]  # a failed task's round is reported too
