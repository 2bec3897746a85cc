"""Portable records (issue 12 item 5): a kernel depends on the target's KERNEL_FIELDS (kind, arch, TVM
and CUDA versions), not on the torch version (which only changes the vendor baseline) or on which GPU
of that architecture ran it. On a target that shares them, another target's records are candidates
that `reverify` (`shapetune db verify`, prebuild) rebuilds, re-verifies and re-times here, vendor
timed in the same run; never served as measured before that. llvm, a tiny GEMM.
"""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from kernels.registry import Registry
from scheduler.reverify import portable, reverify
from scheduler.tuner import TuneOptions, tune
from shapetune.db import TuningDB
from shapetune.ops.linear import linear_workload
from shapetune.records import Candidate
from shapetune.target import detect

W = linear_workload(16, 8, 16, "float32", bias=False)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """W tuned on the llvm target of this machine, as measured by "torch 2.11.0"."""
    here = detect("llvm")
    old = dataclasses.replace(here, torch_version="2.11.0")
    path = tmp_path_factory.mktemp("portable") / "t.db"
    tune([W], old, path, TuneOptions(trials=3, batch=3, templates=("dlight", "gemm_llvm")))
    return path, old


def test_another_torch_version_re_times_the_kernels_here(tuned, tmp_path):
    src, old = tuned
    path = tmp_path / "t.db"
    shutil.copy(src, path)
    new = dataclasses.replace(old, torch_version="2.99.0")
    assert new.shares_kernels_with(old) and new.key != old.key
    reg = Registry(db_path=path, target=new, require_faster=False)
    before = reg.resolve(W)
    assert before.cause == "stale" and "re-verifies and re-times" in before.reason  # never served as is

    verdicts = reverify(path, new)
    assert [v.workload for v in verdicts] == [W] and verdicts[0].passed is not None
    with TuningDB(path) as db:
        best_old = db.best(W.key, old.key)
        best_new = db.best(W.key, new.key)
        assert best_new.target == new and best_new.candidate == best_old.candidate
        assert best_new.run_id != best_old.run_id  # timed in this run, not copied
        assert db.baselines(W.key, new.key, limit=1)[0].run_id == best_new.run_id  # the vendor too
        n = len(db.results(target_key=new.key))
    reg = Registry(db_path=path, target=new, require_faster=False)
    assert reg.resolve(W).record.run_id == best_new.run_id
    assert reverify(path, new) == []  # served here now: nothing more to adopt
    with TuningDB(path) as db:
        assert len(db.results(target_key=new.key)) == n


def test_another_tvm_or_arch_is_never_a_candidate(tuned, tmp_path):
    src, old = tuned
    path = tmp_path / "t.db"
    shutil.copy(src, path)
    for other in (dataclasses.replace(old, tvm_version="0.99.0"), dataclasses.replace(old, arch="other-cpu")):
        assert not other.shares_kernels_with(old)
        with TuningDB(path) as db:
            assert portable(db, other) == []
        assert reverify(path, other) == []


def test_a_candidate_that_fails_here_is_stored_failed_and_not_retried(tuned, tmp_path):
    src, old = tuned
    path = tmp_path / "t.db"
    new = dataclasses.replace(old, torch_version="2.99.0", device_name="another CPU of the same arch")
    with TuningDB(src) as db:
        good = db.best(W.key, old.key)
    with TuningDB(path) as db:  # the other target's only record: knobs outside the template's space
        db.add_result(dataclasses.replace(good, candidate=Candidate("gemm_llvm", (("tm", 999),)), run_id="x"))
    (v,) = reverify(path, new)
    assert v.passed is None and "knobs" in v.failed[0][1]
    with TuningDB(path) as db:
        (r,) = db.results(W.key, new.key)
        assert r.status == "build_error" and "knobs" in r.error
    assert reverify(path, new) == []  # tried here: not again
