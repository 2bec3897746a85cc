"""`shapetune db import OTHER.db` (issue 11 item 3): another tuning DB file is imported like an export,
records as claims pending re-verification, its bucket rows too; it failed with a UnicodeDecodeError
("unreadable after line 0"). A corrupt DB file is one line of error, and nothing is stored."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from shapetune.cli import main
from shapetune.db import TuningDB

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "tuning_logs" / "sm90_h200_sd15_geglu.jsonl.xz"


def test_import_another_db_file_as_claims(tmp_path):
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    with TuningDB(a) as d:
        n, _ = d.import_jsonl(SHIPPED)
        d.add_buckets([{"policy": "default", "op": "geglu", "dim": "m", "lo": 1, "hi": 256, "representative": 128}])
        rows_a = d.buckets()
        recs_a = d.stats()["records"]
    r = CliRunner().invoke(main, ["db", "import", str(a), "--db", str(b)])
    assert r.exit_code == 0, r.output
    assert f"imported {n} new" in r.output
    with TuningDB(b) as d:
        st = d.stats()
        assert st["records"] == recs_a
        assert st["by_trust"] == {"imported": recs_a}, st["by_trust"]  # claims pending re-verification
        assert d.buckets() == rows_a
    again = CliRunner().invoke(main, ["db", "import", str(a), "--db", str(b)])
    assert again.exit_code == 0 and "imported 0 new" in again.output


def test_a_corrupt_db_file_is_one_line_and_stores_nothing(tmp_path):
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    with TuningDB(a) as d:
        d.import_jsonl(SHIPPED)
    data = a.read_bytes()
    a.write_bytes(data[:100] + b"\xff" * (len(data) - 100))
    r = CliRunner().invoke(main, ["db", "import", str(a), "--db", str(b)])
    assert r.exit_code != 0
    assert r.output.count("\n") == 1 and r.output.startswith("Error:"), r.output
    with TuningDB(b) as d:
        assert d.stats()["records"] == 0
