"""Fixtures shared by the scheduler tests."""

from __future__ import annotations

import pytest

from scheduler import templates


@pytest.fixture(scope="module")
def cheap():
    """gemm_llvm candidates whose LLVM compile takes ~1 s, for a module's tests (unroll_k fully unrolls
    tm x tk statements: tm * tk >= 512 takes minutes; tests/scheduler/test_tuner.py does the same per test)."""
    t = templates.get("gemm_llvm")
    valid = t.valid
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(t, "valid", lambda w, tg, kn: valid(w, tg, kn) and (not kn["unroll_k"] or kn["tm"] * kn["tk"] <= 32))
        yield
