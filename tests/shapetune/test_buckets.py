"""Shape buckets: the policy, and bucket kernels computing every member shape correctly (llvm)."""

from __future__ import annotations

import random

import pytest
import torch
from click.testing import CliRunner

import kernels
from kernels.registry import Registry, set_registry
from scheduler.tuner import TuneOptions, tune
from shapetune.buckets import DEFAULT, POW2, concrete, verification_members
from shapetune.cli import main as cli
from shapetune.db import TuningDB
from shapetune.target import detect
from shapetune.ops.linear import linear_workload


# -- policy --------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,expect", [(1, (1, 16)), (16, (1, 16)), (17, (17, 32)), (154, (129, 256)),
                                      (8192, (4097, 8192)), (8193, (8193, 16384)), (65536, (32769, 65536)),
                                      (65537, (65537, 131072)), (2**20, (2**19 + 1, 2**20)), (2**20 + 1, None)])
def test_pow2_bounds(m, expect):
    assert POW2.find(m) == expect


def test_ranges_tile_the_line_without_gaps():
    rs = POW2.ranges()
    assert rs[0][0] == 1 and all(a[1] + 1 == b[0] for a, b in zip(rs, rs[1:]))


def test_bucket_workload_is_representative_and_covers_members():
    w = linear_workload(154, 320, 768, "float16", False)
    b = DEFAULT.bucket_of(w)
    assert b.dim["m"] == 256 and b.ranges == {"m": (129, 256)} and b.covers(w)
    assert not b.covers(linear_workload(257, 320, 768, "float16", False))
    assert not b.covers(linear_workload(154, 320, 768, "float16", True))  # other epilogue
    assert b.key != w.key and b.name == "linear_m129-256_n320_k768_f16"
    assert DEFAULT.bucket_of(linear_workload(2**20 + 1, 8, 8)) is None


def test_verification_members_hit_bounds_and_an_odd_size():
    b = DEFAULT.bucket_of(linear_workload(100, 8, 8))
    ms = [w.dim["m"] for w in verification_members(b, random.Random(3))]
    assert ms[0] == 128 and 65 in ms and any(m % 2 for m in ms if m not in (65, 128))
    with pytest.raises(ValueError, match="outside the bucket"):
        concrete(b, m=129)


# -- bucket kernels on the CPU ----------------------------------------------------------------------
# Members: 1 and 16 (edges), 7 and 13 (primes); 37 (prime); 11970 = 2 x 63 x 95: the UNet's
# first-level tokens at batch 2 for a 504x760-pixel image.
MEMBERS = [1, 7, 13, 16, 33, 37, 64, 11970]
N, K = 8, 24


@pytest.fixture(scope="module")
def bucket_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("buckets") / "tuning.db"
    ws = list(dict.fromkeys(DEFAULT.bucket_of(linear_workload(m, N, K, "float32", True)) for m in MEMBERS))
    reps = tune(ws, detect("llvm"), path, TuneOptions(trials=2, batch=2, templates=("gemm_llvm",)))
    assert all(r.best is not None for r in reps), [r.by_status for r in reps]
    return path


@pytest.fixture
def registry(bucket_db):
    reg = Registry(db_path=bucket_db, target=detect("llvm"), require_faster=False)
    prev = set_registry(reg)
    yield reg
    set_registry(prev)


@pytest.mark.parametrize("m", MEMBERS)
def test_bucket_kernel_matches_torch_for_every_member(registry, m):
    g = torch.Generator().manual_seed(m)
    x, w, b = torch.randn(m, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    y = kernels.linear(x, w, b)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-4)
    res = registry._cache[("linear", m, N, K, torch.float32, True, "cpu")]
    assert res.kind == "bucket" and res.fn is not None and res.bucket.covers(res.workload)


def test_buckets_stored_in_db_and_shown(bucket_db):
    with TuningDB(bucket_db) as db:
        assert {(r["lo"], r["hi"]) for r in db.buckets("linear")} == set(POW2.ranges())
    out = CliRunner().invoke(cli, ["db", "buckets", "--db", str(bucket_db), "--format", "json"])
    assert out.exit_code == 0, out.output
    assert '"tuned_workloads": 1' in out.output


def test_db_best_shape_reports_bucket_hit_and_fallbacks(bucket_db):
    run = lambda shape: CliRunner().invoke(cli, ["db", "best", "linear", "--shape", shape, "--db", str(bucket_db),  # noqa: E731
                                                 "--target", detect("llvm").key, "--format", "json"])
    hit = run(f"m=37,n={N},k={K}")
    assert hit.exit_code == 0, hit.output
    assert '"answer": "bucket"' in hit.output or '"cause": "vendor_faster"' in hit.output
    miss = run(f"m=37,n={N},k={K + 1}")
    assert '"cause": "not_tuned"' in miss.output
    out = run(f"m={2**20 + 1},n={N},k={K}")
    assert '"cause": "outside_buckets"' in out.output


def test_exact_record_wins_over_bucket(bucket_db, tmp_path):
    import shutil

    path = tmp_path / "both.db"
    shutil.copy(bucket_db, path)
    w = linear_workload(37, N, K, "float32", True)
    tune([w], detect("llvm"), path, TuneOptions(trials=1, batch=1, templates=("gemm_llvm",)))
    res = Registry(db_path=path, target=detect("llvm"), require_faster=False).resolve(w)
    assert res.kind == "exact" and res.bucket == w


@pytest.mark.parametrize("model", ["unet", "vae"])
def test_every_call_of_sd15_at_the_grids_largest_shape_has_a_bucket(model):
    """SD 1.5 at 8 x 1024 x 1024 (the corner of the grid 1-8 x 256-1024 px that scripts/tune_sd_grid.py
    tunes), full-size configs on the meta device: every call of every family but conv2d (h and w exact)
    falls in a bucket. The pow2 edges ended at 65536 before, so the VAE decoder's 2^20 positions at full
    resolution and the UNet's 2^17-row GEMMs had none ("outside_buckets" in the H200 coverage run)."""
    from scheduler.extract import model_workloads

    fams = ("linear", "geglu", "norms", "attention", "elementwise")
    ops = [op for op in model_workloads(model, fams, 8, 1024, 1024) if op.workload.op != "conv2d"]
    assert ops
    outside = sorted({op.workload.name for op in ops if DEFAULT.bucket_of(op.workload) is None})
    assert outside == []
