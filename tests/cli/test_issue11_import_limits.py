"""`shapetune db import --max-line-chars/--max-file-chars` (issue 11 item 3 leftover): the import size
limits (codec.MAX_LINE_CHARS / MAX_FILE_CHARS) are settable from the CLI, defaults shown in --help; a
file over a lowered limit is one line of error and nothing is imported."""

import dataclasses

import pytest
from click.testing import CliRunner

from shapetune.cli.db_cmd import db
from shapetune.db import TuningDB
from shapetune.db.codec import MAX_FILE_CHARS, MAX_LINE_CHARS
from shapetune.records import Candidate
from tests.shapetune._db_history import history


@pytest.fixture
def export(tmp_path):
    """A JSONL export of the shared history with real knobs (dlight: `db import` checks them)."""
    src, out = tmp_path / "src.db", tmp_path / "export.jsonl"
    with TuningDB(src) as d:
        rs, bs = history()
        d.add_results(dataclasses.replace(r, candidate=Candidate("dlight")) for r in rs)
        for b in bs:
            d.add_baseline(b)
        d.export_jsonl(out)
    return out


def _import(export, dest, *limits):
    return CliRunner().invoke(db, ["import", str(export), "--db", str(dest), *map(str, limits)])


def test_help_states_the_limits_their_unit_and_defaults():
    out = CliRunner().invoke(db, ["import", "--help"], terminal_width=1000).output
    for opt, default in (("--max-line-chars", MAX_LINE_CHARS), ("--max-file-chars", MAX_FILE_CHARS)):
        line = next(x for x in out.splitlines() if opt in x)
        assert "characters" in line and f"default: {default}" in line, out


@pytest.mark.parametrize("limit", ["--max-line-chars", "--max-file-chars"])
def test_a_file_over_a_lowered_limit_is_rejected_and_nothing_imported(tmp_path, export, limit):
    text = export.read_text()
    size = (max(map(len, text.splitlines())) if limit == "--max-line-chars" else len(text)) - 1
    dest = tmp_path / "dest.db"
    res = _import(export, dest, limit, size)
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and f"{size} characters" in res.output, res.output
    assert "nothing imported" in res.output
    assert not dest.exists()  # a failed import into a new path leaves no DB behind


def test_the_same_file_is_accepted_at_the_defaults_and_at_its_exact_size(tmp_path, export):
    text = export.read_text()  # a line's limit counts its characters without the newline
    lines = text.splitlines()
    exact = ("--max-line-chars", max(map(len, lines)), "--max-file-chars", len(text))
    for dest, limits in ((tmp_path / "a.db", ()), (tmp_path / "b.db", exact)):
        res = _import(export, dest, *limits)
        assert res.exit_code == 0, res.output
        assert f"imported {len(lines)} new" in res.output
        with TuningDB(dest) as d:
            assert d.stats()["records"] == 8


@pytest.mark.parametrize("bad", ["0", "-5", "lots"])
def test_a_bad_limit_is_a_usage_error(tmp_path, export, bad):
    res = _import(export, tmp_path / "dest.db", "--max-line-chars", bad)
    assert res.exit_code == 2 and "Traceback" not in res.output and "--max-line-chars" in res.output
    assert not (tmp_path / "dest.db").exists()
