"""scripts/bench_metaschedule.py: shape parsing, the CUDA dry run (no GPU), a tiny llvm run end to end.

The slow tests run the script as a subprocess, as on the GPU machine: MetaSchedule's Popen workers
must find the repo by themselves.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "bench_metaschedule.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_metaschedule", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_parse_shapes_defaults():
    b = _load()
    ws = b.parse_shapes(b.DEFAULT_SHAPES)
    assert [b.shape_label(w) for w in ws] == ["m8192_n320_k320", "m8192_n2560_k320+bias", "m2048_n640_k640"]
    assert [w.dim["n"] for w in ws] == [320, 2560, 640]
    assert all(w.dtype == "float16" and w.acc_dtype == "float32" for w in ws)
    assert [("bias" in w.epilogue) for w in ws] == [False, True, False]
    assert b.parse_shapes("m4_n8_k16_bias", "float32")[0].epilogue == ("bias",)


@pytest.mark.parametrize("bad", ["", "m8_n8", "8x8x8", "m8_n8_k8+relu"])
def test_parse_shapes_rejects(bad):
    with pytest.raises(ValueError):
        _load().parse_shapes(bad)


@pytest.mark.slow
def test_dry_run_cuda(tmp_path):
    """MetaSchedule's tensor-core space, candidates, LocalBuilder, JSONDatabase + compile_tir +
    export, and the dlight build, on the sm_90 target without a GPU (~2-3 min on 2 cores)."""
    out = tmp_path / "dry.json"
    p = _run(["--dry-run", "--target", "cuda", "--work-dir", str(tmp_path / "w"), "--json", str(out)], 600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    d = json.loads(out.read_text())
    dry = d["dry_run"]
    assert d["target"]["kind"] == "cuda" and d["target"]["arch"] == "sm_90"
    assert dry["ok"] and dry["space"] == "cuda-tensorcore"
    assert dry["design_spaces"] >= 1 and dry["candidates_built"] >= 1
    assert Path(dry["metaschedule_path"]).stat().st_size > 0
    assert Path(dry["dlight_path"]).stat().st_size > 0


@pytest.mark.slow
def test_llvm_end_to_end(tmp_path):
    """The whole benchmark on the CPU: tune_tir (2 trials), compile_tir, dlight, a --db record
    rebuilt, and every kernel (vendor included) verified and timed by measure_one (~1-2 min)."""
    from shapetune.db import TuningDB
    from shapetune.records import Candidate, LatencyStats, MeasureResult
    from shapetune.target import detect
    from shapetune.ops.linear import linear_workload

    w = linear_workload(32, 48, 64, "float32", bias=True)
    db_path = tmp_path / "st.db"
    with TuningDB(db_path) as db:
        db.add_result(MeasureResult(w, detect("llvm"), Candidate("dlight"), "ok", LatencyStats.of([5.0])))
    out = tmp_path / "bench.json"
    p = _run(["--target", "llvm", "--dtype", "float32", "--shapes", "m32_n48_k64+bias", "--trials", "2",
              "--db", str(db_path), "--work-dir", str(tmp_path / "w"), "--json", str(out)], 600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "ms_us" in p.stdout  # the table
    (row,) = json.loads(out.read_text())["rows"]
    assert row["key"] == w.key
    for name in ("metaschedule", "dlight", "shapetune", "cublas"):
        assert row[f"{name}_status"] == "ok", (name, row.get(f"{name}_error"))
        assert row[f"{name}_us"] > 0
    for name in ("metaschedule", "dlight", "shapetune"):
        assert row[f"{name}_ratio"] == pytest.approx(row["cublas_us"] / row[f"{name}_us"])
    assert row["ms_tune_s"] > 0 and row["ms_records_ok"] >= 1
    assert row["shapetune_candidate"] == {"template": "dlight", "knobs": {}}


def test_shapetune_best_exact_and_arch(tmp_path):
    """--db-match arch falls back to a record of another device of the same arch; exact does not."""
    from shapetune.db import TuningDB
    from shapetune.records import Candidate, LatencyStats, MeasureResult
    from shapetune.target import cuda_target

    b = _load()
    w = b.parse_shapes("m64_n32_k16")[0]
    here, other = cuda_target(), cuda_target(device_name="NVIDIA H200")
    db_path = tmp_path / "st.db"
    with TuningDB(db_path) as db:
        db.add_result(MeasureResult(w, other, Candidate("dlight"), "ok", LatencyStats.of([5.0])))
    assert b.shapetune_best(str(db_path), w, here, "exact") == (None, None)
    r, key = b.shapetune_best(str(db_path), w, here, "arch")
    assert r.candidate == Candidate("dlight") and key == other.key
    assert b.shapetune_best("", w, here, "arch") == (None, None)
    # a JSONL export is imported into a fresh DB under the work dir
    with TuningDB(db_path) as db:
        db.export_jsonl(tmp_path / "st.jsonl")
    imported = b.shapetune_db_path(str(tmp_path / "st.jsonl"), str(tmp_path / "w"))
    assert b.shapetune_best(imported, w, other, "exact")[1] == other.key
