"""scheduler.runner: what verification rejects, the copy yardstick's size, rotation over L2, and the
vendor variants (llvm; the GPU parts are marked gpu)."""

from __future__ import annotations

import functools
import importlib

import pytest

import scheduler.builder
from scheduler.isolation import IsolatedPool
from scheduler.templates import base
from shapetune.target import detect
from shapetune.workload import linear_workload


@pytest.fixture(scope="module")
def cpu():
    return detect("llvm")


@pytest.fixture
def bad_templates(monkeypatch):
    """tests/_bad_templates.py registered here and in every builder worker (see test_tuner.py)."""
    from cost_model import unregister_feature_fn

    mod = importlib.import_module("_bad_templates")
    mod.register_all()
    monkeypatch.setattr(scheduler.builder, "IsolatedPool", functools.partial(
        IsolatedPool, initializer=importlib.import_module, initargs=(mod.__name__,)))
    yield mod
    for name in mod.NAMES:
        base._TEMPLATES.pop(name, None)
        unregister_feature_fn(name)


# -- item 1: a kernel that writes into its inputs --------------------------------------------------
def test_kernel_writing_into_its_input_is_wrong_result(tmp_path, cpu, bad_templates):
    """clobbering_gemm zeroes x and writes y = b, which matches a reference computed from the
    clobbered x: it must be stored as wrong_result with the reason, and never served."""
    from kernels.registry import Registry
    from scheduler.tuner import TuneOptions, tune
    from shapetune.db import TuningDB

    w = linear_workload(64, 48, 40, "float32", bias=True)
    (rep,) = tune([w], cpu, tmp_path / "t.db", TuneOptions(trials=2, batch=2, templates=("clobbering_gemm",)))
    assert rep.by_status == {"wrong_result": 1}, rep.by_status
    assert rep.best is None
    with TuningDB(tmp_path / "t.db") as db:
        (r,) = db.results(w.key, cpu.key)
        assert r.candidate.template == "clobbering_gemm" and r.status == "wrong_result" and not r.verified
        assert r.error.startswith("input 0 (x) modified by the kernel: 2560 of 2560 elements changed"), r.error
        assert db.best(w.key, cpu.key) is None
    res = Registry(db_path=tmp_path / "t.db", target=cpu, require_faster=False).resolve(w)
    assert res.kind == "fallback" and res.record is None and res.cause == "all_failed", res


def test_inputs_are_compared_bit_for_bit():
    """One changed element, -0.0 written over +0.0, NaN over a number: each counts; NaN == NaN."""
    import torch

    from scheduler.runner import first_modified

    x = torch.randn(6, 7, generator=torch.Generator().manual_seed(0))
    x[0, 0], x[0, 1], x[0, 2] = 0.0, float("nan"), 1.0
    b = torch.randn(3, generator=torch.Generator().manual_seed(1)).half()
    before = [x.clone(), b.clone()]
    assert first_modified([x.clone(), b.clone()], before) is None
    for i, j, v in ((3, 4, float(x[3, 4]) + 0.5), (0, 0, -0.0), (0, 2, float("nan"))):
        y = x.clone()
        y[i, j] = v
        assert first_modified([y, b.clone()], before) == (0, 1), (i, j, v)
    b2 = b.clone()
    b2[2] = -b2[2]
    assert first_modified([x.clone(), b2], before) == (1, 1)
    assert first_modified([x.permute(1, 0), b], [x.clone().permute(1, 0), b.clone()]) is None  # any strides
