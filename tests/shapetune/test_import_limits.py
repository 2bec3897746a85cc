"""Hostile JSONL imports (issue 11 item 3) give one-line DBErrors, not tracebacks, and change nothing:
deeply nested JSON (RecursionError), a huge integer (OverflowError), a line or a file over the size
limits (a 50 MB line was read whole and accepted before)."""

from __future__ import annotations

import json

import pytest

from shapetune.db import DBError, TuningDB
from shapetune.db.codec import read_jsonl

from .test_import_validation import _line


def _import_rejects(tmp_path, text: str, match: str, **limits):
    src = tmp_path / "in.jsonl"
    src.write_text(text)
    db_path = tmp_path / "t.db"
    TuningDB(db_path).close()
    before = db_path.read_bytes()
    with TuningDB(db_path) as db, pytest.raises(DBError, match=match) as e:
        db.import_jsonl(src, **limits)
    assert "\n" not in str(e.value)
    assert db_path.read_bytes() == before


def test_deep_nesting_is_a_one_line_error(tmp_path):
    _import_rejects(tmp_path, "[" * 100_000 + "]" * 100_000 + "\n", r"line 1 is malformed.*nest")


def test_huge_integer_is_a_one_line_error(tmp_path):
    d = _line()
    d.pop("sha256", None)
    d["created"] = 10**400
    _import_rejects(tmp_path, json.dumps(d) + "\n", r"line 1 is malformed.*created")


def test_line_size_limit(tmp_path):
    big = json.dumps({"type": "record", "error": "x" * (1 << 20)}) + "\n"
    _import_rejects(tmp_path, big, r"line 1 is longer than 1048576 characters")
    line = json.dumps(_line()) + "\n"
    _import_rejects(tmp_path, line, r"line 1 is longer than 100 characters", max_line_chars=100)


def test_file_size_limit(tmp_path):
    line = json.dumps(_line()) + "\n"
    src = tmp_path / "two.jsonl"
    src.write_text(line + line)
    with pytest.raises(DBError, match=rf"more than {len(line) + 10} characters"):
        read_jsonl(src, lambda obj: None, max_file_chars=len(line) + 10)
    assert len(read_jsonl(src, lambda obj: None, max_file_chars=2 * len(line))) == 2
