"""Fixtures shared by the kernels tests."""

from __future__ import annotations

import pytest

import kernels
from shapetune.target import detect


def _empty(tmp_path, kind: str):
    prev = kernels.set_registry(kernels.Registry(db_path=tmp_path / "empty.db", target=detect(kind)))
    yield kernels.get_registry()
    kernels.set_registry(prev)


@pytest.fixture
def empty_registry(tmp_path):
    """The process-wide registry over an empty DB on the llvm target (every op runs torch's path,
    counted), restored afterwards."""
    yield from _empty(tmp_path, "llvm")


@pytest.fixture
def empty_cuda_registry(tmp_path):
    """The same on the cuda target (GPU tests: every op on its vendor path)."""
    yield from _empty(tmp_path, "cuda")
