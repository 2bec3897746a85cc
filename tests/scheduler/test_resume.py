"""A rerun resumes (issue 11 item 4): `trials` is a per-workload total, a job killed with SIGKILL at
any moment and rerun ends with exactly the asked trials, nothing lost or measured twice, and two
tuners on one DB never measure the same candidate. Also: --workers leaves no shard files (item 8)."""

import collections
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from scheduler.parallel import tune_parallel
from scheduler.tuner import TuneOptions, tune
from shapetune.db import TuningDB
from shapetune.ops.linear import linear_workload
from shapetune.records import Candidate
from shapetune.target import detect
from shapetune.workload import Workload

A, B = linear_workload(16, 8, 16, "float32", False), linear_workload(24, 8, 16, "float32", False)
OPTS = TuneOptions(trials=3, batch=2, templates=("gemm_llvm",))


def _per_workload(db_path) -> dict[str, list[str]]:
    """workload name -> candidate keys of its records."""
    with TuningDB(db_path) as db:
        out = collections.defaultdict(list)
        for r in db.results():
            out[r.workload.name].append(r.candidate.key)
        return dict(out)


def _assert_exact(db_path, trials: int, workloads=(A, B)):
    got = _per_workload(db_path)
    assert sorted(got) == sorted(w.name for w in workloads)
    for name, keys in got.items():
        assert len(keys) == trials, f"{name}: {len(keys)} records, asked {trials}"
        assert len(set(keys)) == len(keys), f"{name}: a candidate measured twice"


def test_rerunning_a_finished_job_measures_nothing(tmp_path):
    db = tmp_path / "t.db"
    first = tune([A], detect("llvm"), db, OPTS)
    again = tune([A], detect("llvm"), db, OPTS)
    assert first[0].measured == 3 and again[0].measured == 0
    _assert_exact(db, 3, [A])


def test_a_claimed_candidate_is_skipped_by_another_tuner_until_released(tmp_path):
    cpu = detect("llvm")
    cands = [Candidate("gemm_llvm", (("tile", t),)) for t in (1, 2, 3)]
    with TuningDB(tmp_path / "t.db") as one, TuningDB(tmp_path / "t.db") as two:
        assert one.claim(A, cpu, cands[:2], "run1", total=3) == cands[:2]
        assert one.held(A, cpu)[1] == 2
        assert two.claim(A, cpu, cands, "run2", total=3) == cands[2:]  # and no more than the total
        assert two.claim(A, cpu, cands, "run3") == []
        one.release(A, cpu, cands[:2], "run1")
        assert two.claim(A, cpu, cands, "run3") == cands[:2]


def test_a_dead_tuners_claims_are_dropped(tmp_path):
    cpu = detect("llvm")
    cand = Candidate("gemm_llvm", (("tile", 1),))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with TuningDB(tmp_path / "t.db") as db:
        db.claim(A, cpu, [cand], "gone")
        db._con.execute("UPDATE claims SET pid = ?", (dead.pid,))  # as if claimed by that process
        assert db.claim(A, cpu, [cand], "mine") == [cand]


def _cli(db, trials: int, workloads=(A, B)):
    shapes = [a for w in workloads for a in ("--shape", ",".join(f"{k}={v}" for k, v in w.dims))]
    return [sys.executable, "-m", "shapetune.cli", "tune", "--target", "llvm", *shapes, "--no-bias",
            "--trials", str(trials), "--batch", "2", "--template", "gemm_llvm", "--db", str(db)]


def _kill_loop(tmp_path, kills: int, trials: int, seed: int, delay_s: tuple, workloads=(A, B)):
    """Start the CLI job, SIGKILL it after a random delay, `kills` times, then run it to the end."""
    rng, db = random.Random(seed), tmp_path / "t.db"
    env = dict(os.environ, SHAPETUNE_BUILD_JOBS="2")
    for _ in range(kills):
        p = subprocess.Popen(_cli(db, trials, workloads), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=env)
        time.sleep(rng.uniform(*delay_s))
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    done = subprocess.run(_cli(db, trials, workloads), capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    _assert_exact(db, trials, workloads)


def test_kill_9_then_rerun_finishes_with_exactly_the_asked_trials(tmp_path):
    _kill_loop(tmp_path, kills=1, trials=4, seed=1, delay_s=(4, 7), workloads=(A,))


@pytest.mark.slow
def test_kill_9_at_random_moments_in_a_loop(tmp_path):
    _kill_loop(tmp_path, kills=4, trials=8, seed=2, delay_s=(4, 14))


def test_two_tuners_on_one_db_never_measure_a_candidate_twice(tmp_path):
    db = tmp_path / "t.db"
    env = dict(os.environ, SHAPETUNE_BUILD_JOBS="1")
    procs = [subprocess.Popen(_cli(db, 6), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
             for _ in range(2)]
    for p in procs:
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0, out.decode()
    _assert_exact(db, 6)


def test_workers_leave_no_shard_files_and_resume(tmp_path):
    db = tmp_path / "job.db"
    bad = Workload(op="no_such_op", dims=(("m", 1),), dtype="float32", acc_dtype="float32", layout="", epilogue=())
    shards = tune_parallel([A, bad], db, OPTS, ["", ""], "llvm")
    assert shards[1].returncode != 0  # the shard with the bad workload failed: cleaned up all the same
    assert not [p for p in tmp_path.iterdir() if ".shard" in p.name]
    _assert_exact(db, 3, [A])
    tune_parallel([A], db, OPTS, [""], "llvm")  # a rerun of the finished job adds nothing
    _assert_exact(db, 3, [A])
    assert not [p for p in tmp_path.iterdir() if ".shard" in p.name]
