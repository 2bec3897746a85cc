"""Builder.build_many with a candidate that crashes its worker (real TVM builds on llvm, forkserver
workers): the crash is that candidate's build_error, and the builds caught in the wreck are rebuilt in
parallel (scheduler.isolation.IsolatedPool.run_all), each with its own result.

The templates live in tests/scheduler/_crash_templates.py and exist only in the builder's workers.
"""

from __future__ import annotations

import functools
from pathlib import Path

import scheduler.builder
from scheduler.builder import Builder
from scheduler.isolation import IsolatedPool
from scheduler import templates
from shapetune.ops.linear import linear_workload
from shapetune.records import Candidate
from shapetune.target import detect

from . import _crash_templates


def test_a_crashing_build_fails_alone_and_the_others_are_rebuilt_in_parallel(tmp_path, monkeypatch):
    meet = tmp_path / "meet"
    meet.mkdir()
    monkeypatch.setattr(scheduler.builder, "IsolatedPool", functools.partial(
        IsolatedPool, initializer=_crash_templates.setup, initargs=(str(meet),)))
    target = detect("llvm")
    w = linear_workload(16, 16, 16, "float32", False)
    plain = templates.get("dlight").space(w, target)[0]
    # the crash breaks the pool before both meet_gemm builds can run: they are rebuilt, and build only
    # if the rebuilds run side by side
    cands = [plain, Candidate("crash_gemm"), Candidate("meet_gemm", (("name", "a"),)),
             Candidate("meet_gemm", (("name", "b"),)), plain]
    b = Builder(target, tmp_path / "out", jobs=2)
    try:
        out = b.build(w, cands)
    finally:
        b.close()
    assert [r.candidate for r in out] == cands
    crash = out[1]
    assert crash.kind == "build_error" and crash.path is None and "WorkerCrashed" in crash.error, crash
    for r in out[:1] + out[2:]:
        assert r.kind == "" and not r.error and Path(r.path).is_file(), r
    assert not {"crash_gemm", "meet_gemm"} & {t.name for t in templates.all_templates()}  # workers only
