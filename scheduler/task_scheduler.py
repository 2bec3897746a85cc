"""Spend tuning time where it pays: rounds of candidates go to the workloads whose next round is
expected to save the most model time (Ansor's task scheduler, without its similarity term).

A task is a workload (exact or bucket) with a weight: its calls per model forward. It costs the model
weight x its time as served: the fastest tuned kernel the registry would serve (one that beats the
vendor path of its own run by MARGIN, shapetune.serving), else the vendor path. Every task first gets
one small warm-up round (the dlight default and a few candidates: a vendor time and a first best), in
the order of `cold_priority` (weight x a roofline time x what tuning gained on its op so far: a grid
of hundreds of buckets may spend its whole budget warming up). Warm-ups go in batches
(`warmup_size` tasks, enough to keep the build pool busy: Tuner.tune_batch builds all their candidates
at once, then times each task in turn); the priorities are recomputed between batches, not between
the tasks of one. Then each round (TuneOptions.batch candidates, one Tuner round) goes to the task
with the largest `gain_rate`. It stops at the wall-clock budget (a round or warm-up batch started
before it runs to its end), or when every task's space is exhausted or its trial cap reached.
Everything a task knows is read back from the DB after each round (records held, vendor, best), so a
rerun continues where the last one stopped and never measures a candidate twice (the Tuner's claims).
"""

from __future__ import annotations

import functools
import math
import re
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from shapetune import config
from shapetune.db import TuningDB
from shapetune.serving import servable, vendor_us
from shapetune.target import Target
from shapetune.workload import Workload

from .tuner import TuneOptions, Tuner, search_space, versions

FLOOR = 0.02  # no task's headroom falls below 2% of its time: none starves, however flat its search
ALPHA = 0.5  # weight of the backward term (its last round's gain) against the forward one (1 / rounds)
WARMUP = 4  # candidates in a task's warm-up round: the dlight default and three more
NO_CAP = 1 << 40  # TuneOptions.trials when no trial cap is given


def gain_rate(weight: float, time_us: float, last_gain: float, rounds: float, round_s: float,
              floor: float = FLOOR, alpha: float = ALPHA) -> float:
    """Model time (us per forward) that a task's next round is expected to save, per second of tuning.

    weight x time_us is what the task costs the model now; its next round is expected to take the
    share ``headroom = max(floor, alpha x last_gain + (1 - alpha) / rounds)`` off that:
    - last_gain, the relative improvement of its fastest kernel over its last round (Ansor's backward
      gradient): a search still finding faster kernels likely goes on, one that stalled likely stays
      stalled;
    - 1 / rounds, the optimistic forward bound (Ansor's g/t without similar tasks): had the task
      started at 0 and come down to its time in `rounds` equal steps, the next would take 1 / rounds
      of it; it shrinks as a task's rounds add up, so rounds spread before they pile on one task;
    - floor, so that no task starves, and a heavy task keeps getting rounds while it stays heavy.
    Divided by round_s, the task's own measured round time: a big conv's round costs more than a
    norm's, and the budget is wall time.
    """
    headroom = max(floor, alpha * last_gain + (1 - alpha) / max(rounds, 1.0))
    return weight * time_us * headroom / round_s


@dataclass
class Task:
    """One workload's state: read from the DB (`refresh`) but for this session's own counts."""

    workload: Workload
    weight: float = 1.0
    space: int = 0  # candidates in its search space
    trials: int = 0  # records (and live claims) the DB holds for it
    vendor_us: float | None = None  # the vendor path's time (the served record's run, else the newest)
    tuned_us: float | None = None  # its fastest verified kernel, served or not
    served_us: float | None = None  # the fastest kernel the registry would serve, if any
    last_gain: float = 0.0  # relative improvement of tuned_us over its newest round of records
    start_us: float | None = None  # its time when this session first knew its vendor time
    # This session timed it first (nothing in the DB before): it started on the vendor path, and its
    # start follows the vendor time, re-timed or not (a re-timing is no gain of the session).
    started_on_vendor: bool = False
    rounds: int = 0  # rounds this session gave it
    measured: int = 0  # candidates this session measured for it
    round_s: list[tuple[float, int]] = field(default_factory=list)  # (wall s, measured) of its rounds this session
    warmup_build_s: float = 0.0  # of its warm-up round's wall s, its share of the batch's builds (the rest: measuring)
    done: str = ""  # why it gets no more rounds: exhausted | cap | failed: why

    @property
    def time_us(self) -> float | None:
        """Its time as served now: the served kernel's, else the vendor's (None: never timed)."""
        return self.served_us if self.served_us is not None else self.vendor_us


@dataclass
class Schedule:
    tasks: list[Task]
    budget_s: float
    wall_s: float = 0.0
    order: list[str] = field(default_factory=list)  # workload name of each round, in order

    def totals(self) -> dict:
        """End-to-end estimate over the tasks with a vendor time, us per model forward: `before`
        (every call on the vendor path), `after` (as served now), `start` (as served when this
        session began), and this session's gain in ms per forward per minute of wall time."""
        timed = [t for t in self.tasks if t.vendor_us is not None]
        before = sum(t.weight * t.vendor_us for t in timed)
        after = sum(t.weight * t.time_us for t in timed)
        start = sum(t.weight * t.start_us for t in timed)
        minutes = self.wall_s / 60
        return {"before_us": before, "after_us": after, "start_us": start, "tasks_timed": len(timed),
                "wall_s": self.wall_s, "gain_ms_per_min": (start - after) / 1e3 / minutes if minutes else 0.0}


def round_line(task: Task, sched: Schedule) -> str:
    """One line of progress after a task's round (what `shapetune tune --budget` and the grid job print)."""
    best = f"{task.tuned_us:.2f} us" if task.tuned_us is not None else "none"
    return (f"  [{sched.wall_s:5.0f} s] {task.workload.name} x{task.weight:g}: round {task.rounds}, "
            f"{task.trials} trials, best {best}{f' ({task.done})' if task.done else ''}")


def parse_budget(text: str) -> float:
    """A --budget value in seconds: a positive number with its unit, "90s", "20m", "1.5h"."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh])\s*", text or "")
    seconds = float(m[1]) * {"s": 1, "m": 60, "h": 3600}[m[2]] if m else 0.0
    if seconds <= 0:
        raise ValueError(f"--budget {text!r}: expected a positive time with its unit, e.g. 90s, 20m or 1h")
    return seconds


# -- state from the DB ------------------------------------------------------------------------------
def refresh(task: Task, db: TuningDB, target: Target, options: TuneOptions) -> None:
    """Read the task's state back from the DB. Times follow the registry's dispatch rule
    (kernels.registry.Registry.dispatch): each run's fastest measured record against the fastest
    vendor path timed in that run (of the current version: Candidate.version); served is the fastest
    record that is `servable` there."""
    w = task.workload
    current = versions(w, target)
    _, task.trials = db.held(w, target, options.templates, current)
    rows = db.iter_results(w.key, target.key, status="ok", origin="measured")  # newest first
    recs = [r for _, r in rows if _finite(r.latency.median_us)
            and current.get(r.candidate.template, r.candidate.version) == r.candidate.version]
    vendors: dict[str, float] = {}  # run id -> its fastest vendor path
    newest = None
    for b in db.baselines(w.key, target.key):  # newest first
        newest = newest or b.run_id
        vendors[b.run_id] = min(vendors.get(b.run_id, math.inf), vendor_us(b))
    runs: dict[str, float] = {}  # run id -> its fastest record
    for r in recs:
        runs[r.run_id] = min(runs.get(r.run_id, math.inf), r.latency.median_us)
    wins = sorted((us, run) for run, us in runs.items() if run in vendors and servable(us, vendors[run]))
    task.served_us = wins[0][0] if wins else None
    task.vendor_us = vendors[wins[0][1]] if wins else vendors.get(newest)
    task.tuned_us = min(runs.values()) if runs else None
    older = [r.latency.median_us for r in recs[options.batch:]]  # all but the newest round's worth
    before = min(older) if older else task.vendor_us
    task.last_gain = max(0.0, 1 - task.tuned_us / before) if task.tuned_us and before else 0.0
    if task.start_us is None and task.vendor_us is not None:
        task.start_us = task.time_us if task.rounds == 0 else task.vendor_us
        task.started_on_vendor = task.rounds > 0
    elif task.started_on_vendor:  # its vendor time as re-timed in this run (Tuner._retime_vendor)
        task.start_us = task.vendor_us
    if task.trials >= task.space:
        task.done = "exhausted"
    elif task.trials >= options.trials:
        task.done = "cap"


def _finite(us) -> bool:
    return isinstance(us, (int, float)) and math.isfinite(us) and us > 0


# -- the warm-up order -------------------------------------------------------------------------------
# A roofline per target kind: (flop/s, bytes/s, s per call). Only their ratios order the cold tasks;
# the H200's dense fp16 tensor-core rate and HBM3e bandwidth at what a tuned kernel reaches, and a
# launch; on the CPU, a few cores' vector rate and DRAM bandwidth.
ROOFLINE = {"cuda": (600e12, 4.0e12, 3e-6), "llvm": (2e11, 2e10, 1e-6)}
PRIOR = 1 - ALPHA  # headroom of an op nothing is known of: gain_rate's at one round with no gain


@functools.lru_cache(maxsize=None)
def roofline_us(w: Workload, kind: str) -> float:
    """A time estimate before anything was measured: the slower of its flops at the target's rate
    and its minimal bytes (inputs read once, output written once) at its bandwidth, plus a launch.
    Cached: the warm-up order asks for every cold task's before each warm-up round."""
    from .runner import min_traffic_bytes

    flop_s, byte_s, call_s = ROOFLINE.get(kind, ROOFLINE["cuda"])
    try:
        flops = w.flops
    except NotImplementedError:  # memory-bound ops count no flops
        flops = 0.0
    return 1e6 * (max(flops / flop_s, min_traffic_bytes(w) / byte_s) + call_s)


def op_headroom(tasks: list[Task]) -> dict[str, float]:
    """Per op, the mean share of its time tuning took off the vendor path over the tasks timed so far
    (0 where the vendor stayed faster): the expected gain of warming up another task of that op
    (Ansor's similar-task term, similarity = same op). Ops with no timed task get none here."""
    gains: dict[str, list[float]] = {}
    for t in tasks:
        if t.vendor_us and t.tuned_us:
            gains.setdefault(t.workload.op, []).append(max(0.0, 1 - t.tuned_us / t.vendor_us))
    return {op: sum(g) / len(g) for op, g in gains.items()}


def cold_priority(task: Task, kind: str, headroom: dict[str, float], floor: float = FLOOR) -> float:
    """A cold task's expected gain from its warm-up: weight x roofline time x its op's headroom
    (PRIOR where none of its op was timed yet), floored like `gain_rate`'s."""
    est = task.time_us if task.time_us is not None else roofline_us(task.workload, kind)
    return task.weight * est * max(floor, headroom.get(task.workload.op, PRIOR))


def warmup_size(cold: list[Task], slots: int, warmup: int, per_task_s: float | None, left_s: float) -> int:
    """How many of `cold` (in warm-up order) to warm up together: the fewest of the first whose
    warm-up candidates (each min(warmup, its untried space)) fill the build pool's `slots` workers,
    at least one (16 workers, 4 candidates each: 4 tasks); at most as many as the remaining budget
    left_s fits at per_task_s seconds each, rounded up (the median warm-up time per task so far,
    None before one was timed: no cap), so a batch overruns the budget by about one task's time."""
    n, cands = 0, 0
    while n < len(cold) and (n == 0 or cands < slots):
        cands += max(1, min(warmup, cold[n].space - cold[n].trials))
        n += 1
    if per_task_s:
        n = min(n, max(1, math.ceil(left_s / per_task_s)))
    return n


# -- the scheduler ----------------------------------------------------------------------------------
def round_seconds(task: Task, tasks: list[Task], batch: int) -> float:
    """A round's expected wall time for `task`: batch x the median seconds per candidate of its own
    rounds after its first, which also timed the vendor path and may have started the worker pools
    (one-time costs, not the next round's); with only that first round, the median of every task's
    first round; 1 s before anything was timed (the same for all tasks, so it cancels)."""
    rounds = task.round_s[1:] or [t.round_s[0] for t in tasks if t.round_s]
    per = [s / n for s, n in rounds if n]
    return statistics.median(per) * batch if per else 1.0


def priority(task: Task, tasks: list[Task], batch: int) -> float:
    """`gain_rate` of a task's state."""
    rounds = max(1.0, task.trials / batch)  # rounds' worth of trials held: a resumed task has history
    return gain_rate(task.weight, task.time_us, task.last_gain, rounds, round_seconds(task, tasks, batch))


def schedule(weights: dict[Workload, float], target: Target, budget_s: float,
             db_path: str | Path | None = None, options: TuneOptions = TuneOptions(),
             cap: int | None = None, warmup: int = WARMUP,
             on_round: Callable[[Task, Schedule], None] | None = None,
             clock: Callable[[], float] = time.monotonic, warmup_tasks: int | None = None) -> Schedule:
    """Tune the workloads of `weights` ({workload: calls per model forward}) for about budget_s
    seconds of wall time, round by round where each pays most. cap: at most this many trials per
    workload (records held, as TuneOptions.trials with top_up). warmup: candidates in a warm-up
    round; warmup_tasks: this many tasks warmed up together (None: as many as `warmup_size` says
    fill the build pool; 1: one by one). Raises ValueError if no template covers a workload; a task
    whose round fails (its vendor path, say) is marked failed and skipped, the others of its batch not.

    The warm-up takes the cold tasks in batches, each the top of `cold_priority`, recomputed (with
    `op_headroom`) after every batch: within a batch the later tasks do not yet profit from what the
    earlier ones found of their op, so the order can differ slightly from warming them one by one."""
    if budget_s <= 0:
        raise ValueError(f"budget must be positive, got {budget_s}")
    if any(not (v > 0) for v in weights.values()):
        raise ValueError("every weight (calls per forward) must be positive")
    opts = replace(options, trials=cap or NO_CAP, top_up=True)
    tasks = [Task(w, float(v), len(search_space(w, target, opts.templates))) for w, v in weights.items()]
    sched = Schedule(tasks, budget_s)
    t0 = clock()
    with TuningDB(db_path or config.default_db_path()) as db, Tuner(db, target, opts) as tuner:
        for t in tasks:
            refresh(t, db, target, opts)

        def account(t: Task, result, seconds: float):
            """A task's round is over (`result` its WorkloadReport, or the RuntimeError it failed
            with), having cost `seconds`: its counts and state, then on_round."""
            if isinstance(result, RuntimeError):  # the vendor path or the runner failed for this workload alone
                t.done = "failed: " + (str(result).strip().splitlines() or [type(result).__name__])[0][:200]
            measured = 0 if t.done else result.measured
            t.rounds += 1
            t.measured += measured
            t.round_s.append((seconds, measured))
            if not t.done:
                refresh(t, db, target, opts)
                if measured == 0:  # nothing left to claim (another tuner holds the rest)
                    t.done = "exhausted"
            sched.order.append(t.workload.name)
            sched.wall_s = clock() - t0
            if on_round:
                on_round(t, sched)

        def run_round(t: Task, n: int):
            started = clock()
            try:
                rep = tuner.tune(t.workload, rounds=1, batch=n)
            except RuntimeError as e:
                rep = e
            account(t, rep, clock() - started)

        def warm_up(group: list[Task], n: int):
            """One warm-up round of each task of `group` (Tuner.tune_batch). A task's time: its
            share of the batch's builds (by candidates, which build in parallel) and its own vendor
            timing and measuring."""
            last, build_s, claimed = clock(), 0.0, []

            def on_built(counts: list[int]):
                nonlocal last, build_s
                build_s, last = clock() - last, clock()
                claimed.extend(counts)

            def on_report(i: int, result):
                nonlocal last
                share = build_s * claimed[i] / max(1, sum(claimed))
                group[i].warmup_build_s = share
                account(group[i], result, share + clock() - last)
                last = clock()

            tuner.tune_batch([t.workload for t in group], n, on_built=on_built, on_report=on_report)

        live = lambda: [t for t in tasks if not t.done]  # noqa: E731
        cold = [t for t in live() if t.trials == 0 or t.vendor_us is None]
        n = min(warmup, opts.batch)
        while cold and clock() - t0 < budget_s:  # a budget that ends here has warmed what pays most
            head = op_headroom(tasks)  # what the warm-ups so far (and the DB) say of each op
            cold.sort(key=lambda t: cold_priority(t, target.kind, head), reverse=True)  # stable: ties keep their order
            timed = [t.round_s[0][0] for t in tasks if t.round_s]
            k = warmup_tasks or warmup_size(cold, tuner.builder.pool.workers, n,
                                            statistics.median(timed) if timed else None, budget_s - (clock() - t0))
            group, cold = cold[:k], cold[k:]
            warm_up(group, n)
        while clock() - t0 < budget_s:
            ready = [t for t in live() if t.time_us is not None]
            if not ready:
                break
            run_round(max(ready, key=lambda t: priority(t, tasks, opts.batch)), opts.batch)
    sched.wall_s = clock() - t0
    return sched
