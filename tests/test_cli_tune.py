"""`shapetune tune`: the main job, on the llvm target with tiny shapes."""

from __future__ import annotations

import json

from click.testing import CliRunner

from shapetune.cli import main
from shapetune.db import TuningDB


def _run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_tune_shape_json_then_db_sees_it(tmp_path):
    db = tmp_path / "t.db"
    out = _run("tune", "--target", "llvm", "--shape", "m=16,n=8,k=16", "--no-bias", "--trials", "2",
               "--batch", "2", "--template", "gemm_llvm", "--db", str(db), "--format", "json")
    assert out.exit_code == 0, out.output
    rep = json.loads(out.stdout)  # progress and the target line go to stderr
    (row,) = rep["workloads"]
    assert row["workload"] == "linear_m16_n8_k16_f32" and row["measured"] == 2
    assert row["ok"] == 2 and row["best_us"] > 0 and row["vendor_us"] > 0
    with TuningDB(db) as d:
        assert len(d.results()) == 2 and d.baselines()


def test_tune_buckets_table(tmp_path):
    db = tmp_path / "t.db"
    out = _run("tune", "--target", "llvm", "--shape", "m=20,n=8,k=16", "--buckets", "--trials", "1",
               "--batch", "1", "--template", "gemm_llvm", "--db", str(db))
    assert out.exit_code == 0, out.output
    assert "linear_m17-32_n8_k16_f32+bias" in out.output and f"DB: {db}" in out.output
    with TuningDB(db) as d:
        assert d.buckets("linear")


def test_tune_rejects_bad_input(tmp_path):
    bad = CliRunner().invoke(main, ["tune", "--target", "llvm", "--shape", "m=4,n", "--db", str(tmp_path / "x.db")])
    assert bad.exit_code != 0 and "m=..,n=..,k=.." in bad.output
    outside = CliRunner().invoke(main, ["tune", "--target", "llvm", "--shape", "m=100000,n=8,k=8", "--buckets",
                                        "--db", str(tmp_path / "x.db")])
    assert outside.exit_code != 0 and "outside every bucket" in outside.output


def test_version_and_help():
    assert _run("--version").exit_code == 0
    out = _run("--help")
    assert "tune" in out.output and "db" in out.output
