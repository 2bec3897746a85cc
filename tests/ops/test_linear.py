"""shapetune::linear: the custom op uses tuned records, matches torch, falls back with a counted cause.

Tolerances: fp32 on the CPU, tuned TVM kernel vs torch: 1e-4 (accumulation order differs);
fp16 on the GPU vs an fp32 torch reference on the same fp16 inputs: 1e-2 (fp16 output rounding).
"""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import kernels
from kernels.registry import Registry, servable, vendor_us
from scheduler.tuner import TuneOptions, tune
from shapetune.db import TuningDB
from shapetune.target import detect
from shapetune.ops.linear import linear_workload

SHAPES = [(37, 24, 40, True), (16, 8, 16, False)]


@pytest.fixture(scope="module")
def tuned_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("db") / "tuning.db"
    ws = [linear_workload(m, n, k, "float32", b) for m, n, k, b in SHAPES]
    tune(ws, detect("llvm"), path, TuneOptions(trials=3, batch=3, templates=("gemm_llvm",)))
    return path


@pytest.mark.parametrize("m,n,k,bias", SHAPES)
def test_op_uses_tuned_kernel_and_matches_torch(registry, m, n, k, bias):
    g = torch.Generator().manual_seed(m * n + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    y = kernels.linear(x, w, b)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-4)
    assert registry.calls[("linear", "tuned")] >= 1
    assert registry.calls.get(("linear", "not_tuned"), 0) == 0


def test_leading_dims_are_flattened(registry):
    x = torch.randn(1, 37, 40)  # m = 37 after flattening
    w, b = torch.randn(24, 40), torch.randn(24)
    torch.testing.assert_close(kernels.linear(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-4)
    assert registry.calls[("linear", "tuned")] == 1


def test_untuned_shape_falls_back_and_is_counted(registry):
    x, w = torch.randn(3, 5), torch.randn(7, 5)
    torch.testing.assert_close(kernels.linear(x, w), x @ w.T)
    assert registry.calls[("linear", "not_tuned")] == 1
    assert kernels.fallback_summary()["linear"]["not_tuned"] == 1


def test_vendor_faster_falls_back(tuned_db):
    reg = Registry(db_path=tuned_db, target=detect("llvm"), require_faster=True)
    w = linear_workload(37, 24, 40, "float32", True)
    res = reg.resolve(w)
    with TuningDB(tuned_db) as db:  # one tuning run: its best record vs its vendor time
        best, vendor = db.best(w.key, reg.target.key), db.baseline(w.key, reg.target.key)
    assert best.run_id == vendor.run_id
    expect = "exact" if servable(best.latency.median_us, vendor_us(vendor)) else "fallback"
    assert res.kind == expect, res


def test_unsupported_dtype_and_bad_input(registry):
    x, w = torch.randn(4, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(kernels.linear(x, w), x @ w.T)
    assert registry.calls[("linear", "unsupported_dtype")] == 1
    with pytest.raises(ValueError, match="in_features"):
        kernels.linear(torch.randn(4, 6), torch.randn(5, 7))
    with pytest.raises(ValueError, match="dtypes differ"):
        kernels.linear(torch.randn(4, 6), torch.randn(5, 6, dtype=torch.float64))


def test_disabled_env(registry, monkeypatch):
    monkeypatch.setenv("SHAPETUNE_DISABLE", "1")
    registry.clear()
    x, w, b = torch.randn(37, 40), torch.randn(24, 40), torch.randn(24)
    torch.testing.assert_close(kernels.linear(x, w, b), torch.nn.functional.linear(x, w, b))
    assert registry.calls[("linear", "disabled")] == 1


def test_corrupt_db_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    reg = Registry(db_path=bad, target=detect("llvm"))
    with pytest.raises(Exception, match=str(bad.name)):
        reg.resolve(linear_workload(4, 4, 4, "float32", False))


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(registry, bias):
    x = torch.randn(2, 37, 40, requires_grad=True) if not bias else torch.randn(37, 40)
    w = torch.randn(24, 40, requires_grad=not bias)
    b = torch.randn(24) if bias else None
    opcheck(torch.ops.shapetune.linear.default, (x, w, b))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = torch.ops.shapetune.linear(torch.empty(2, 9, 16), torch.empty(32, 16), torch.empty(32))
    assert y.shape == (2, 9, 32)


def test_direct_path_only_where_the_dispatcher_adds_nothing(registry):
    """call_op runs an op's implementation directly for plain inference calls (no dispatcher cost)
    and goes through torch.ops wherever autograd, tracing, functorch or a mode needs it; both paths
    give the same result."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kernels.custom_op import direct_ok

    x, w, b = torch.randn(6, 16), torch.randn(8, 16), torch.randn(8)
    assert direct_ok((x, w, b)) and direct_ok((x, w, None))
    assert not direct_ok((x, w.requires_grad_(True), b))  # autograd must record
    with torch.no_grad():
        assert direct_ok((x, w, b))  # ... not under no_grad
        with torch.device("cpu"):
            assert not direct_ok((x, w, b))  # a function mode is active
        with FakeTensorMode():
            assert not direct_ok((x, w, b))
        assert bool(torch.func.vmap(lambda r: torch.tensor(float(not direct_ok((r, w, b)))))(x).all())
        torch.testing.assert_close(kernels.linear(x, w, b), torch.ops.shapetune.linear(x, w, b))
