"""Fixtures shared by the kernels tests."""

from __future__ import annotations

import pytest

import kernels
from shapetune.target import detect


@pytest.fixture
def empty_registry(tmp_path):
    """The process-wide registry over an empty DB on the llvm target (every op runs torch's path,
    counted), restored afterwards."""
    prev = kernels.set_registry(kernels.Registry(db_path=tmp_path / "empty.db", target=detect("llvm")))
    yield kernels.get_registry()
    kernels.set_registry(prev)
