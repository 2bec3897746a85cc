"""scheduler.isolation.IsolatedPool: results, ordinary exceptions, crashes and hangs, slot by slot.

The worker functions live in tests/scheduler/_pool_helpers.py: workers unpickle them by module name.
Most tests use method="fork" (no fork server, instant). The fork server of multiprocessing is
process-global and keeps the preload list it was started with, so the single forkserver test here
uses the default PRELOAD: it warms the same server the builder/runner tests use later anyway.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.scheduler import _pool_helpers as h
from scheduler.isolation import PRELOAD, IsolatedPool, WorkerCrashed, WorkerTimeout


@pytest.fixture
def pool():
    p = IsolatedPool(2, preload=[], method="fork")
    yield p
    p.kill()


def test_ok_results_in_order(pool):
    assert pool.run_all(h.square, [(i,) for i in range(7)], timeout_s=30) == [i * i for i in range(7)]


def test_empty_batch(pool):
    assert pool.run_all(h.square, [], timeout_s=5) == []


def test_ordinary_exception_is_returned_not_raised(pool):
    out = pool.run_all(h.dispatch, [("square", 3), ("boom", "bad knob"), ("square", 4)], timeout_s=30)
    assert out[0] == 9 and out[2] == 16
    assert isinstance(out[1], h.Boom) and str(out[1]) == "bad knob"
    # an ordinary failure does not break the pool: the same workers serve the next batch
    pids = set(pool.run_all(h.pid, [()] * 4, timeout_s=30))
    assert pids <= {p.pid for p in pool._pool._processes.values()}


@pytest.mark.parametrize("bad", ["exit", "segv"])
def test_crash_is_confined_to_its_slot(pool, bad):
    argsets = [("square", 2), (bad, 1), ("square", 3), ("boom", "x"), ("square", 5), ("square", 6)]
    out = pool.run_all(h.dispatch, argsets, timeout_s=30)
    assert isinstance(out[1], WorkerCrashed), out
    assert out[0] == 4 and out[2] == 9 and out[4] == 25 and out[5] == 36
    assert isinstance(out[3], h.Boom)
    # the pool recovers
    assert pool.run_all(h.square, [(7,), (8,)], timeout_s=30) == [49, 64]


def test_two_crashes_in_one_batch(pool):
    out = pool.run_all(h.dispatch, [("segv", 0), ("square", 2), ("exit", 3), ("square", 3)], timeout_s=30)
    assert isinstance(out[0], WorkerCrashed) and isinstance(out[2], WorkerCrashed)
    assert out[1] == 4 and out[3] == 9


def test_the_calls_caught_in_a_crash_are_rerun_in_parallel(pool, tmp_path):
    """The two "meet" calls return True only if both run at the same time: neither can finish in the
    batch (the segfault breaks the pool while at most one of them runs), so they are rerun, and a
    serial rerun would leave the first one waiting for the second in vain (False)."""
    meet = str(tmp_path)
    argsets = [("square", 2), ("segv", 0), ("meet", (meet, "a", 2)), ("boom", "x"), ("meet", (meet, "b", 2)),
               ("square", 5)]
    out = pool.run_all(h.dispatch, argsets, timeout_s=60)
    assert out[0] == 4 and isinstance(out[1], WorkerCrashed) and isinstance(out[3], h.Boom) and out[5] == 25, out
    assert out[2] is True and out[4] is True, out
    assert pool.run_all(h.square, [(7,), (8,)], timeout_s=30) == [49, 64]


def test_a_call_that_crashes_alone_is_not_run_again(pool, tmp_path):
    runs = tmp_path / "runs"
    out = pool.run_all(h.dispatch, [("square", 2), ("noted_segv", str(runs)), ("square", 3)], timeout_s=30)
    assert out[0] == 4 and isinstance(out[1], WorkerCrashed) and out[2] == 9, out
    assert runs.read_text().splitlines() == ["ran"] * 2  # in the batch, then once alone: no more


def test_a_hang_among_the_rerun_calls_is_a_timeout(pool):
    t0 = time.monotonic()
    out = pool.run_all(h.dispatch, [("segv", 0), ("sleep", 60), ("square", 3), ("square", 4)], timeout_s=2)
    assert time.monotonic() - t0 < 30
    assert isinstance(out[0], WorkerCrashed) and isinstance(out[1], WorkerTimeout), out
    assert out[2:] == [9, 16]
    assert pool.run_all(h.square, [(5,)], timeout_s=30) == [25]


def test_hang_is_a_timeout_and_pool_is_usable_afterwards(pool):
    t0 = time.monotonic()
    out = pool.run_all(h.dispatch, [("square", 2), ("sleep", 60), ("square", 3)], timeout_s=1.5)
    assert time.monotonic() - t0 < 20
    assert out[0] == 4 and out[2] == 9
    assert isinstance(out[1], WorkerTimeout)
    assert pool._pool is None  # the hung worker was killed with its pool
    assert pool.run_all(h.square, [(5,), (6,), (7,)], timeout_s=30) == [25, 36, 49]
    assert pool.run_all(h.sleep_then, [(0.1, "late")], timeout_s=30) == ["late"]


def test_single_slot_crash_and_timeout(pool):
    assert isinstance(pool.run_all(h.exit_hard, [(3,)], timeout_s=30)[0], WorkerCrashed)
    assert isinstance(pool.run_all(h.sleep_then, [(60, 0)], timeout_s=1)[0], WorkerTimeout)
    assert pool.run_all(h.square, [(9,)], timeout_s=30) == [81]


def test_empty_preload_is_respected():
    # preload=[] must mean "import nothing", not "the default list"
    assert IsolatedPool(1, preload=[]).preload == []
    assert IsolatedPool(1).preload == PRELOAD


def test_function_raising_timeout_error_is_an_ordinary_failure(pool):
    """concurrent.futures.TimeoutError is the builtin TimeoutError since 3.11: a function's own
    TimeoutError must not be mistaken for a hang (which would kill the pool)."""
    out = pool.run_all(h.raise_timeout, [("socket",)], timeout_s=30)
    assert type(out[0]) is TimeoutError


def test_forkserver_workers_crash_and_recover():
    with IsolatedPool(2, method="forkserver") as p:
        out = p.run_all(h.dispatch, [("square", 2), ("segv", 0), ("square", 3)], timeout_s=60)
        assert out[0] == 4 and isinstance(out[1], WorkerCrashed) and out[2] == 9
        pids = p.run_all(h.pid, [(), ()], timeout_s=60)
        assert os.getpid() not in pids


def test_an_interrupt_kills_the_running_calls_instead_of_waiting_for_them():
    """Ctrl-C during a batch (a prebuild on the GPU machine: CUDA builds of up to their timeout each)
    leaves the `with` at once, its workers killed; a clean exit still lets the calls finish."""
    import signal
    import threading

    p = IsolatedPool(2, preload=[], method="fork")
    main = threading.main_thread().ident
    threading.Timer(1.0, signal.pthread_kill, (main, signal.SIGINT)).start()  # as a Ctrl-C arrives
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with p:
            p.run_all(time.sleep, [(60,), (60,)], timeout_s=120)
    assert time.monotonic() - t0 < 15
    assert p._pool is None
    with IsolatedPool(1, preload=[], method="fork") as q:
        assert q.run_all(h.square, [(3,)], timeout_s=30) == [9]
