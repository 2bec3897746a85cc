"""Crash- and hang-isolated worker processes.

A candidate may segfault the compiler, crash the GPU context or never finish. Work runs in child
processes started from a forkserver that has already imported the heavy modules (TVM's CUDA
intrinsics alone take ~35 s to import), so a dead or hung worker costs a fork, not a re-import. Processes that touch the GPU are spawned
instead: CUDA cannot be initialized in a forked child of a process where it already was.

Workers die with their owner: each gets the kernel's parent-death signal (SIGKILL when the process
that started it exits, Linux) and a watchdog thread that exits once the pool's owner is gone, so a
kill -9 of a tuning job leaves no builder or runner behind. The forkserver arms the same signal as
its first preload (`forkserver_init`); the resource tracker exits once the last of them is gone.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

PRELOAD = ["tvm", "torch", "shapetune", "shapetune.ops", "scheduler.templates"]


class WorkerCrashed(RuntimeError):
    pass


class WorkerTimeout(RuntimeError):
    pass


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent exits (Linux prctl PR_SET_PDEATHSIG);
    also usable as a Popen preexec_fn. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1: PR_SET_PDEATHSIG


def _watch_owner(owner: int, poll_s: float = 0.5) -> None:
    """Exit at once when process `owner` is gone (its parent may be a forkserver that outlives it)."""
    while True:
        time.sleep(poll_s)
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            os._exit(1)
        except PermissionError:  # the pid was reused by another user's process: the owner is gone
            os._exit(1)


def _worker_init(owner: int, initializer, initargs) -> None:
    die_with_parent()
    if os.getppid() == 1:  # the parent already died before the signal was armed
        os._exit(1)
    threading.Thread(target=_watch_owner, args=(owner,), daemon=True, name="owner-watchdog").start()
    if initializer is not None:
        initializer(*initargs)


def _context(method: str, preload: list[str]):
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["scheduler.forkserver_init", *preload])
    return ctx


class ClosedOnExit:
    """`with x:` closes x on the way out, and kills its workers where it leaves on an exception (Ctrl-C
    included): waiting for their calls (a CUDA build takes up to its timeout) would hold an interrupted
    job for minutes. Subclasses define close(abort)."""

    def close(self, abort: bool = False):
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.close(abort=exc_type is not None)


class IsolatedPool(ClosedOnExit):
    """`map`-like execution of top-level functions in killable worker processes."""

    def __init__(self, workers: int, preload: list[str] | None = None, initializer=None, initargs=(),
                 method: str = "forkserver"):
        self.workers = max(1, workers)
        self.method = method
        self.preload = PRELOAD if preload is None else list(preload)
        self.initializer, self.initargs = initializer, initargs
        self._pool: cf.ProcessPoolExecutor | None = None

    def _executor(self, workers: int) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(
            workers, mp_context=_context(self.method, self.preload), initializer=_worker_init,
            initargs=(os.getpid(), self.initializer, self.initargs))

    def _ensure(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = self._executor(self.workers)
        return self._pool

    def kill(self):
        if self._pool is not None:
            _kill(self._pool)
            self._pool = None

    def close(self, abort: bool = False):
        """Let the running calls finish (queued ones are dropped); `abort`: kill them instead."""
        if abort:
            self.kill()
        elif self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def run_all(self, fn: Callable, argsets: list[tuple], timeout_s: float) -> list[Any]:
        """Run fn(*args) for each argset; each slot holds the return value or the exception.

        A crash or hang breaks the pool: it is killed, the hung call is recorded as a timeout, and
        the calls caught in the wreck are rerun, in parallel, each alone in a process of its own
        (`_run_alone`): one bad candidate cannot take its neighbours down with it, the culprit is
        named (WorkerCrashed, not run a third time), and a crash in a big batch costs one more round
        of the unfinished calls, not one serial call after another.
        """
        out: list[Any] = [None] * len(argsets)
        futs = [self._ensure().submit(fn, *a) for a in argsets]
        suspects = []
        broken = False
        for i, fut in enumerate(futs):
            if broken and not fut.done():
                suspects.append(i)
                continue
            try:
                # exception() raises TimeoutError only when the wait runs out; a TimeoutError the
                # function itself raised comes back as its value (on 3.11 they are one class).
                exc = fut.exception(timeout=timeout_s)
            except cf.TimeoutError:
                out[i] = WorkerTimeout(f"no result after {timeout_s:.0f} s")
                broken = True
                continue
            except cf.CancelledError:
                suspects.append(i)
                broken = True
                continue
            if isinstance(exc, BrokenProcessPool):
                suspects.append(i)
                broken = True
            else:  # a value, or an ordinary failure of the function itself
                out[i] = exc if exc is not None else fut.result()
        if broken:
            self.kill()
        if len(argsets) == 1 and suspects:  # it ran alone already
            out[0] = _crashed()
            return out
        for i, r in zip(suspects, self._run_alone(fn, [argsets[i] for i in suspects], timeout_s)):
            out[i] = r
        return out

    def _run_alone(self, fn: Callable, argsets: list[tuple], timeout_s: float) -> list[Any]:
        """run_all's slots for calls that each run alone in a fresh one-worker process, `workers` of
        them at a time: a crash is that call's own (WorkerCrashed), a call past `timeout_s` from its
        start is killed (WorkerTimeout), and neither touches the others. A process costs a fork from
        the forkserver; a spawned one re-imports, but the pools that spawn (the runner's) run one
        call at a time and never get here."""
        out: list[Any] = [None] * len(argsets)
        todo = list(reversed(range(len(argsets))))  # popped from the end: in order
        running: dict[cf.Future, tuple[int, cf.ProcessPoolExecutor, float]] = {}
        try:
            while todo or running:
                while todo and len(running) < self.workers:
                    i = todo.pop()
                    ex = self._executor(1)
                    running[ex.submit(fn, *argsets[i])] = (i, ex, time.monotonic() + timeout_s)
                first = min(deadline for _, _, deadline in running.values())
                cf.wait(running, timeout=max(0.0, first - time.monotonic()), return_when=cf.FIRST_COMPLETED)
                now = time.monotonic()
                for fut, (i, ex, deadline) in list(running.items()):
                    if fut.done():
                        exc = fut.exception()
                        if isinstance(exc, BrokenProcessPool):
                            out[i] = _crashed()
                        else:
                            out[i] = exc if exc is not None else fut.result()
                    elif now >= deadline:
                        out[i] = WorkerTimeout(f"no result after {timeout_s:.0f} s")
                    else:
                        continue
                    del running[fut]
                    _kill(ex)
        finally:  # interrupted: leave no worker behind
            for _, ex, _ in running.values():
                _kill(ex)
        return out


def _crashed() -> WorkerCrashed:
    return WorkerCrashed("worker process died (crash or kill)")


def _kill(pool: cf.ProcessPoolExecutor) -> None:
    """SIGKILL the pool's workers (a hung one would never return) and drop what it had queued."""
    for p in list(getattr(pool, "_processes", {}).values()):
        try:
            os.kill(p.pid, signal.SIGKILL)
        except (ProcessLookupError, OSError):
            pass
    pool.shutdown(wait=False, cancel_futures=True)
