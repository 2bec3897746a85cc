"""scripts/bench_coverage.py's CPU smoke run (tiny VAE, llvm kernels tuned for its GroupNorm buckets) and the
BENCHMARKS.md section scripts/make_benchmarks.py generates from its JSON (none while the JSON is absent)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests._scripts import script

REPO = Path(__file__).resolve().parents[2]
SHAPE = (1, 64, 64)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Tune every GroupNorm bucket the tiny VAE decode calls at 1 x 64 x 64 (llvm, 2 trials each) and one
    GEMM it never calls, export them, then run the coverage script on that one shape with the export."""
    from scheduler.extract import model_workloads
    from scheduler.tuner import TuneOptions, tune
    from shapetune.buckets import DEFAULT
    from shapetune.db import TuningDB
    from shapetune.ops.linear import linear_workload
    from shapetune.target import detect

    d = tmp_path_factory.mktemp("coverage")
    ops = model_workloads("vae", ("norms",), *SHAPE, dtype="float32", tiny=True)
    buckets = list(dict.fromkeys(DEFAULT.bucket_of(op.workload) for op in ops))
    reps = tune(buckets, detect("llvm"), d / "tuned.db", TuneOptions(trials=2, batch=2, templates=("norm_llvm",)))
    assert all(r.best is not None for r in reps)
    tune([linear_workload(16, 8, 16, "float32", False)], detect("llvm"), d / "tuned.db",
         TuneOptions(trials=1, batch=1, templates=("dlight",)))
    with TuningDB(d / "tuned.db") as db:
        db.export_jsonl(d / "tuned.jsonl.xz")
    bench_coverage = script("bench_coverage")
    out = d / "coverage.json"
    doc = bench_coverage.main(["--tiny", "--device", "cpu", "--grid", "1x64", "--samples", "1", "--models", "vae",
                               "--iters", "2", "--warmup", "1", "--db", str(d / "tuned.jsonl.xz"), "--json", str(out)])
    import kernels

    with TuningDB(kernels.get_registry().db_path) as db:
        served_from = {w.op for w in db.workloads()}
    return doc, out, sum(op.calls for op in ops), served_from


def test_smoke_run_counts_what_the_tuned_records_serve(smoke):
    doc, out, norm_calls, served_from = smoke
    assert served_from == {"group_norm"}  # the GEMM the decode never calls was not imported (nor re-verified)
    assert json.loads(out.read_text()) == doc
    r = doc["rows"]["vae"]["1x64x64"]
    tuned, vendor = r["tuned"]["calls"], r["vendor"]["calls"]
    # every GroupNorm call found its bucket's records (served, or proven slower than torch here); the
    # vendor-only copy found none; every other op had nothing tuned in either
    assert sum(tuned["group_norm"].values()) == sum(vendor["group_norm"].values()) == norm_calls
    assert "not_tuned" not in tuned["group_norm"] and set(vendor["group_norm"]) == {"not_tuned"}
    assert {k for op, c in tuned.items() if op != "group_norm" for k in c} == {"not_tuned"}
    assert r["tuned"]["op_calls"] == r["vendor"]["op_calls"] and r["tuned"]["tuned_calls"] == tuned["group_norm"].get("tuned", 0)
    assert r["rel_l2_vs_vendor"] < 1e-5 and r["tuned"]["us"] > 0 and r["vendor"]["us"] > 0
    t = doc["totals"]["vae"]
    assert t["shapes"] == 1 and t["tvm_time_share_mean"] is None  # no GPU profile on the CPU
    assert t["speedup_vs_vendor_geomean"] == pytest.approx(r["speedup_vs_vendor"])


def _make_benchmarks():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_benchmarks", REPO / "scripts" / "make_benchmarks.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_benchmarks_section_from_the_json_and_none_without_it(smoke, tmp_path):
    mb = _make_benchmarks()
    doc, out, *_ = smoke
    shutil.copytree(REPO / "tuning_logs", tmp_path / "tuning_logs")
    for rel in (mb.COVERAGE, mb.COVERAGE_SDXL):  # the committed runs' JSON, if any: this test writes its own
        (tmp_path / "tuning_logs" / rel).unlink(missing_ok=True)
    without = mb.render(tmp_path)
    assert "## Coverage over the shape grid" not in without
    shutil.copy(out, tmp_path / "tuning_logs" / mb.COVERAGE)
    text = mb.render(tmp_path)
    sec = text[text.index("## Coverage over the shape grid"):]
    assert text.startswith(without.rstrip("\n")) and "| VAE decode | 1 x 64x64 |" in sec
    assert f"over 1 shapes; op calls tuned {100 * doc['totals']['vae']['tuned_call_share_mean']:.1f}%" in sec
    assert "python scripts/bench_coverage.py --tiny" in sec
    assert sec.startswith("## Coverage over the shape grid: SD 1.5") and "grid: SDXL" not in text
    shutil.copy(out, tmp_path / "tuning_logs" / mb.COVERAGE_SDXL)  # an SDXL run's JSON has the same form
    both = mb.render(tmp_path)
    assert "## Coverage over the shape grid: SD 1.5" in both and "## Coverage over the shape grid: SDXL" in both


def test_a_missing_db_is_one_line_of_error(tmp_path):
    """A --db path that does not exist: before the check, the run went on with nothing served (every op
    call counted no_db), silently."""
    bench_coverage = script("bench_coverage")
    with pytest.raises(SystemExit, match="no such file"):
        bench_coverage.main(["--tiny", "--device", "cpu", "--db", str(tmp_path / "nope.db")])
    assert not (tmp_path / "nope.db").exists()


# -- SDXL ---------------------------------------------------------------------------------------------
def test_sdxl_smoke_run_counts_what_the_tuned_records_serve(tmp_path):
    """`--models sdxl` on the tiny SDXL UNet (added conditions included) and VAE at 1 x 64 x 64 on the CPU,
    with llvm records for the one LayerNorm bucket the tiny SDXL UNet calls there: each of its LayerNorm
    calls finds that bucket's records in the tuned copy and none in the vendor-only one; every other op
    call has nothing tuned in either; the tuned and vendor-only outputs agree."""
    from scheduler.extract import model_workloads
    from scheduler.tuner import TuneOptions, tune
    from shapetune.buckets import DEFAULT
    from shapetune.db import TuningDB
    from shapetune.target import detect

    norms = model_workloads("sdxl_unet", ("norms",), *SHAPE, dtype="float32", tiny=True)
    ops = [op for op in norms if op.workload.op == "layer_norm"]
    # the LayerNorms after a residual add: add_layer_norm, untuned here, so the layer_norm op runs them too
    adds = sum(op.calls for op in norms if op.workload.op == "add_layer_norm")
    buckets = list(dict.fromkeys(DEFAULT.bucket_of(op.workload) for op in ops))
    assert len(buckets) == 1
    reps = tune(buckets, detect("llvm"), tmp_path / "tuned.db", TuneOptions(trials=2, batch=2, templates=("norm_llvm",)))
    assert all(r.best is not None for r in reps)
    with TuningDB(tmp_path / "tuned.db") as db:
        db.export_jsonl(tmp_path / "tuned.jsonl.xz")
    bench_coverage = script("bench_coverage")
    doc = bench_coverage.main(["--tiny", "--device", "cpu", "--models", "sdxl", "--grid", "1x64", "--iters", "2",
                               "--warmup", "1", "--db", str(tmp_path / "tuned.jsonl.xz")])
    assert doc["shapes"] == ["1x64x64"] and set(doc["rows"]) == {"sdxl_unet", "sdxl_vae"}
    r = doc["rows"]["sdxl_unet"]["1x64x64"]
    tuned, vendor = r["tuned"]["calls"], r["vendor"]["calls"]
    assert sum(tuned["layer_norm"].values()) == sum(vendor["layer_norm"].values()) == 24
    assert sum(op.calls for op in ops) + adds == 24
    assert adds == 16 and sum(tuned["add_layer_norm"].values()) == adds
    assert "not_tuned" not in tuned["layer_norm"] and set(vendor["layer_norm"]) == {"not_tuned"}
    assert {k for op, c in tuned.items() if op != "layer_norm" for k in c} == {"not_tuned"}
    assert {"attention", "geglu", "linear", "linear_residual", "conv2d"} <= set(tuned)
    assert r["tuned"]["op_calls"] == r["vendor"]["op_calls"] and r["rel_l2_vs_vendor"] < 1e-5
    v = doc["rows"]["sdxl_vae"]["1x64x64"]["tuned"]["calls"]
    assert "group_norm" in v and {k for c in v.values() for k in c} == {"not_tuned"}
    with pytest.raises(SystemExit, match="mixes SD 1.5 and SDXL"):
        bench_coverage.main(["--device", "cpu", "--models", "sdxl,unet"])
