"""scheduler.verify.check_output: the gate between a candidate and an 'ok' record."""

from __future__ import annotations

import math

import pytest
import torch

from scheduler.verify import TOLERANCES, check_output

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _gemm(m, n, k, dtype, seed=0):
    """A realistic output: the kernel's own rounding of an fp32-accumulated product."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(DTYPES[dtype])
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(DTYPES[dtype])
    ref = x.double() @ w.double().T
    out = (x.float() @ w.float().T).to(DTYPES[dtype])
    return out, ref


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_correct_output_passes(dtype):
    out, ref = _gemm(257, 96, 320, dtype)
    chk = check_output(out, ref, dtype)
    assert chk.ok, chk.reason
    assert chk.reason == ""
    assert 0 <= chk.rel_err <= TOLERANCES[dtype][2]
    assert chk.rel_err > 0  # rounding is visible: the check really compares


def test_exact_output_passes_with_zero_error():
    ref = torch.randn(8, 8, dtype=torch.float64)
    chk = check_output(ref.float(), ref.float().double(), "float32")
    assert chk.ok and chk.rel_err == 0.0


def test_accepts_any_device_and_dtype_of_reference():
    out, ref = _gemm(16, 16, 16, "float16")
    assert check_output(out, ref.float(), "float16").ok


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_unwritten_element_fails(dtype):
    out, ref = _gemm(64, 48, 40, dtype)
    out[13, 47] = float("nan")  # the runner poisons outputs with NaN: a skipped element stays NaN
    chk = check_output(out, ref, dtype)
    assert not chk.ok
    assert math.isnan(chk.rel_err)
    assert "1 of 3072" in chk.reason and "NaN" in chk.reason


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_all_nan_fails(dtype):
    out, ref = _gemm(4, 4, 4, dtype)
    assert not check_output(torch.full_like(out, float("nan")), ref, dtype).ok


def test_inf_fails():
    out, ref = _gemm(32, 32, 32, "float16")
    out[0, 0] = float("inf")
    chk = check_output(out, ref, "float16")
    assert not chk.ok and "NaN/Inf" in chk.reason


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_single_wrong_element_in_large_tensor_fails(dtype):
    out, ref = _gemm(1024, 1024, 64, dtype)
    i, j = 517, 901
    out[i, j] = out[i, j] + 0.5  # one bad element among 2^20
    # the norm alone would let it through ...
    rel = float(torch.linalg.vector_norm(out.double() - ref) / torch.linalg.vector_norm(ref))
    if dtype == "float16":
        assert rel < TOLERANCES[dtype][2], "the test no longer exercises the elementwise bound"
    # ... the elementwise bound must not
    chk = check_output(out, ref, dtype)
    assert not chk.ok
    assert f"first at ({i}, {j})" in chk.reason and chk.reason.startswith("1 elements")


def test_norm_bound_catches_small_uniform_bias():
    # every element just inside the elementwise bound, but all off the same way: the norm catches it
    ref = torch.full((64, 64), 10.0, dtype=torch.float64)
    atol, rtol, max_rel = TOLERANCES["float16"]
    out = ref + 0.9 * (atol + rtol * 10.0)
    chk = check_output(out, ref, "float16")
    assert not chk.ok and "relative L2 error" in chk.reason and chk.rel_err > max_rel


@pytest.mark.parametrize("shape", [(64, 47), (47, 64), (64 * 48,), (1, 64, 48)])
def test_wrong_shape_fails(shape):
    out, ref = _gemm(64, 48, 40, "float32")
    bad = torch.zeros(shape, dtype=out.dtype)
    chk = check_output(bad, ref, "float32")
    assert not chk.ok and chk.rel_err == math.inf
    assert "shape" in chk.reason and "(64, 48)" in chk.reason


def test_transposed_output_fails_even_when_square():
    out, ref = _gemm(32, 32, 32, "float32")
    assert not check_output(out.T.contiguous(), ref, "float32").ok


def test_zero_reference():
    ref = torch.zeros(8, 8, dtype=torch.float64)
    assert check_output(torch.zeros(8, 8), ref, "float32").ok
    assert not check_output(torch.full((8, 8), 1e-3), ref, "float32").ok


def test_tolerance_table():
    """The documented table, pinned: loosening a bound must be a deliberate change to this test."""
    assert TOLERANCES == {
        "float16": (1e-2, 1e-2, 5e-3),
        "bfloat16": (4e-2, 4e-2, 2e-2),
        "float32": (1e-4, 1e-4, 1e-5),
        "float64": (1e-10, 1e-10, 1e-12),
    }
    # looser for lower precision, and each norm bound tighter than its elementwise bound
    order = ["float64", "float32", "float16", "bfloat16"]
    for a, b in zip(order, order[1:]):
        assert all(x < y for x, y in zip(TOLERANCES[a], TOLERANCES[b]))
    for atol, rtol, max_rel in TOLERANCES.values():
        assert max_rel <= rtol
    # every dtype a workload can name has an entry
    from shapetune.workload import DTYPE_SHORT

    assert set(DTYPE_SHORT) <= set(TOLERANCES)
    import scheduler.verify as v

    for dtype in TOLERANCES:
        assert dtype in v.__doc__ or dtype == "float64"


def test_unknown_dtype_raises():
    with pytest.raises(KeyError):
        check_output(torch.zeros(2), torch.zeros(2), "int8")
