"""`shapetune pack` and serving from a pack (kernels.pack) on the CPU target (issue 12 items 6, 7).

The tuning DB is written directly (real gemm_llvm candidates of one tiny linear and of its m bucket,
stated latencies: runs r1 and r3 win against their vendor, run r2 does not) so that what is served
is known in advance; the kernels themselves are really built by `shapetune pack` and really run
from the pack. Serving runs in a
fresh process whose kernel cache is an empty directory and whose TVM compiler entry points
(tvm.compile, tvm.build) raise: a pack must serve without them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from scheduler.tuner import search_space
from shapetune.buckets import DEFAULT
from shapetune.cli import main
from shapetune.db import TuningDB
from shapetune.ops.linear import linear_workload
from shapetune.records import Candidate, LatencyStats, MeasureResult, VendorBaseline
from shapetune.target import detect

W = linear_workload(16, 8, 16, "float32", bias=False)
BUCKET = DEFAULT.bucket_of(linear_workload(13, 8, 16, "float32", bias=False))  # m in [1, 16]
VENDOR = "torch.nn.functional.linear"

# Serves kernels.linear at W's shape and at m=13 (BUCKET's kernel) from the pack named by argv[1] (via SHAPETUNE_PACK, or
# kernels.load_pack with argv[2] == "api"), with the compiler made unavailable; prints
# fallback_summary(), whether the output matched torch, and the files in the kernel cache.
SERVE = r"""
import json, os, sys
from pathlib import Path
import tvm

def _no_compiler(*a, **k):
    raise RuntimeError("the compiler was called while serving a pack")

tvm.compile = tvm.build = _no_compiler
import torch, kernels
if sys.argv[2] == "api":
    kernels.load_pack(sys.argv[1])
g = torch.Generator().manual_seed(0)
x, w = torch.randn(16, 16, generator=g), torch.randn(8, 16, generator=g)
match = all(torch.allclose(kernels.linear(a, w), torch.nn.functional.linear(a, w), rtol=1e-5, atol=1e-5)
            for a in (x, x[:13]))
cache = Path(os.environ["SHAPETUNE_CACHE_DIR"])
print(json.dumps({"summary": kernels.fallback_summary(), "match": match,
                  "cache": sorted(str(p) for p in cache.rglob("*")) if cache.exists() else []}))
"""


@pytest.fixture(scope="module")
def cpu():
    return detect("llvm")


def _db(path: Path, cpu, cands: list[Candidate], bucket_cand: Candidate) -> Path:
    with TuningDB(path) as db:
        db.add_result(MeasureResult(W, cpu, cands[0], "ok", LatencyStats.of([10.0]), max_rel_err=0.0,
                                    run_id="r1", created=1e9))
        db.add_result(MeasureResult(W, cpu, cands[1], "ok", LatencyStats.of([9.0]), max_rel_err=0.0,
                                    run_id="r2", created=2e9))
        db.add_baseline(VendorBaseline(W, cpu, VENDOR, LatencyStats.of([12.0] * 3), run_id="r1", created=1e9))
        db.add_baseline(VendorBaseline(W, cpu, VENDOR, LatencyStats.of([8.0] * 3), run_id="r2", created=2e9))
        db.add_result(MeasureResult(BUCKET, cpu, bucket_cand, "ok", LatencyStats.of([10.0]), max_rel_err=0.0,
                                    run_id="r3", created=3e9))
        db.add_baseline(VendorBaseline(BUCKET, cpu, VENDOR, LatencyStats.of([12.0] * 3), run_id="r3", created=3e9))
        db.add_buckets([{"policy": "test", "op": "linear", "dim": "m", "lo": 1, "hi": 16, "representative": 16},
                        {"policy": "test", "op": "conv2d", "dim": "n", "lo": 1, "hi": 2, "representative": 2}])
    return path


@pytest.fixture(scope="module")
def packed(tmp_path_factory, cpu):
    """(source DB, pack dir): the DB above packed by `shapetune pack --target cpu`."""
    root = tmp_path_factory.mktemp("pack")
    db = _db(root / "t.db", cpu, search_space(W, cpu, ("gemm_llvm",))[:2], search_space(BUCKET, cpu, ("gemm_llvm",))[0])
    env = {**os.environ, "SHAPETUNE_CACHE_DIR": str(root / "cache"), "SHAPETUNE_BUILD_JOBS": "1"}
    r = CliRunner().invoke(main, ["pack", str(root / "out"), "--db", str(db), "--target", "cpu"], env=env)
    assert r.exit_code == 0, r.output
    assert "2 kernels (2 built now), 2 vendor baselines, 1 bucket rows" in r.output, r.output
    return db, root / "out"


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def serve(pack: Path, tmp_path: Path, how: str = "env", **extra_env: str) -> tuple[dict, str]:
    """Run SERVE in a fresh process: (its JSON line, its stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHAPETUNE_")}
    env.update(SHAPETUNE_CACHE_DIR=str(tmp_path / "empty-cache"), SHAPETUNE_DB=str(tmp_path / "no.db"),
               SHAPETUNE_TARGET="llvm", **extra_env)
    if how == "env":
        env["SHAPETUNE_PACK"] = str(pack)
    p = subprocess.run([sys.executable, "-c", SERVE, str(pack), how], env=env, capture_output=True, text=True,
                       timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stderr


def test_pack_holds_the_served_records_their_runs_and_a_manifest(packed, cpu):
    """W's r1 record and BUCKET's r3 record are served (r2's lost to its own vendor): the pack's DB
    holds them, the baselines of their runs and linear's bucket rows; the manifest names the target
    and each artifact with its workload, record and sha256."""
    from kernels.pack import sha256_file

    src, out = packed
    m = json.loads((out / "manifest.json").read_text())
    assert m["target_key"] == cpu.key and m["target_description"] == cpu.describe()
    arts = {a["workload_key"]: a for a in m["artifacts"]}
    assert sorted(arts) == sorted([W.key, BUCKET.key])
    with TuningDB(out / "tuning.db", create=False) as db:
        assert sorted(r.run_id for r in db.results()) == ["r1", "r3"]
        for a in arts.values():
            rid, rec = db.find(a["record_id"])
            assert rec.workload.key == a["workload_key"] and rec.uid == a["record_uid"]
            assert a["sha256"] == sha256_file(out / a["file"])
            assert db.trust([rid])[rid][0] == "measured"
        assert sorted(b.run_id for b in db.baselines()) == ["r1", "r3"]
        assert [b["op"] for b in db.buckets()] == ["linear"]


def test_a_tuned_db_packs_and_serves(tmp_path, cpu):
    """Through the real Tuner (one trial: a verified, measured record) instead of stated latencies;
    a vendor baseline far slower than any kernel, added to the record's run, makes it served
    whatever torch measured on this CPU."""
    from kernels.pack import write_pack
    from scheduler.tuner import TuneOptions, tune

    db = tmp_path / "t.db"
    (rep,) = tune([W], cpu, db, TuneOptions(trials=1, batch=1, templates=("gemm_llvm",)))
    assert rep.best is not None, rep.by_status
    with TuningDB(db) as d:
        d.add_baseline(VendorBaseline(W, cpu, "test.slow_vendor", LatencyStats.of([1e6] * 3), run_id=rep.best.run_id))
    s = write_pack(tmp_path / "pack", db, cpu, jobs=1)
    assert (s.kernels, s.built) == (1, 1)  # the tuner's builds are its own, not the kernel cache's
    got, _ = serve(tmp_path / "pack", tmp_path)
    assert got["summary"] == {"linear": {"tuned": 1, "not_tuned": 1}} and got["match"], got  # m=13: no bucket


def test_pack_db_opens_with_the_db_commands(packed):
    _, out = packed
    r = CliRunner().invoke(main, ["db", "list", "--db", str(out / "tuning.db")])
    assert r.exit_code == 0 and "linear_m16_n8_k16_f32" in r.output, r.output


@pytest.mark.parametrize("how", ["env", "api"])
def test_pack_serves_tuned_without_compiler_or_cache(packed, tmp_path, how):
    """SHAPETUNE_PACK or kernels.load_pack: both calls (exact shape, and m=13 through its bucket) run
    packed kernels (counted "tuned"), match torch, and nothing is built: tvm.compile raises, and the
    kernel cache stays empty."""
    got, _ = serve(packed[1], tmp_path, how)
    assert got["summary"] == {"linear": {"tuned": 2}}, got
    assert got["match"] and got["cache"] == [], got


def test_tampered_artifact_falls_back_counted(packed, tmp_path):
    out = _copy(packed[1], tmp_path / "pack")
    so = out / json.loads((out / "manifest.json").read_text())["artifacts"][0]["file"]
    so.write_bytes(so.read_bytes() + b"\0")
    got, err = serve(out, tmp_path)
    assert got["summary"] == {"linear": {"pack_mismatch": 1, "tuned": 1}} and got["match"], got
    assert "does not match the sha256" in err, err


def test_missing_artifact_falls_back_counted(packed, tmp_path):
    out = _copy(packed[1], tmp_path / "pack")
    for so in (out / "kernels").iterdir():
        so.unlink()
    got, _ = serve(out, tmp_path)
    assert got["summary"] == {"linear": {"pack_missing": 2}} and got["match"] and got["cache"] == [], got


def test_pack_for_another_target_falls_back_counted(packed, tmp_path):
    out = _copy(packed[1], tmp_path / "pack")
    m = json.loads((out / "manifest.json").read_text())
    m["target_key"] = "llvm-otherchip-000000000000"
    (out / "manifest.json").write_text(json.dumps(m))
    got, err = serve(out, tmp_path)
    assert got["summary"] == {"linear": {"pack_target": 2}} and got["match"], got
    assert "llvm-otherchip-000000000000" in err and "not this machine's target key" in err, err


def test_undetectable_target_falls_back_counted(packed, tmp_path):
    """TVM's runtime library alone cannot name the llvm CPU (LLVM is in the compiler library): the
    pack cannot be checked against this machine, so every call falls back, counted, no crash (the
    GPU target is detected without the compiler: tests/kernels/test_pack_gpu.py)."""
    got, err = serve(packed[1], tmp_path, TVM_USE_RUNTIME_LIB="1")
    assert got["summary"] == {"linear": {"pack_target": 2}} and got["match"], got
    assert "cannot detect this machine's target" in err, err


def test_unreadable_pack_falls_back_counted(tmp_path):
    (tmp_path / "pack").mkdir()
    got, err = serve(tmp_path / "pack", tmp_path)
    assert got["summary"] == {"linear": {"pack_unreadable": 2}} and got["match"], got
    assert "not a shapetune pack" in err, err


def test_pack_refuses_a_kernel_that_fails_to_build(tmp_path, cpu):
    """A served record whose template does not exist here: one line of error, no OUT written."""
    db = _db(tmp_path / "t.db", cpu, [Candidate("no_such_template"), Candidate("no_such_template_2")],
             Candidate("no_such_template_3"))
    r = CliRunner().invoke(main, ["pack", str(tmp_path / "out"), "--db", str(db), "--target", "cpu"])
    assert r.exit_code == 1 and "cannot build the kernel of linear_m16_n8_k16_f32" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output, r.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_pack_refuses_nothing_to_pack_and_an_existing_out(packed, tmp_path, cpu):
    with TuningDB(tmp_path / "empty.db"):
        pass
    r = CliRunner().invoke(main, ["pack", str(tmp_path / "o"), "--db", str(tmp_path / "empty.db"), "--target", "cpu"])
    assert r.exit_code == 1 and "nothing to pack" in r.output, r.output
    r = CliRunner().invoke(main, ["pack", str(packed[1]), "--db", str(packed[0]), "--target", "cpu"])
    assert r.exit_code == 1 and "not an empty directory" in r.output, r.output


def test_doctor_shows_the_active_pack(packed, monkeypatch):
    monkeypatch.setenv("SHAPETUNE_TARGET", "llvm")
    r = CliRunner().invoke(main, ["doctor"])
    assert "none active" in r.output, r.output
    monkeypatch.setenv("SHAPETUNE_PACK", str(packed[1]))
    r = CliRunner().invoke(main, ["doctor"])
    assert r.exit_code == 0 and f"{packed[1]} (2 kernels for" in r.output and ": active" in r.output, r.output


def test_a_workspace_spec_added_after_packing_falls_back_counted(packed, tmp_path):
    """A kernel's scratch-buffer spec (scheduler/workspaces.py) is part of what the manifest vouches
    for: one that appears beside a kernel packed without one makes that kernel a counted fallback."""
    from scheduler.workspaces import spec_path

    out = _copy(packed[1], tmp_path / "pack")
    so = out / json.loads((out / "manifest.json").read_text())["artifacts"][0]["file"]
    spec_path(so).write_text('{"version": 1, "dims": {}, "buffers": []}')
    got, err = serve(out, tmp_path)
    assert got["summary"] == {"linear": {"pack_mismatch": 1, "tuned": 1}} and got["match"], got
    assert ".ws.json does not match" in err, err
