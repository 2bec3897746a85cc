"""The task scheduler (scheduler.task_scheduler): its allocation rule on synthetic task states, a real
llvm run of three tiny GEMMs weighted 100 : 1 : 1 under a small budget, its resumption from the DB,
and `shapetune tune --budget`."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path
from dataclasses import replace

import pytest
from click.testing import CliRunner

from scheduler.task_scheduler import (FLOOR, NO_CAP, ROOFLINE, Schedule, Task, cold_priority, gain_rate, op_headroom,
                                      parse_budget, priority, refresh, roofline_us, schedule)
from scheduler.tuner import TuneOptions, Tuner, search_space
from shapetune.cli import main
from shapetune.db import TuningDB
from shapetune.ops.linear import linear_workload
from shapetune.serving import vendor_us
from shapetune.target import detect

HEAVY = linear_workload(64, 64, 16, "float32", False)  # the largest space of the three (69 cheap candidates)
LIGHT = (linear_workload(16, 8, 16, "float32", False), linear_workload(16, 16, 8, "float32", False))
WEIGHTS = {HEAVY: 100, LIGHT[0]: 1, LIGHT[1]: 1}
BUDGET_S = 20.0  # seconds of the records clock: one candidate each
OPTS = TuneOptions(batch=4, seed=0, templates=("dlight", "gemm_llvm"))


# -- the rule, on synthetic states -------------------------------------------------------------------
def _simulate(tasks: list[Task], rounds: int, batch: int = 4, gains=(0.3, 0.1, 0.05, 0.0)) -> dict[str, int]:
    """Give `rounds` rounds by `priority`; each task's k-th round takes gains[k] off its time (the same
    for every task, so only weight x time tells them apart) in 1 s. Returns rounds per task."""
    for t in tasks:
        t.round_s = [(1.0, batch)]
    for _ in range(rounds):
        t = max(tasks, key=lambda t: priority(t, tasks, batch))
        g = gains[min(t.rounds, len(gains) - 1)]
        t.served_us *= 1 - g
        t.last_gain, t.rounds, t.trials = g, t.rounds + 1, t.trials + batch
        t.round_s.append((1.0, batch))
    return {t.workload.name: t.rounds for t in tasks}


def _task(w, weight, us):
    return Task(w, weight, space=1000, trials=4, vendor_us=us, tuned_us=us, served_us=us, last_gain=0.3)


def test_more_rounds_go_where_weight_x_time_is_larger_all_else_equal():
    heavy, a, b = _task(HEAVY, 100, 10.0), _task(LIGHT[0], 1, 10.0), _task(LIGHT[1], 1, 10.0)
    got = _simulate([heavy, a, b], 12)
    assert got[HEAVY.name] == 12 and got[LIGHT[0].name] == got[LIGHT[1].name] == 0, got
    # the product counts, not the weight alone: 100 calls of 0.01 us weigh less than 1 call of 10 us
    tiny, a = _task(HEAVY, 100, 0.01), _task(LIGHT[0], 1, 10.0)
    got = _simulate([tiny, a], 6)
    assert got[LIGHT[0].name] > got[HEAVY.name], got


def test_equal_tasks_share_rounds_and_a_stalled_search_yields():
    ts = [_task(w, 1, 10.0) for w in (HEAVY, *LIGHT)]
    got = _simulate(ts, 9)
    assert sorted(got.values()) == [3, 3, 3], got  # the forward term spreads rounds before piling on
    # equal cost; one search stalled (no gain over its last round), the other still improving
    stalled, going = _task(HEAVY, 1, 10.0), _task(LIGHT[0], 1, 10.0)
    stalled.last_gain, stalled.trials, going.trials = 0.0, 40, 40
    assert priority(going, [stalled, going], 4) > priority(stalled, [stalled, going], 4)
    # the floor: a search stalled for many rounds still has a positive rate
    assert gain_rate(1, 10.0, 0.0, 1e6, 1.0) == pytest.approx(10.0 * 0.02)


def test_a_slow_round_lowers_the_rate():
    assert gain_rate(1, 10.0, 0.1, 2, 1.0) == pytest.approx(4 * gain_rate(1, 10.0, 0.1, 2, 4.0))


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("20m", 1200), ("1h", 3600), ("1.5h", 5400), (" 2m ", 120)])
def test_parse_budget(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["20", "20x", "0m", "-5s", "m", "", "1h30m"])
def test_parse_budget_refuses(text):
    with pytest.raises(ValueError, match="expected a positive time with its unit"):
        parse_budget(text)


# -- a real run on llvm ------------------------------------------------------------------------------

def _records_clock(db_path, per_record_s: float = 1.0):
    """A clock that reads the candidates the DB holds, 1 s each: rounds and budget become counts, so
    the allocation under test does not depend on how fast this machine builds (CI's 2 cores are slow,
    and a warm-up round that starts the worker pools took 5 s there against 1 s on a quiet machine)."""
    uri = f"file:{db_path}?mode=ro"

    def clock() -> float:
        if not Path(db_path).exists():
            return 0.0
        con = sqlite3.connect(uri, uri=True)
        try:
            return per_record_s * con.execute("SELECT count(*) FROM records").fetchone()[0]
        except sqlite3.OperationalError:  # no schema yet
            return 0.0
        finally:
            con.close()

    return clock


def _timed_schedule(db_path, budget_s=BUDGET_S, **kw):
    seen, cpu = [], detect("llvm")
    t0 = time.monotonic()
    sched = schedule(WEIGHTS, cpu, budget_s, db_path, OPTS, on_round=lambda t, s: seen.append(t.workload),
                     clock=_records_clock(db_path), **kw)
    assert [w.name for w in seen] == sched.order
    return sched, time.monotonic() - t0


@pytest.fixture(scope="module")
def first_run(cheap, tmp_path_factory):
    """Warm-ups in batches of 2 (Tuner.tune_batch: HEAVY and a LIGHT built together, then the other
    LIGHT), so the order is checked across batches; the pool rule would warm one at a time here (2
    builders, 4 candidates a task)."""
    db = tmp_path_factory.mktemp("sched") / "t.db"
    return (db, *_timed_schedule(db, warmup_tasks=2))


def _records(db) -> list[tuple[str, str]]:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT w.name, r.candidate_key FROM records r JOIN workloads w ON w.id = r.workload_id").fetchall()
    finally:
        con.close()


def test_the_heavy_task_gets_most_trials_within_the_budget(first_run):
    db, sched, _ = first_run
    by = {t.workload: t for t in sched.tasks}
    assert all(t.rounds >= 1 and t.vendor_us for t in sched.tasks), "every task is warmed up"
    assert by[HEAVY].measured > 2 * max(by[w].measured for w in LIGHT), [(t.workload.name, t.measured) for t in sched.tasks]
    assert sched.order[0] == HEAVY.name  # warm-up, heaviest first
    assert set(sched.order[:3]) == {w.name for w in WEIGHTS} and [t.rounds for t in sched.tasks if t.workload != HEAVY] == [1, 1]
    assert all(n == 4 for t in sched.tasks for _, n in t.round_s[:1])  # every warm-up round: 4 candidates
    slowest = max(s for t in sched.tasks for s, _ in t.round_s)
    assert BUDGET_S <= sched.wall_s <= BUDGET_S + slowest, (sched.wall_s, slowest)  # one round's slack
    records = _records(db)
    assert sum(t.measured for t in sched.tasks) == len(records)


def test_times_follow_the_registry(first_run):
    """A task's served time is the kernel kernels.registry serves (the same rule: one copy drifts)."""
    from kernels.registry import Registry

    db, sched, *_ = first_run
    reg = Registry(db_path=db, target=detect("llvm"))
    for t in sched.tasks:
        res = reg.resolve(t.workload)
        assert (res.kind != "fallback") == (t.served_us is not None), (t.workload.name, res.reason)
        if t.served_us is not None:
            assert res.record.latency.median_us == t.served_us and vendor_us(res.vendor) == t.vendor_us
    est = sched.totals()
    assert est["before_us"] == pytest.approx(sum(t.weight * t.vendor_us for t in sched.tasks))
    assert est["after_us"] == pytest.approx(sum(t.weight * (t.served_us or t.vendor_us) for t in sched.tasks))
    assert est["start_us"] == pytest.approx(est["before_us"])  # a fresh DB: everything started on the vendor
    assert est["gain_ms_per_min"] == pytest.approx((est["before_us"] - est["after_us"]) / 1e3 / (sched.wall_s / 60))


def test_a_fresh_tasks_start_follows_its_vendor_re_timing(tmp_path):
    """A task this session timed first started on the vendor path: its start is the vendor time as
    re-timed later in the run (scheduler.tuner re-times it once a record beats the first timing), not
    the first timing, so a re-timing is no gain of the session. (Before: the first timing stayed the
    start, and test_times_follow_the_registry's start == before failed wherever a loaded CPU made the
    re-timing come after the warm-up round.) A resumed task's start stays as the DB served it."""
    from shapetune.records import Candidate, LatencyStats, MeasureResult, VendorBaseline

    cpu, w = detect("llvm"), LIGHT[0]

    def vendor(us, run):
        db.add_baseline(VendorBaseline(w, cpu, "torch.nn.functional.linear", LatencyStats.of([us] * 3), run_id=run))

    def record(us, run, i):
        db.add_result(MeasureResult(w, cpu, Candidate("dlight", (("i", i),)), "ok", LatencyStats.of([us] * 3),
                                    run_id=run))

    with TuningDB(tmp_path / "t.db") as db:
        fresh = Task(w, weight=2.0, space=100)
        refresh(fresh, db, cpu, OPTS)  # the session begins: nothing timed
        vendor(10.0, "r1")  # its warm-up round: the vendor timed, a slower record
        record(20.0, "r1", 0)
        fresh.rounds = 1
        refresh(fresh, db, cpu, OPTS)
        assert (fresh.start_us, fresh.vendor_us, fresh.served_us) == (10.0, 10.0, None)
        record(8.0, "r1", 1)  # a later round beats 10 us: the vendor is re-timed, at 9 us
        vendor(9.0, "r1")
        fresh.rounds = 2
        refresh(fresh, db, cpu, OPTS)
        assert (fresh.vendor_us, fresh.served_us) == (9.0, 8.0)
        assert fresh.start_us == 9.0, fresh.start_us  # the vendor path it started on, as re-timed
        est = Schedule([fresh], 1.0, wall_s=60.0).totals()
        assert est["start_us"] == est["before_us"] == 18.0 and est["gain_ms_per_min"] == pytest.approx(2e-3)

        resumed = Task(w, weight=2.0, space=100)
        refresh(resumed, db, cpu, OPTS)  # a new session: the DB serves 8 us
        assert resumed.start_us == 8.0
        vendor(7.2, "r2")  # its run: a vendor timing, and a record that does not beat it
        record(7.0, "r2", 2)
        resumed.rounds = 1
        refresh(resumed, db, cpu, OPTS)
        assert resumed.start_us == 8.0 and resumed.time_us == 8.0  # still served from r1


def test_a_rerun_continues_from_the_db(first_run, tmp_path):
    db = tmp_path / "t.db"
    shutil.copy(first_run[0], db)
    before = _records(db)
    # each task's state as the DB holds it (trials, vendor, best, last gain), read as the scheduler does
    cpu, opts = detect("llvm"), replace(OPTS, trials=NO_CAP, top_up=True)
    held = [Task(w, float(v), len(search_space(w, cpu, opts.templates))) for w, v in WEIGHTS.items()]
    with TuningDB(db) as tdb:
        for t in held:
            refresh(t, tdb, cpu, opts)
    assert all(t.trials > 0 and t.vendor_us is not None for t in held)
    sched, *_ = _timed_schedule(db, budget_s=6.0, warmup=1)
    after = _records(db)
    assert len(after) == len(set(after)), "a candidate was measured twice"
    assert set(before) < set(after)
    # no warm-up (a warm-up round would measure 1 candidate): the first round goes where the state read
    # back from the DB says it pays most, before any round of this run was timed
    assert all(n > 1 or t.done for t in sched.tasks for _, n in t.round_s), [t.round_s for t in sched.tasks]
    first = max((t for t in held if not t.done), key=lambda t: priority(t, held, opts.batch))
    assert sched.order[0] == first.workload.name, (sched.order, [(t.workload.name, priority(t, held, opts.batch)) for t in held])
    counts = {w: sum(n == w.name for n, _ in after) for w in WEIGHTS}
    assert {t.workload: t.trials for t in sched.tasks} == counts
    assert sched.totals()["start_us"] == pytest.approx(first_run[1].totals()["after_us"])  # as the first left it


def test_a_trial_cap_and_an_exhausted_space_end_the_run(cheap, tmp_path):
    w = LIGHT[0]
    sched = schedule({w: 1}, detect("llvm"), 300.0, tmp_path / "t.db", OPTS, cap=6)
    (t,) = sched.tasks
    assert t.done == "cap" and t.trials == t.measured == 6 and sched.wall_s < 60
    sched = schedule({w: 1}, detect("llvm"), 300.0, tmp_path / "t.db", TuneOptions(batch=4, templates=("dlight",)))
    (t,) = sched.tasks
    assert t.done == "exhausted" and t.trials == 1 and t.measured == 0


def test_a_workload_tuned_round_by_round_keeps_its_vendor_timings_per_run(cheap, tmp_path):
    """Not one vendor timing per round: one per run, and one more once a record of the run beats
    it (scheduler.tuner), whose faster timing every later round reports."""
    w = LIGHT[1]
    with TuningDB(tmp_path / "t.db") as db, Tuner(db, detect("llvm"), replace(OPTS, trials=NO_CAP)) as tuner:
        reps = [tuner.tune(w, rounds=1, batch=n) for n in (2, 3, 3)]
        assert [r.measured for r in reps] == [2, 3, 3] and len(db.results(w.key)) == 8
        assert len({r.candidate.key for r in db.results(w.key)}) == 8
        stored = db.baselines(w.key)[::-1]  # oldest first
        assert len(stored) == 1 + reps[-1].vendor_retimed and {r.vendor for r in reps} <= set(stored)
        assert reps[-1].vendor == min(stored, key=vendor_us)
        assert reps[0].dlight is not None  # the first round holds the dlight default


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match="positive"):
        schedule({HEAVY: 0}, detect("llvm"), 10.0)


# -- the CLI -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["20", "20x", "0s", "1h30m"])
def test_cli_bad_budget_is_one_line(value, tmp_path):
    out = CliRunner().invoke(main, ["tune", "--target", "llvm", "--budget", value, "--db", str(tmp_path / "x.db")])
    assert out.exit_code != 0
    assert out.output.strip().splitlines() == [f"Error: --budget {value!r}: expected a positive time with its "
                                               "unit, e.g. 90s, 20m or 1h"], out.output
    assert not (tmp_path / "x.db").exists()


def test_cli_budget_refuses_parallel_workers(tmp_path):
    out = CliRunner().invoke(main, ["tune", "--target", "llvm", "--budget", "30s", "--workers", "2",
                                    "--db", str(tmp_path / "x.db")])
    assert out.exit_code != 0 and out.output.strip().splitlines() == [
        "Error: --budget tunes in one process: drop --gpus / --workers"], out.output


def test_cli_budget_tunes_and_prints_the_allocation(cheap, tmp_path):
    db = tmp_path / "t.db"
    out = CliRunner().invoke(main, ["tune", "--target", "llvm", "--shape", "m=16,n=8,k=16", "--no-bias",
                                    "--budget", "30s", "--trials", "6", "--batch", "3", "--db", str(db)],
                             catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert "tuning  1 workload(s) for 30 s, at most 6 trials each" in out.output
    row = next(line for line in out.stdout.splitlines() if "linear_m16_n8_k16_f32" in line)
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells[1:5] == ["1", "2", "6", "6"] and cells[-1] == "cap", cells  # warm-up 3, then 3
    assert "ms per forward on the vendor path" in out.stdout and "per tuning minute" in out.stdout
    assert len(_records(db)) == 6


def test_cli_budget_weighs_a_presets_buckets_by_their_calls(tmp_path):
    """sd15-norms' buckets weigh the calls of every shape in them (ExtractedOp.calls); a 1 s budget
    warms up one batch, the heaviest first (calls x roofline), and stops in the warm-up."""
    from scheduler.extract import sd15_workloads
    from shapetune.buckets import DEFAULT

    calls, buckets = {}, {}
    for o in sd15_workloads(("norms",), dtype="float32"):
        b = DEFAULT.bucket_of(o.workload)
        calls[b.name] = calls.get(b.name, 0) + o.calls
        buckets[b.name] = b
    out = CliRunner().invoke(main, ["tune", "--target", "llvm", "--preset", "sd15-norms", "--buckets", "--budget",
                                    "1s", "--template", "dlight", "--db", str(tmp_path / "t.db"), "--format", "json"],
                             catch_exceptions=False)
    assert out.exit_code == 0, out.output
    tasks = json.loads(out.stdout)["tasks"]
    assert {t["workload"]: t["weight"] for t in tasks} == calls
    warmed = {t["workload"] for t in tasks if t["rounds"]}
    assert warmed and len(warmed) < len(tasks), out.output  # the budget ended in the warm-up
    assert all(t["vendor_us"] > 0 for t in tasks if t["rounds"]), out.output
    # The warm-up goes in batches that fill the build pool: 2 builders (tests/conftest.py), one dlight
    # candidate per bucket, so the first (and, in 1 s, only) batch is the top 2 by cold_priority (nothing
    # timed yet: weight x roofline), the most called among them; one by one, only the first was warmed.
    by_priority = sorted(calls, key=lambda n: -calls[n] * roofline_us(buckets[n], "llvm"))
    assert warmed == set(by_priority[:2]), (warmed, by_priority[:4])


# -- the warm-up order -------------------------------------------------------------------------------
def test_roofline_is_the_slower_of_flops_and_bytes_plus_a_launch():
    from scheduler.runner import min_traffic_bytes
    from shapetune.ops.norm import group_norm_workload

    flop_s, byte_s, call_s = ROOFLINE["cuda"]
    big = linear_workload(4096, 4096, 4096, "float16", False)  # compute-bound
    assert roofline_us(big, "cuda") == pytest.approx(1e6 * (2 * 4096**3 / flop_s + call_s))
    gn = group_norm_workload(2, 4096, 320, 32, "float16", 1e-5, False)  # memory-bound: no flops
    assert roofline_us(gn, "cuda") == pytest.approx(1e6 * (min_traffic_bytes(gn) / byte_s + call_s))
    tiny = linear_workload(16, 8, 16, "float16", False)  # launch-bound
    assert roofline_us(tiny, "cuda") == pytest.approx(1e6 * call_s, rel=0.01)


def test_cold_tasks_warm_up_by_weight_x_time_x_their_ops_headroom():
    from shapetune.ops.norm import group_norm_workload

    gemm = Task(linear_workload(1024, 1280, 1280, "float16", True), weight=2)
    gn = Task(group_norm_workload(2, 4096, 320, 32, "float16", 1e-5, False), weight=2)
    est = {t.workload.op: roofline_us(t.workload, "cuda") for t in (gemm, gn)}
    assert est["linear"] > est["group_norm"]
    order = lambda head: max((gemm, gn), key=lambda t: cold_priority(t, "cuda", head)).workload.op  # noqa: E731
    assert order({}) == "linear"  # nothing known: the larger weight x time first
    # the linears timed so far all stayed slower than cuBLAS, the norms won a lot: norms first now
    timed = [Task(linear_workload(64, 64, 64, "float16", False), vendor_us=10.0, tuned_us=14.0),
             Task(group_norm_workload(1, 1024, 320, 32, "float16", 1e-5, False), vendor_us=10.0, tuned_us=4.0)]
    head = op_headroom(timed)
    assert head == pytest.approx({"linear": 0.0, "group_norm": 0.6})
    assert est["linear"] * FLOOR < est["group_norm"] * 0.6 and order(head) == "group_norm"
    # a task whose time is known (a vendor time from an earlier run, no trials) is ranked by it
    gn.vendor_us = 1e-3
    assert cold_priority(gn, "cuda", head) == pytest.approx(2 * 1e-3 * 0.6)
