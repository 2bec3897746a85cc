"""The tuning loop: candidates -> cost-model ranking -> parallel build -> verify + time -> DB.

Per workload: measure the vendor path before the first candidate (its default and every variant,
e.g. group_norm's NCHW path, all under this Tuner's run id: dispatch compares a record only with the
fastest vendor timed in its own run; a rerun left with nothing to measure times nothing and reports
the stored baseline); then rounds of `batch` candidates until `trials` are spent. The vendor path is
timed once more in the run, right after the round in which the run's fastest record first becomes
`servable` against it (shapetune.serving): one disturbed vendor timing (a loaded CPU once timed a
~10 us LayerNorm at 7987 us) would otherwise make a kernel "faster" that is not, and dispatch, which
takes the fastest vendor per run, lets the re-timing outvote it. At most once per workload per run
(one extra vendor timing per winning workload, not one per round); a run whose records never beat
the vendor times it once. The first round always holds TVM's dlight default schedule (the
baseline). Each round the cost model is retrained on every result for this target in the DB (other
workloads included: what was learned on one shape transfers to the next), ranks the untried
candidates, and the top (1 - explore) of the batch plus a random `explore` share are built and
measured. Every result is committed the moment it exists, so an
interrupted run loses nothing and a rerun resumes: `trials` is a per-workload total (`top_up`),
candidates already measured for (workload, target) are never measured again (records of an older
template or op version, Candidate.version, are history: not counted, their knobs measured as this
version; the cost model still learns from them, its features being the knobs'), and each round's
candidates are claimed in the DB first, so two tuners on the same workloads never measure one twice.
`Tuner.tune_batch` gives one round to each of several workloads (the task scheduler's warm-up): the
same steps, but every workload's candidates are built in one pool batch and picked by one fit.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cost_model
from shapetune import config
from shapetune.buckets import DEFAULT
from shapetune.db import TuningDB
from shapetune.records import Candidate, MeasureResult, VendorBaseline
from shapetune.serving import servable, vendor_us
from shapetune.target import Target
from shapetune.workload import Workload

from . import templates, workspaces
from .builder import Builder, BuildResult
from .isolation import ClosedOnExit
from .runner import RunOptions, Runner, vendor_baselines


@dataclass(frozen=True)
class TuneOptions:
    trials: int = 32  # measured candidates per workload (the dlight baseline included)
    batch: int = 8  # candidates built in parallel and measured per round
    explore: float = 0.25  # share of each round picked at random instead of by the model
    seed: int = 0
    templates: tuple[str, ...] = ()  # restrict to these (default: every template that applies)
    build_timeout_s: float = 180
    run_timeout_s: float = 60
    # True: `trials` is the per-workload total in the DB (records of these templates, any status), so
    # a rerun of a job cut off or killed measures only what is missing. False: `trials` new ones.
    top_up: bool = True


@dataclass
class WorkloadReport:
    workload: Workload
    measured: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    best: MeasureResult | None = None
    dlight: MeasureResult | None = None
    vendor: VendorBaseline | None = None  # the op's default vendor path (re-timed: the faster timing)
    vendor_variants: dict[str, VendorBaseline] = field(default_factory=dict)  # variant -> its baseline
    held: int = 0  # records (of the chosen templates) and live claims in the DB when this run stopped
    vendor_reused: bool = False  # nothing measured: vendor is the stored baseline of an earlier run
    vendor_retimed: bool = False  # this run timed the vendor twice: a record of it beat the first timing

    @property
    def speedup(self) -> float | None:
        """Default vendor path's time over best tuned time (>1: the tuned kernel wins)."""
        if self.best is None or self.vendor is None:
            return None
        return self.vendor.latency.median_us / self.best.latency.median_us


@dataclass
class _Work:
    """A workload being tuned by one `Tuner.tune` or `tune_batch` call: its report so far, its
    search space, and the candidates of its current round (claimed in the DB)."""

    rep: WorkloadReport
    space: list[Candidate]
    versions: dict[str, str]  # template -> the version of its candidates (`versions`)
    first: bool = True  # its next round is the call's first: it holds the dlight default
    picked: list[Candidate] = field(default_factory=list)


def _timed(r: MeasureResult) -> bool:
    """Whether an ok record's median is a finite, positive time (an older version's rows or raw SQL
    can leave NULL, NaN or 0 in the DB)."""
    med = r.latency.median_us if r.latency is not None else None
    return isinstance(med, (int, float)) and math.isfinite(med) and med > 0


def _faster(old: VendorBaseline, new: VendorBaseline) -> VendorBaseline:
    """The faster of two timings of one vendor path (`vendor_us`; a tie keeps the older)."""
    return new if vendor_us(new) < vendor_us(old) else old


def versions(workload: Workload, target: Target) -> dict[str, str]:
    """{template: the Candidate.version of its candidates for `workload` in this code}: what `TuningDB.held`
    counts (a record of an older version is history; its knobs are measured again, as this version)."""
    return {t.name: templates.current_version(t.name, workload.op) for t in templates.for_workload(workload, target)}


def search_space(workload: Workload, target: Target, names: tuple[str, ...] = ()) -> list[Candidate]:
    out = []
    for t in templates.for_workload(workload, target):
        if not names or t.name in names:
            out.extend(t.space(workload, target))
    if not out:
        raise ValueError(f"no template covers {workload.name} on {target.kind}")
    return out


class Tuner(ClosedOnExit):
    def __init__(self, db: TuningDB, target: Target, options: TuneOptions = TuneOptions(),
                 model: cost_model.CostModel | None = None, work_dir: str | Path | None = None,
                 run_options: RunOptions | None = None, on_result=None, runner: Runner | None = None):
        """runner: what verifies and times candidates and the vendor path (default: a Runner of
        run_options and options.run_timeout_s); the Tuner closes it."""
        self.db, self.target, self.opt = db, target, options
        self.model = model or cost_model.create("xgb", seed=options.seed)
        self.rng = random.Random(options.seed)
        self.run_id = uuid.uuid4().hex[:12]
        self._tmp = None
        if work_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="shapetune-build-")
            work_dir = self._tmp.name
        self.builder = Builder(target, work_dir, timeout_s=options.build_timeout_s)
        self.runner = runner or Runner(target, run_options, timeout_s=options.run_timeout_s, seed=options.seed)
        self.on_result = on_result or (lambda result: None)
        # This run's vendor timing per workload (each path's faster, once re-timed), its fastest
        # verified record, and the workloads whose vendor it timed a second time.
        self._vendors: dict[Workload, tuple[VendorBaseline, dict[str, VendorBaseline]]] = {}
        self._best_us: dict[Workload, float] = {}
        self._retimed: set[Workload] = set()
        self._model_stale = True  # results were stored since the cost model was last fitted

    def close(self, abort: bool = False):
        """abort: kill the build and measurement workers instead of waiting for their calls."""
        self.builder.close(abort)
        self.runner.close(abort)
        if self._tmp is not None:
            self._tmp.cleanup()

    # -- one workload, or one round of many -----------------------------------------------------
    def tune(self, workload: Workload, rounds: int | None = None, batch: int | None = None) -> WorkloadReport:
        """Tune `workload` to `trials`; with `rounds`, stop after that many rounds that measured
        (the task scheduler's unit of time, scheduler.task_scheduler), of `batch` candidates each
        instead of options.batch. A workload tuned round by round keeps this run's vendor timing
        (timed once, and once more when a record first beats it: `_retime_vendor`)."""
        work = self._begin(workload)
        while rounds != 0 and self._claim(work, batch or self.opt.batch):
            self._finish(work, self.builder.build(workload, work.picked))
            if rounds is not None:
                rounds -= 1
        return self._report(work)

    def tune_batch(self, workloads: list[Workload], batch: int | None = None,
                   on_built: Callable[[list[int]], None] | None = None,
                   on_report: Callable[[int, WorkloadReport | RuntimeError], None] | None = None,
                   ) -> list[WorkloadReport | RuntimeError]:
        """One round of each workload, as `tune(w, rounds=1, batch=batch)` of each in turn would
        measure it (the same records, claims, vendor timings and re-timing), but with every
        workload's candidates built in ONE pool batch (`Builder.build_many`) and the cost model
        fitted once for all (the batch's candidates are picked before any of its results exist).
        Then workload by workload: its vendor path is timed, its candidates verified and timed, its
        claims released. on_built(claimed) is called once the builds are done, with how many
        candidates each workload claimed; on_report(i, result) after
        workload i's round. A workload whose vendor path or runner fails (RuntimeError) gets that
        error as its result, its claims released; the others go on."""
        works = [self._begin(w) for w in workloads]
        for work in works:
            self._claim(work, batch or self.opt.batch)
        builds = self.builder.build_many([(work.rep.workload, work.picked) for work in works])
        if on_built:
            on_built([len(work.picked) for work in works])
        out: list[WorkloadReport | RuntimeError] = []
        for i, (work, built) in enumerate(zip(works, builds)):
            try:
                if work.picked:
                    self._finish(work, built)
                result = self._report(work)
            except RuntimeError as e:  # the vendor path or the runner failed for this workload alone
                result = e
            out.append(result)
            if on_report:
                on_report(i, result)
        return out

    def _begin(self, workload: Workload) -> _Work:
        if workload.dynamic:  # a shape-bucket workload: the DB names the policy it belongs to
            self.db.add_buckets(DEFAULT.rows(workload.op))
        return _Work(WorkloadReport(workload), search_space(workload, self.target, self.opt.templates),
                     versions(workload, self.target))

    def _claim(self, work: _Work, batch: int) -> list[Candidate]:
        """Pick and claim the next round's candidates of `work` (into work.picked); [] once its
        budget is spent or its space tried. What the DB holds now (records, and candidates other
        tuners are measuring) is skipped and, with top_up, counts toward `trials`; a claim that lost
        every pick to another tuner picks again."""
        rep, tpl = work.rep, self.opt.templates
        work.picked = []
        while not work.picked:
            held, rep.held = self.db.held(rep.workload, self.target, tpl, work.versions)
            budget = self.opt.trials - (rep.held if self.opt.top_up else rep.measured)
            untried = [c for c in work.space if c.key not in held]
            if budget <= 0 or not untried:
                break
            picked = self._pick(rep.workload, untried, min(batch, budget), work.first)
            work.picked = self.db.claim(rep.workload, self.target, picked, self.run_id,
                                        self.opt.trials if self.opt.top_up else None, tpl, work.versions)
            work.first = False
        return work.picked

    def _finish(self, work: _Work, builds: list[BuildResult]) -> None:
        """The rest of a round whose candidates (work.picked) are built: the vendor path is timed if
        this run has not yet, the candidates verified and timed, every result stored, the claims
        released (also when this fails), the vendor re-timed if a record now beats it."""
        w, rep = work.rep.workload, work.rep
        try:
            if rep.vendor is None:  # this run measures: the vendor is timed in it, once
                rep.vendor, rep.vendor_variants = self._run_vendor(w)
            for res in self._measure(w, builds):
                self.db.add_result(res)
                self._model_stale = True
                rep.measured += 1
                rep.by_status[res.status] = rep.by_status.get(res.status, 0) + 1
                if res.status == "ok" and _timed(res):
                    self._best_us[w] = min(self._best_us.get(w, math.inf), res.latency.median_us)
                self.on_result(res)
        finally:
            self.db.release(w, self.target, work.picked, self.run_id)
            for b in builds:
                if b.path is not None:
                    workspaces.remove(b.path)
        if self._retime_vendor(w):
            rep.vendor, rep.vendor_variants = self._run_vendor(w)

    def _report(self, work: _Work) -> WorkloadReport:
        rep, w = work.rep, work.rep.workload
        _, rep.held = self.db.held(w, self.target, self.opt.templates, work.versions)
        rep.vendor_retimed = w in self._retimed
        rep.best = self.db.best(w.key, self.target.key)
        dl = [r for r in self.db.results(w.key, self.target.key, template="dlight", status="ok") if _timed(r)]
        rep.dlight = min(dl, key=lambda r: r.latency.median_us) if dl else None
        if rep.vendor is None:  # nothing measured in this run (a finished job rerun): report the stored vendor
            stored = self._stored_vendor(w, rep.best)
            rep.vendor_reused = stored is not None
            rep.vendor, rep.vendor_variants = stored or self._measure_vendor(w)
        return rep

    def _pick(self, workload: Workload, untried: list[Candidate], n: int, first: bool) -> list[Candidate]:
        picked: list[Candidate] = []
        if first:
            picked += [c for c in untried if c.template == "dlight"][:1]
        rest = [c for c in untried if c not in picked]
        n_explore = min(len(rest), round((n - len(picked)) * self.opt.explore))
        if self._model_stale:  # retrained on every result for this target, once per new results
            self.model.fit(self.db.results(target_key=self.target.key))
            self._model_stale = False
        if self.model.is_trained:
            order = self.model.rank(workload, self.target, rest)
            n_model = n - len(picked) - n_explore
            picked += [rest[i] for i in order[:n_model]]
            rest = [rest[i] for i in order[n_model:]]
            picked += self.rng.sample(rest, min(n_explore, len(rest)))
        else:
            picked += self.rng.sample(rest, min(n - len(picked), len(rest)))
        return picked

    def _measure(self, workload: Workload, builds: list[BuildResult]) -> list[MeasureResult]:
        """Verify and time each built candidate (one at a time: timings never overlap)."""
        out = []
        for b in builds:
            common = dict(workload=workload, target=self.target, candidate=b.candidate,
                          build_s=b.build_s, run_id=self.run_id)
            if b.path is None:
                out.append(MeasureResult(status="timeout" if b.kind == "timeout" else "build_error",
                                         error=b.error, created=time.time(), **common))
                continue
            r = self.runner.run(workload, b.path)
            out.append(MeasureResult(status=r.status, latency=r.latency, error=r.error,
                                     max_rel_err=r.rel_err, created=time.time(), **common))
            workspaces.remove(b.path)
        return out

    def _stored_vendor(self, workload: Workload, best: MeasureResult | None
                       ) -> tuple[VendorBaseline, dict[str, VendorBaseline]] | None:
        """The vendor paths stored for (workload, this target) by one run, as `_run_vendor`
        returns them (each path's fastest timing in that run, by `vendor_us`): best's run if it
        timed every path (its speedup is then the one dispatch judges), else the newest run that
        did; None if no run did."""
        from shapetune.ops import opdef

        od = opdef(workload.op)
        names = {od.baseline_name(v): v for v in ("", *od.vendor_variants)}
        runs: dict[str, dict[str, VendorBaseline]] = {}
        for b in self.db.baselines(workload.key, self.target.key):  # newest first
            if b.name in names:
                runs.setdefault(b.run_id, {})
                kept = runs[b.run_id].get(names[b.name])
                if kept is None or vendor_us(b) <= vendor_us(kept):  # a tie keeps the earlier, as _run_vendor
                    runs[b.run_id][names[b.name]] = b
        pick = runs.get(best.run_id) if best is not None else None
        if pick is None or len(pick) < len(names):
            pick = next((r for r in runs.values() if len(r) == len(names)), None)
        if pick is None:
            return None
        pick = dict(pick)
        return pick.pop(""), pick

    def _run_vendor(self, workload: Workload) -> tuple[VendorBaseline, dict[str, VendorBaseline]]:
        """This run's vendor timing of `workload`: measured on the first call, then the same (each
        path's faster timing once `_retime_vendor` timed it again)."""
        if workload not in self._vendors:
            self._vendors[workload] = self._measure_vendor(workload)
        default, variants = self._vendors[workload]
        return default, dict(variants)

    def _retime_vendor(self, workload: Workload) -> bool:
        """Time the vendor path of `workload` once more in this run if its fastest record of the run
        is now `servable` against the run's fastest vendor path and it was not re-timed yet; keep
        each path's faster timing. Whether it re-timed now."""
        best = self._best_us.get(workload)
        if workload in self._retimed or workload not in self._vendors or best is None:
            return False
        default, variants = self._vendors[workload]
        if not servable(best, min(vendor_us(b) for b in (default, *variants.values()))):
            return False
        self._retimed.add(workload)  # before timing: a vendor path that fails now is not retried
        again, again_variants = self._measure_vendor(workload)
        self._vendors[workload] = (_faster(default, again),
                                   {v: _faster(b, again_variants[v]) for v, b in variants.items()})
        return True

    def _measure_vendor(self, workload: Workload) -> tuple[VendorBaseline, dict[str, VendorBaseline]]:
        """Time the op's default vendor path and each of its variants in this run and store each
        (runner.vendor_baselines); returns (default, {variant: baseline})."""
        out = vendor_baselines(self.runner, workload, self.run_id)
        for b in out.values():
            self.db.add_baseline(b)
        return out.pop(""), out


def tune(workloads: list[Workload], target: Target, db_path: str | Path | None = None,
         options: TuneOptions = TuneOptions(), on_result=None, on_workload=None) -> list[WorkloadReport]:
    """Tune each workload into the DB at db_path (default: config.default_db_path())."""
    reports = []
    with TuningDB(db_path or config.default_db_path()) as db, \
            Tuner(db, target, options, on_result=on_result) as tuner:
        for w in workloads:
            rep = tuner.tune(w)
            reports.append(rep)
            if on_workload:
                on_workload(rep)
    return reports
