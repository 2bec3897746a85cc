"""scripts/bench_tuned.py on the CPU: a tiny llvm DB, every documented JSON field of a row."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from pytest import approx

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_tuned.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_tuned", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_tuned_on_a_tiny_llvm_db(tmp_path):
    from shapetune.ops.norm import group_norm_workload
    from scheduler.runner import copy_bytes, min_traffic_bytes
    from shapetune.db import TuningDB
    from shapetune.records import Candidate, LatencyStats, MeasureResult
    from shapetune.target import detect

    w = group_norm_workload(1, 36, 64, 8, "float32", silu=True)
    with TuningDB(tmp_path / "t.db") as db:  # the record bench_tuned rebuilds, verifies and times again
        db.add_result(MeasureResult(w, detect("llvm"), Candidate("dlight"), "ok", LatencyStats.of([5.0])))
    out, run = tmp_path / "bench.json", tmp_path / "run.jsonl"
    _bench().main(["--db", str(tmp_path / "t.db"), "--json", str(out), "--large-copy-bytes", str(1 << 20),
                   "--export", str(run)])

    doc = json.loads(out.read_text())
    assert doc["large_copy"]["bytes"] == 2 << 20 and doc["large_copy"]["us"] > 0
    assert doc["large_copy"]["gbps"] == approx(doc["large_copy"]["bytes"] / doc["large_copy"]["us"] / 1e3)
    (row,) = doc["rows"]
    assert row["status"] == "ok" and row["tuned_us"] > 0, row
    gn, nchw = "torch.nn.functional.group_norm", "torch.nn.functional.group_norm[nchw]"
    assert set(row["vendors"]) == {gn, nchw} and row["vendor_us"] == row["vendors"][gn] > 0
    assert row["speedup"] == approx(row["vendor_us"] / row["tuned_us"])
    assert row["speedup_vs_nchw"] == approx(row["vendors"][nchw] / row["tuned_us"])
    assert row["bytes"] == min_traffic_bytes(w) == (2 * 36 * 64 + 2 * 64) * 4
    assert row["copy_bytes"] == copy_bytes(w) and row["copy_us"] > 0
    assert row["copy_gbps"] == approx(row["copy_bytes"] / row["copy_us"] / 1e3)
    assert row["tuned_gbps"] == approx(row["bytes"] / row["tuned_us"] / 1e3)
    assert row["vendor_gbps"] == approx(row["bytes"] / row["vendor_us"] / 1e3)
    assert row["tuned_frac_of_copy"] == approx(row["tuned_gbps"] / row["copy_gbps"])
    s = doc["summary"]
    assert s["geomean_speedup"] == approx(row["speedup"])
    assert s["geomean_speedup_vs_nchw"] == approx(row["speedup_vs_nchw"])
    from kernels.registry import MARGIN

    fastest = min(row["vendors"].values())
    assert row["dispatch"] == ("tuned" if row["tuned_us"] * (1 + MARGIN) <= fastest else "vendor")

    # --export: this run's re-verified record and both vendor paths, under the JSON's run id, importable
    # (as claims to re-verify) with a same-run baseline for dispatch to compare against.
    with TuningDB(tmp_path / "fresh.db") as db:
        assert db.import_jsonl(run)[0] == 3
        (rec,) = db.results(target_key=detect("llvm").key)
        assert rec.run_id == doc["run_id"] and rec.latency.median_us == approx(row["tuned_us"])
        assert {b.name: b.run_id for b in db.baselines()} == {gn: doc["run_id"], nchw: doc["run_id"]}
