"""shapetune.db's JSONL codec: export/import round trips (plain and .xz), filters and streams,
malformed or corrupt imports rolling back, line parsing, merging from a DB or an export, and edited
rows refused. Imports are claims: what trust they get is tested in test_import_trust.py."""

import io
import json
import lzma
import sqlite3

import pytest

from shapetune.db import DBError, TuningDB, from_json_line, line_sha256
from shapetune.records import LatencyStats

from ._db_history import CPU, H100, W1, db, full, ok  # noqa: F401 (fixtures)


def _same(a, b):
    return sorted(a.results(), key=lambda r: r.uid) == sorted(b.results(), key=lambda r: r.uid) \
        and sorted(a.baselines(), key=lambda x: x.uid) == sorted(b.baselines(), key=lambda x: x.uid)


@pytest.mark.parametrize("name", ["h.jsonl", "h.jsonl.xz"])
def test_export_import_roundtrip(full, tmp_path, name):
    p = tmp_path / name
    assert full.export_jsonl(p) == 11
    if name.endswith(".xz"):
        assert lzma.open(p, "rt").readline().startswith('{"type": "record"')
    lines = [json.loads(x) for x in (lzma.open(p, "rt") if name.endswith("xz") else open(p))]
    assert {x["type"] for x in lines} == {"record", "baseline"}
    rec = lines[0]
    assert set(rec) == {"type", "uid", "workload", "target", "candidate", "status", "latency",
                        "error", "max_rel_err", "build_s", "run_id", "created", "sha256"}
    assert all(x["sha256"] == line_sha256(x) for x in lines)
    with TuningDB(tmp_path / "fresh.db") as fresh:
        assert fresh.import_jsonl(p) == (11, 0)
        assert _same(full, fresh)
        # imported: a claim, served only once re-verified here
        assert fresh.best(W1.key, H100.key) is None and fresh.best_all() == []
        assert fresh.best(W1.key, H100.key, include_pending=True) == full.best(W1.key, H100.key)
        assert {s for s, _ in fresh.trust(i for i, _ in fresh.iter_results()).values()} == {"imported"}
        assert fresh.stats()["by_trust"] == {"imported": 8} and full.stats()["by_trust"] == {"measured": 8}
        assert fresh.import_jsonl(p) == (0, 11)
        assert full.import_jsonl(p) == (0, 11)
        assert full.best(W1.key, H100.key).latency.median_us == 7.5  # still measured there


def test_export_filters_and_streams(full, tmp_path):
    buf = io.StringIO()
    assert full.export_jsonl(buf, target_key=CPU.key) == 1
    assert full.export_jsonl(io.StringIO(), op="conv2d") == 0
    assert full.export_jsonl(io.StringIO(), target_key=H100.key) == 7 + 3
    buf.seek(0)
    with TuningDB(tmp_path / "f.db") as fresh:
        assert fresh.import_jsonl(buf) == (1, 0)
        assert fresh.results() == full.results(target_key=CPU.key)


@pytest.mark.parametrize("bad, why", [
    ("{not json", "line 3"),
    ('{"type": "record"}', "KeyError"),
    ('{"type": "nope", "workload": W, "target": T, "created": 1.0}', "unknown line type"),
    ('["a list"]', "JSON object"),
    ("EDIT_STATUS", "unknown status"),
    ("EDIT_UID", "does not match"),
    ("EDIT_CREATED", "created must be a number"),
])
def test_malformed_import_rolls_back(full, tmp_path, bad, why):
    p = tmp_path / "h.jsonl"
    full.export_jsonl(p)
    lines = p.read_text().splitlines()
    rec = json.loads(lines[0])
    if bad == "EDIT_STATUS":
        rec["status"] = "fast"
        bad = json.dumps(rec)
    elif bad == "EDIT_UID":
        rec["created"] += 1
        bad = json.dumps(rec)
    elif bad == "EDIT_CREATED":
        rec["created"] = "yesterday"
        bad = json.dumps(rec)
    bad = bad.replace("W", json.dumps(W1.to_json())).replace("T", json.dumps(H100.to_json())) \
        if bad.startswith('{"type": "nope"') else bad
    p.write_text("\n".join(lines[:2] + [bad] + lines[2:]) + "\n")
    with TuningDB(tmp_path / "fresh.db") as fresh:
        with pytest.raises(DBError, match="line 3") as e:
            fresh.import_jsonl(p)
        assert why in str(e.value)
        assert fresh.stats()["records"] == 0 and fresh.workloads() == [] and fresh.targets() == []
        assert fresh.add_result(ok()) and fresh.best(W1.key, H100.key) == ok()  # still usable


def test_corrupt_xz_rolls_back(full, tmp_path):
    p = tmp_path / "h.jsonl.xz"
    full.export_jsonl(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with TuningDB(tmp_path / "fresh.db") as fresh:
        with pytest.raises(DBError, match="nothing imported"):
            fresh.import_jsonl(p)
        assert fresh.stats()["records"] == 0


def test_from_json_line_accepts_int_created():
    d = json.loads(json.dumps({"type": "baseline", "workload": W1.to_json(),
                               "target": H100.to_json(), "name": "x",
                               "latency": LatencyStats.of([1.0]).to_json(), "created": 5}))
    b = from_json_line(d)
    assert b.created == 5.0 and isinstance(b.created, float)


def test_merge_from_a_db_or_an_export(full, tmp_path):
    """merge_from takes another DB (records, baselines, bucket rows) or a JSONL(.xz) export."""
    full.add_buckets([{"policy": "p", "op": "linear", "dim": "m", "lo": 1, "hi": 16, "representative": 16}])
    n = len(full.results()) + len(full.baselines())
    full.export_jsonl(tmp_path / "e.jsonl.xz")
    for i, src in enumerate((full.path, tmp_path / "e.jsonl.xz")):
        with TuningDB(tmp_path / f"merged{i}.db") as m:
            assert m.merge_from(src) == (n, 0)
            assert m.merge_from(src) == (0, n)  # already there: skipped
            assert len(m.results()) == len(full.results())
            assert m.buckets() == full.buckets()  # exports carry the bucket rows too


def test_a_row_edited_in_the_db_is_refused_by_export_and_merge(full, tmp_path):
    """Its stored sha256 no longer matches its fields: an edit cannot be laundered into a fresh,
    valid-hash export or a merge."""
    full.close()
    c = sqlite3.connect(full.path)
    c.execute("UPDATE records SET status = 'ok', median_us = 0.5, mean_us = 0.5, min_us = 0.5, "
              "max_us = 0.5, std_us = 0, repeats = 1, verified = 1, error = '' WHERE status = 'build_error'")
    c.commit()
    c.close()
    with TuningDB(full.path) as db:
        with pytest.raises(DBError, match="records row .* does not match its stored sha256"):
            db.export_jsonl(tmp_path / "e.jsonl")
        with TuningDB(tmp_path / "m.db") as m, pytest.raises(DBError, match="stored sha256"):
            m.merge_from(full.path)
