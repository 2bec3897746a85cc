"""The DB file around an import or a read (issue 11 item 3): a read-only command on a 0-byte or
missing file leaves it as it was (it was turned into an empty DB); a failed import into a new path
leaves no DB file behind; export -> import into a fresh DB -> export is byte-identical, bucket rows
included (they were lost)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from shapetune.cli import main
from shapetune.db import DBError, TuningDB

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "tuning_logs" / "sm90_h200_sd15_geglu.jsonl.xz"
BUCKET = {"policy": "default", "op": "geglu", "dim": "m", "lo": 1, "hi": 256, "representative": 128}


def test_read_only_open_of_empty_or_missing_file_changes_nothing(tmp_path):
    empty, missing = tmp_path / "empty.db", tmp_path / "sub" / "missing.db"
    empty.touch()
    with pytest.raises(DBError, match="empty file"):
        TuningDB(empty, create=False)
    for p in (empty, missing):
        r = CliRunner().invoke(main, ["db", "list", "--db", str(p)])
        assert r.exit_code == 1 and r.output.count("\n") == 1 and "Error:" in r.output, r.output
    assert empty.read_bytes() == b"" and sorted(tmp_path.iterdir()) == [empty]


def test_failed_import_into_a_new_path_leaves_no_file(tmp_path):
    bad, new = tmp_path / "bad.jsonl", tmp_path / "new.db"
    bad.write_text("{not json\n")
    r = CliRunner().invoke(main, ["db", "import", str(bad), "--db", str(new)])
    assert r.exit_code == 1 and "line 1 is malformed" in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]
    old = tmp_path / "old.db"  # an existing DB stays, byte for byte
    TuningDB(old).close()
    before = old.read_bytes()
    with TuningDB(old) as d, pytest.raises(DBError):
        d.import_jsonl(bad)
    assert old.read_bytes() == before


def test_export_import_export_is_byte_identical(tmp_path):
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    with TuningDB(a) as d:
        d.import_jsonl(SHIPPED)
        d.add_buckets([BUCKET])
        d.export_jsonl(tmp_path / "1.jsonl")
    with TuningDB(b) as d:
        d.import_jsonl(tmp_path / "1.jsonl")
        assert d.buckets() == [BUCKET]
        d.export_jsonl(tmp_path / "2.jsonl")
    assert (tmp_path / "2.jsonl").read_bytes() == (tmp_path / "1.jsonl").read_bytes()


def test_a_failed_import_keeps_a_new_db_another_connection_opened(tmp_path):
    """Defect before: a failed import into a new path deleted the DB on close even where another connection
    (a tuner started meanwhile) had opened it: that one's records then went into a deleted file, silently.
    Now the file goes only when no other connection has it open."""
    from shapetune.ops.linear import linear_workload
    from shapetune.records import Candidate, LatencyStats, MeasureResult
    from shapetune.target import detect

    bad, new = tmp_path / "bad.jsonl", tmp_path / "new.db"
    bad.write_text("{not json\n")
    importer = TuningDB(new)
    other = TuningDB(new)  # opened while the import runs
    with pytest.raises(DBError):
        importer.import_jsonl(bad)
    importer.close()
    w = linear_workload(8, 8, 8, bias=False, dtype="float32")
    rec = MeasureResult(w, detect("llvm"), Candidate("dlight"), "ok", LatencyStats.of([5.0, 6.0]), max_rel_err=1e-6,
                        run_id="r", created=1.7e9)
    assert other.add_results([rec]) == 1
    other.close()
    with TuningDB(new, create=False) as d:
        assert d.stats()["records"] == 1


def test_a_record_whose_check_found_nan_outputs_round_trips(tmp_path):
    """The verifier's verdict for a kernel that leaves outputs unwritten is wrong_result with max_rel_err NaN;
    the DB stores it. Defect before: `db export` wrote it, and `db import` of that export rejected the whole
    file (the codec required a finite error), and `db verify` reported it as an integrity problem and
    re-verified nothing. An ok record with a NaN error is still refused."""
    import json
    import math

    from shapetune.ops.linear import linear_workload
    from shapetune.records import Candidate, LatencyStats, MeasureResult
    from shapetune.target import detect

    w = linear_workload(8, 8, 8, bias=False, dtype="float32")
    t = detect("llvm")
    src, dst, exp = tmp_path / "src.db", tmp_path / "dst.db", tmp_path / "exp.jsonl"
    with TuningDB(src) as d:
        d.add_results([
            MeasureResult(w, t, Candidate("dlight"), "ok", LatencyStats.of([5.0, 6.0]), max_rel_err=1e-6,
                          run_id="r", created=1.7e9),
            MeasureResult(w, t, Candidate("dlight", (("x", 1),)), "wrong_result", error="outputs are NaN/Inf",
                          max_rel_err=math.nan, run_id="r", created=1.7e9 + 1)])
    for args in (["export", str(exp), "--db", str(src)], ["import", str(exp), "--db", str(dst)],
                 ["verify", "--check-only", "--db", str(src)]):
        r = CliRunner().invoke(main, ["db", *args])
        assert r.exit_code == 0, r.output
    with TuningDB(dst, create=False) as d:
        assert d.stats()["records"] == 2
    lines = exp.read_text().splitlines()
    ok = next(json.loads(x) for x in lines if '"status": "ok"' in x)
    ok["max_rel_err"] = float("nan")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ok) + "\n")
    r = CliRunner().invoke(main, ["db", "import", str(bad), "--db", str(tmp_path / "x.db")])
    assert r.exit_code == 1 and "max_rel_err" in r.output, r.output
