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
