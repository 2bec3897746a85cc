"""`db records`/`list --all`, `db explain`, `db prune`, `db diff`, `db verify`'s integrity checks,
`shapetune doctor` and `shapetune.db.to_dataframe`, on real SQLite DBs made under tmp_path."""

import json
import sqlite3

import pytest
from click.testing import CliRunner

from shapetune.cli import main
from shapetune.db import TuningDB, to_dataframe
from tests.cli.test_cli_db import run
from tests.shapetune._db_history import CPU, H100, W1, W2, ok




def lines(p):
    """Every record and baseline as its export line (with sha256), by uid."""
    import io

    buf = io.StringIO()
    with TuningDB(p) as d:
        d.export_jsonl(buf)
    return {json.loads(x)["uid"]: x for x in buf.getvalue().splitlines()}


def test_records_lists_all_with_filters(path, tmp_path):
    p = tmp_path / "many.db"
    with TuningDB(p) as d:
        d.add_results(ok(us=10.0 + i, created=1.7e9 + i, run=f"r{i}") for i in range(60))
    assert len(json.loads(run("list", "--db", p, "--format", "json"))) == 50
    assert len(json.loads(run("list", "--all", "--db", p, "--format", "json"))) == 60
    assert len(json.loads(run("records", "--db", p, "--format", "json"))) == 60
    assert len(json.loads(run("records", "--db", path, "--format", "json", "--template", "mma",
                              "--status", "ok"))) == 5
    assert json.loads(run("records", "--db", path, "--format", "json", "--trust", "imported")) == []


def test_explain_exact_hit_and_fallback(path):
    out = json.loads(run("explain", "linear", "--shape", "m=8192,n=320,k=320", "--target", H100.key,
                         "--db", path, "--format", "json"))
    assert out["answer"] == "exact" and out["cause"] == "tuned"
    # the registry's own answer: fastest of run-a (7.5 us) against run-a's fastest vendor (11.5 us)
    assert out["tuned_us"] == 7.5 and out["vendor_us"] == 11.5 and out["speedup"] == pytest.approx(11.5 / 7.5)
    assert out["run_id"] == out["vendor_run_id"] == "run-a" and out["trust"] == "measured"
    assert "H100" in out["measured_on"] and "torch 2.11.0" in out["measured_on"]
    table = run("explain", "linear", "--shape", "m=8192,n=320,k=320", "--target", H100.key, "--db", path)
    assert "1.53x" in table and "2023-11-14" in table
    cpu = json.loads(run("explain", "linear", "--shape", "m=8192,n=320,k=320", "--target", CPU.key,
                         "--dtype", "float16", "--db", path, "--format", "json"))
    assert cpu["answer"] == "fallback" and cpu["cause"] == "no_baseline" and cpu["tuned_us"] == 400.0
    miss = json.loads(run("explain", "linear", "--shape", "m=7,n=3,k=5", "--target", H100.key,
                          "--db", path, "--format", "json"))
    assert miss["cause"] == "not_tuned" and "record" not in miss


def test_prune_dry_run_then_only_the_selected(path):
    before = lines(path)
    with TuningDB(path) as d:
        failed = {r.uid for r in d.results() if r.status != "ok"}
    assert "would delete 1 of 8" in run("prune", "--status", "timeout", "--db", path)
    assert lines(path) == before  # a dry run changes nothing
    assert "give at least one filter" in run("prune", "--db", path, ok=False)
    for s in ("build_error", "wrong_result", "timeout"):
        run("prune", "--status", s, "--op", "linear", "--yes", "--db", path)
    after = lines(path)
    assert set(before) - set(after) == failed
    assert all(after[u] == before[u] for u in after)  # what was not selected is byte for byte kept
    assert "deleted 1 of 5" in run("prune", "--target", CPU.key, "--yes", "--db", path)
    assert "would delete 0 of 4" in run("prune", "--older-than", 1e6, "--db", path)
    assert "would delete 4 of 4" in run("prune", "--older-than", 0, "--db", path)


def test_diff(path, tmp_path):
    b = tmp_path / "b.db"
    with TuningDB(path) as src, TuningDB(b) as d:
        d.add_results(r for r in src.results() if r.workload != W2)
        d.add_results([ok(us=5.0, tile=256, created=1.7e9 + 9)])
    out = json.loads(run("diff", path, b, "--format", "json"))
    assert out["records"] == {"records_a": 8, "records_b": 8, "only_a": 1, "only_b": 1, "changed": 0}
    by = {(r["workload"], r["target"]): r["change"] for r in out["best"]}
    assert by == {(W1.name, H100.key): "faster_in_b", (W2.name, H100.key): "only_a",
                  (W1.name, CPU.key): "same"}
    assert "only_a 1" in run("diff", path, b)


def test_verify_checks_integrity(path):
    out = run("verify", "--check-only", "--db", path)
    assert "sha256 and fields ok" in out and "stale here: 7 records" in out and "stale here: 1 records" in out
    c = sqlite3.connect(path)
    c.execute("UPDATE records SET median_us = 0.001 WHERE id = 2")  # edited behind the store's back
    c.commit()
    c.close()
    out = run("verify", "--db", path, ok=False)
    assert "records row 2 does not match its stored sha256" in out and "nothing re-verified" in out


def test_doctor(path):
    res = CliRunner().invoke(main, ["doctor", "--db", path])
    assert res.exit_code == 0, res.output
    for field in ("torch ", "tvm ", "tvm-ffi", "xgboost", "GPU", "target key", "DB records",
                  "cache root"):
        assert field in res.output
    stale, = [x for x in res.output.splitlines() if x.startswith("DB stale records")]
    assert stale.split()[3] == "8"  # both targets of the history are foreign to this machine


def test_to_dataframe(path):
    pytest.importorskip("pandas")
    df = to_dataframe(path, status="ok")
    assert len(df) == 5 and set(df["trust"]) == {"measured"}
    assert sorted(df["median_us"]) == [3.0, 7.5, 9.0, 10.0, 400.0]
    assert str(df["created"].dt.tz) == "UTC" and df["knobs"].iloc[0]["vec"] == "f16x8"
    with TuningDB(path) as d:
        assert len(to_dataframe(d)) == 8 and len(d.results()) == 8  # an open DB is left open


def test_prune_takes_the_verdicts_of_what_it_deletes(path, tmp_path):
    """An imported record that failed re-verification pruned by trust state: its verdict goes with
    it (no dangling reverifications row), the other imports keep theirs."""
    import dataclasses

    from shapetune.records import Candidate

    src, fresh = tmp_path / "src.jsonl", tmp_path / "fresh.db"
    with TuningDB(path) as d:
        rs = [dataclasses.replace(r, candidate=Candidate("dlight")) for r in d.results(status="ok")]
    with TuningDB(tmp_path / "dl.db") as d:
        d.add_results(rs)
        d.export_jsonl(src)
    with TuningDB(fresh) as d:
        d.import_jsonl(src)
        (i, _), (j, _) = d.iter_results(limit=2)
        d.add_reverification(i, error="wrong result here")
        d.add_reverification(j, error="build failed here")
    assert "deleted 2 of 5" in run("prune", "--trust", "reverify_failed", "--yes", "--db", fresh)
    c = sqlite3.connect(fresh)
    assert c.execute("SELECT COUNT(*) FROM reverifications").fetchone()[0] == 0
    assert c.execute("PRAGMA foreign_key_check").fetchall() == []
    c.close()
    assert {r["trust"] for r in json.loads(run("records", "--db", fresh, "--format", "json"))} == {"imported"}


def test_to_dataframe_without_pandas(path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "pandas", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'shapetune\[pandas\]'"):
        to_dataframe(path)
