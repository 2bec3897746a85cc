"""A vendor path that fails while re-verifying (its runner worker crashed: H100, 2026-12-07,
F.group_norm's worker died during `prebuild`) must not abort the re-verification of every other
workload, and must not decide the failed workload's imports: they stay pending for a later run.

Before the fix, reverify raised RuntimeError out of prebuild (a broken serving path at startup).
Real TVM llvm kernels, real verification; the failing vendor path is a Runner that reports the
worker's death for one workload (the crash itself is covered by tests/scheduler/test_isolation.py).
"""

from __future__ import annotations

import dataclasses

from kernels.registry import Registry
from scheduler.reverify import reverify
from scheduler.runner import RunResult
from scheduler.tuner import Tuner
from shapetune.db import TuningDB
from shapetune.ops.linear import linear_workload

from .test_vendor_retime import DLIGHT, FASTER_US, ScriptedRunner, W, _tune, cpu  # noqa: F401

W2 = linear_workload(1, 8, 32, "float32", bias=False)


class VendorCrash(ScriptedRunner):
    """ScriptedRunner whose vendor paths of `broken` come back as a dead worker."""

    def __init__(self, target, broken):
        super().__init__(target, FASTER_US, outlier=False)
        self.broken = broken

    def vendors(self, workload):
        if workload in self.broken:
            return {"": RunResult("runtime_error", error="runner crashed: worker process died (crash or kill)")}
        return super().vendors(workload)


def test_a_vendor_failure_leaves_that_workload_pending_and_the_rest_go_on(tmp_path, cpu):  # noqa: F811
    path, old = tmp_path / "t.db", dataclasses.replace(cpu, torch_version="2.11.0")
    _tune(path, old, FASTER_US, outlier=False)
    with TuningDB(path) as db, Tuner(db, old, DLIGHT, runner=ScriptedRunner(old, FASTER_US, outlier=False)) as t:
        t.tune(W2)  # a second workload, tuned on the old target too
    new = dataclasses.replace(cpu, torch_version="2.99.0")
    verdicts = {v.workload: v for v in reverify(path, new, runner=VendorCrash(new, {W2}))}
    assert verdicts[W].passed is not None
    assert verdicts[W2].passed is None and "vendor_failed" in verdicts[W2].failed[0][1]
    reg = Registry(db_path=path, target=new)
    assert reg.resolve(W).cause == "tuned" and reg.resolve(W2).kind == "fallback"
    # nothing was decided for W2: a later run with a healthy vendor path adopts its record
    (v,) = reverify(path, new, runner=ScriptedRunner(new, FASTER_US, outlier=False))
    assert v.workload == W2 and v.passed is not None
    assert Registry(db_path=path, target=new).resolve(W2).cause == "tuned"
