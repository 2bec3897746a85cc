"""Import validates every field (issue 11 item 2): a zero, negative, NaN or infinite latency, repeats
below 1, a fractional dim (Workload() would truncate 1.7 to 1), an unknown op, an ok record without a
latency, a negative error or a line from another schema version rejects the whole file, naming the
line and the reason, and leaves the DB as it was. The shipped exports pass (legacy lines, no sha256,
so only the field checks stand between an edit and the DB here)."""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import pytest

from shapetune.db import DBError, TuningDB

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "tuning_logs" / "sm90_h200_sd15_geglu.jsonl.xz"


def _line(kind="record") -> dict:
    with lzma.open(SHIPPED, "rt") as f:
        return next(d for d in map(json.loads, f) if d["type"] == kind and d.get("status", "ok") == "ok")


def _set(d: dict, path: str, value) -> dict:
    *head, last = path.split(".")
    cur = d
    for k in head:
        cur = cur[int(k)] if isinstance(cur, list) else cur[k]
    if isinstance(cur, list):
        cur[int(last)] = value
    else:
        cur[last] = value
    return d


BAD = [
    ("latency.median_us", 0, "median_us must be a positive finite"),
    ("latency.median_us", -5.0, "median_us must be a positive finite"),
    ("latency.min_us", float("nan"), "min_us must be a positive finite"),
    ("latency.max_us", float("inf"), "max_us must be a positive finite"),
    ("latency.repeats", -3, "repeats must be >= 1"),
    ("latency.std_us", -1.0, "std_us must be finite and >= 0"),
    ("workload.dims.0.1", 1.7, "must be an integer"),
    ("workload.op", "matmul3000", "unknown op 'matmul3000'"),
    ("latency", None, "a latency exactly when its status is 'ok'"),
    ("max_rel_err", -1e-3, "max_rel_err must be >= 0"),
    ("max_rel_err", float("nan"), "max_rel_err must be >= 0 \\(finite for an ok record\\)"),
    ("schema_version", 99, "written by schema version 99"),
]


@pytest.mark.parametrize("path,value,why", BAD, ids=[f"{p}={v}" for p, v, _ in BAD])
def test_a_bad_field_rejects_the_file_and_stores_nothing(tmp_path, path, value, why):
    good = _line()
    lines = [good, _set(json.loads(json.dumps(good)), path, value)]
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(json.dumps(d) for d in lines) + "\n")
    with TuningDB(tmp_path / "t.db") as db:
        with pytest.raises(DBError, match=f"line 2 is malformed.*{why}"):
            db.import_jsonl(f)
        assert db.stats()["records"] == 0


def test_a_bad_baseline_latency_rejects_the_file(tmp_path):
    b = _set(_line("baseline"), "latency.median_us", 0)
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(b) + "\n")
    with TuningDB(tmp_path / "t.db") as db, pytest.raises(DBError, match="line 1 is malformed.*median_us"):
        db.import_jsonl(f)


def test_the_shipped_exports_pass(tmp_path):
    with TuningDB(tmp_path / "t.db") as db:
        for p in sorted((REPO / "tuning_logs").glob("*.jsonl.xz")):
            added, _ = db.import_jsonl(p)
            assert added > 0, p.name
