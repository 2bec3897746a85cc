"""Shared test setup: GPU skipping, and an environment that never touches the user's cache."""

from __future__ import annotations

import pytest


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # no torch, or a broken driver: either way, no GPU for us
        return False


def pytest_collection_modifyitems(config, items):
    if not any(item.get_closest_marker("gpu") for item in items):
        return  # don't import torch just to learn we need no GPU
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """Every test gets its own cache dir and DB path, and at most two builder processes.

    These are read in the test process (paths are handed to workers explicitly). Note that
    forkserver workers inherit the environment of the fork server, i.e. of the moment it started,
    not of the current test.
    """
    root = tmp_path_factory.mktemp("shapetune-env")
    monkeypatch.setenv("SHAPETUNE_CACHE_DIR", str(root / "cache"))
    monkeypatch.setenv("SHAPETUNE_DB", str(root / "tuning.db"))
    monkeypatch.setenv("SHAPETUNE_BUILD_JOBS", "2")
    monkeypatch.delenv("SHAPETUNE_TARGET", raising=False)
    monkeypatch.delenv("SHAPETUNE_DISABLE", raising=False)


@pytest.fixture
def registry(tuned_db):
    """The process-wide registry, pointed at the test module's `tuned_db` fixture (llvm target),
    using tuned kernels even where the vendor path measured faster; restored afterwards."""
    from kernels.registry import Registry, set_registry
    from shapetune.target import detect

    reg = Registry(db_path=tuned_db, target=detect("llvm"), require_faster=False)
    prev = set_registry(reg)
    yield reg
    set_registry(prev)


@pytest.fixture
def bad_templates(monkeypatch):
    """tests/_bad_templates.py's deliberately broken templates, registered here and in every builder
    worker (its pool's workers import the module, tests._bad_templates, by name, which registers them);
    unregistered afterwards."""
    import functools
    import importlib

    import scheduler.builder
    from cost_model import unregister_feature_fn
    from scheduler.isolation import IsolatedPool
    from scheduler.templates import base

    mod = importlib.import_module("tests._bad_templates")
    mod.register_all()  # again, if an earlier test unregistered them
    monkeypatch.setattr(scheduler.builder, "IsolatedPool", functools.partial(
        IsolatedPool, initializer=importlib.import_module, initargs=(mod.__name__,)))
    yield mod
    for name in mod.NAMES:
        base._TEMPLATES.pop(name, None)
        unregister_feature_fn(name)


@pytest.fixture(scope="module")
def _module_kernel_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("kernels")


@pytest.fixture
def module_kernel_cache(_module_kernel_cache, monkeypatch):
    """One kernel cache for a test module (still a temporary dir), for modules whose tests would
    otherwise each build the same kernels again; a module's autouse fixture asks for it."""
    monkeypatch.setenv("SHAPETUNE_CACHE_DIR", str(_module_kernel_cache))
    return _module_kernel_cache
