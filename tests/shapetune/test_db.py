"""shapetune.db's SQLite store: schema and WAL, dedup, queries (results, best, baselines, find),
errors on corrupt/foreign/newer DBs, in-place migration, concurrent appends, reverification verdicts.
Export/import/merge (the JSONL codec) are tested in tests/shapetune/test_codec.py."""

import contextlib
import dataclasses
import io
import json
import math
import multiprocessing as mp
import os
import sqlite3

import pytest

from shapetune.db import SCHEMA_VERSION, DBError, TuningDB, record_to_json
from shapetune.records import Candidate, MeasureResult
from shapetune.ops.linear import linear_workload

from ._db_history import CPU, H100, W1, W2, base, db, failed, full, history, ok  # noqa: F401 (fixtures)


def test_creates_dirs_wal_and_schema(tmp_path, db):
    assert db.path.exists()
    c = sqlite3.connect(db.path)
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    assert db.stats()["schema_version"] == SCHEMA_VERSION


def test_default_path_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SHAPETUNE_DB", str(tmp_path / "env" / "x.db"))
    with TuningDB() as d:
        assert d.path == tmp_path / "env" / "x.db" and d.path.exists()


def test_add_and_dedup(db):
    r = ok()
    assert db.add_result(r) is True
    assert db.add_result(r) is False
    rs, _ = history()
    assert db.add_results(rs) == len(rs) - 1
    assert db.add_results(rs) == 0
    assert len(db.results()) == len(rs)
    assert db.add_baseline(base()) is True and db.add_baseline(base()) is False


def test_results_roundtrip_exact_and_filters(full):
    rs, _ = history()
    got = full.results()
    assert sorted(got, key=lambda r: r.uid) == sorted(rs, key=lambda r: r.uid)
    assert [r.created for r in got] == sorted((r.created for r in rs), reverse=True)
    r = next(g for g in got if g.candidate.knob.get("tile_m") == 128)
    assert r.created == 1.7e9 + 1.123456789
    assert {k: type(v) for k, v in r.candidate.knobs} == {
        "tile_m": int, "vec": str, "swizzle": bool, "stages": int}
    assert r.uid == ok(us=7.5, tile=128, created=1.7e9 + 1.123456789).uid
    assert len(full.results(workload_key=W2.key)) == 1
    assert len(full.results(target_key=CPU.key)) == 1
    assert len(full.results(status="ok")) == 5
    assert len(full.results(status="timeout", target_key=H100.key)) == 1
    assert len(full.results(op="linear", limit=2)) == 2
    assert full.results(op="conv2d") == []
    assert len(full.results(template="mma")) == len(rs)
    assert full.results(template="nope") == []


def test_best_picks_fastest_verified(full, db):
    b = full.best(W1.key, H100.key)
    assert b.latency.median_us == 7.5 and b.candidate.knob["tile_m"] == 128
    assert full.best(W1.key, CPU.key).latency.median_us == 400.0
    assert full.best(W2.key, CPU.key) is None
    assert {(r.workload, r.target) for r in full.best_all()} == {(W1, H100), (W2, H100), (W1, CPU)}
    assert [r.target for r in full.best_all(target_key=CPU.key)] == [CPU]
    assert full.best_all(op="conv2d") == []


def test_best_ignores_failed_and_breaks_ties_by_id(db):
    w = linear_workload(64, 64, 64)
    db.add_results([failed("wrong_result", w=w), failed("runtime_error", w=w, created=3e9)])
    assert db.best(w.key, H100.key) is None
    first, second = ok(w, us=5.0, tile=16, created=2e9), ok(w, us=5.0, tile=8, created=1e9)
    db.add_results([first, second, ok(w, us=6.0, tile=4)])
    assert db.best(w.key, H100.key) == first


def test_nan_and_edge_values_roundtrip(db):
    r = MeasureResult(W1, H100, Candidate("t", (("neg", -3),)), "wrong_result",
                      max_rel_err=float("nan"), build_s=0, created=1700000000)
    inf = MeasureResult(W1, H100, Candidate("t"), "wrong_result", max_rel_err=float("inf"),
                        created=1.5)
    assert db.add_results([r, inf]) == 2
    got = {g.max_rel_err if not math.isnan(g.max_rel_err) else "nan": g for g in db.results()}
    assert got["nan"].created == 1700000000.0 and isinstance(got["nan"].created, float)
    assert got["nan"].candidate == r.candidate and got[math.inf].candidate == inf.candidate
    assert db.add_result(got["nan"]) is False  # int `created` is stored as the float it reads back
    assert got[float("inf")] == inf


def test_baselines(full):
    assert full.baseline(W1.key, H100.key).latency.median_us == 11.5  # newest, not fastest
    assert full.baseline(W1.key, CPU.key) is None
    assert len(full.baselines()) == 3
    assert len(full.baselines(workload_key=W1.key)) == 2
    assert full.baselines(name="cudnn") == []
    assert full.baselines()[0] == base(us=11.0, created=1.7e9 + 5)


def test_workloads_targets_stats(full):
    assert set(full.workloads()) == {W1, W2} and full.workloads("conv2d") == []
    assert full.workload(W2.key) == W2 and full.workload("nope") is None
    assert set(full.targets()) == {H100, CPU}
    assert full.target(CPU.key) == CPU and full.target("nope") is None
    s = full.stats()
    assert s["records"] == 8 and s["baselines"] == 3 and s["workloads"] == 2
    assert s["by_status"] == {"ok": 5, "build_error": 1, "wrong_result": 1, "timeout": 1}
    assert s["by_op"] == {"linear": 8}
    assert s["by_target"] == {H100.key: 7, CPU.key: 1}
    assert s["file_size"] > 0 and s["path"] == str(full.path) and s["best"] == 3


def test_find(full):
    r = full.results()[0]
    i, got = full.find(r.uid)
    assert got == r and full.find(str(i))[1] == r and full.find(i)[1] == r
    assert full.find(r.uid[:10])[1] == r
    assert full.find("zzzz") is None and full.find("999999") is None
    assert full.find("%") is None and full.find("_") is None  # LIKE wildcards are escaped
    seen, k = {}, 0
    while True:  # digits would be read as row ids first; find two uids starting with one letter
        k += 1
        u = ok(created=float(k)).uid
        if u[0].isalpha() and u[0] in seen:
            break
        seen[u[0]] = u
    full.add_results(ok(created=float(j)) for j in range(1, k + 1))
    dup = u[0]
    with pytest.raises(DBError, match="several"):
        full.find(dup)


def test_corrupt_file_raises(tmp_path):
    p = tmp_path / "t.db"
    p.write_bytes(b"this is not a sqlite file at all" * 200)
    with pytest.raises(DBError, match=str(p)) as e:
        TuningDB(p)
    assert "Move it aside" in str(e.value)


def test_truncated_db_raises(full, tmp_path):
    full.close()
    c = sqlite3.connect(full.path)
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    c.close()
    p = tmp_path / "trunc.db"
    data = full.path.read_bytes()
    p.write_bytes(data[:100] + b"\xff" * (len(data) - 100))
    with pytest.raises(DBError, match="trunc.db"):
        with TuningDB(p) as d:
            d.results()
            d.stats()


def test_foreign_sqlite_db_raises(tmp_path):
    p = tmp_path / "other.db"
    c = sqlite3.connect(p)
    c.execute("CREATE TABLE t (x)")
    c.commit()
    c.close()
    with pytest.raises(DBError, match="not a shapetune tuning DB"):
        TuningDB(p)


def test_newer_schema_version_raises(db):
    db.close()
    c = sqlite3.connect(db.path)
    c.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    c.commit()
    c.close()
    with pytest.raises(DBError, match=f"schema version {SCHEMA_VERSION + 1}.*reads version {SCHEMA_VERSION}"):
        TuningDB(db.path)


V2_BEST = """CREATE VIEW best AS SELECT * FROM (SELECT r.*, ROW_NUMBER() OVER (
    PARTITION BY r.workload_id, r.target_id ORDER BY r.median_us, r.id) AS rank FROM records r
    WHERE r.verified = 1 AND typeof(r.median_us) IN ('real', 'integer')) WHERE rank = 1"""


def _downgrade(path, version):
    """Turn a current DB into one of an older schema version, as that version wrote it."""
    c = sqlite3.connect(path)
    for stmt in ("DROP VIEW best", "DROP VIEW best_claimed", "DROP TABLE reverifications",
                 *(f"ALTER TABLE {t} DROP COLUMN {col}" for t in ("records", "baselines")
                   for col in ("origin", "sha256")), V2_BEST):
        c.execute(stmt)
    if version == 1:
        c.execute("DROP TABLE buckets")
    c.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(version),))
    c.commit()
    c.close()


def test_version_2_db_is_migrated_in_place(full, tmp_path):
    """A v2 DB (no origin, hashes or verdicts) opens as the current version: its rows are
    measured (still served) and get their sha256, so an export of them imports."""
    before = full.best_all()
    full.close()
    _downgrade(full.path, 2)
    with TuningDB(full.path) as db:
        assert db.best_all() == before and db.stats()["by_trust"] == {"measured": 8}
        db.export_jsonl(tmp_path / "e.jsonl")
        with TuningDB(tmp_path / "fresh.db") as fresh:
            assert fresh.import_jsonl(tmp_path / "e.jsonl") == (11, 0)
        assert db.merge_from(tmp_path / "fresh.db") == (0, 11)  # same hashes: nothing conflicts
    c = sqlite3.connect(full.path)
    assert c.execute("SELECT COUNT(*) FROM records WHERE length(sha256) = 64").fetchone()[0] == 8
    assert c.execute("SELECT COUNT(*) FROM baselines WHERE length(sha256) = 64").fetchone()[0] == 3


def test_version_1_db_is_migrated_in_place(full):
    """A v1 DB (no buckets table) opens as the current version, history intact."""
    n = full.stats()["records"]
    full.close()
    _downgrade(full.path, 1)
    with TuningDB(full.path) as db:
        assert db.stats()["records"] == n
        assert db.add_buckets([{"policy": "p", "op": "linear", "dim": "m", "lo": 1, "hi": 16,
                                "representative": 16}]) == 1
        assert db.buckets("linear")[0]["hi"] == 16
    c = sqlite3.connect(full.path)
    assert c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)


def test_missing_db_without_create(tmp_path):
    with pytest.raises(DBError, match="no tuning DB"):
        TuningDB(tmp_path / "nope.db", create=False)
    assert not (tmp_path / "nope.db").exists()


N_PER_PROC = 150


def _append(path, worker):
    with TuningDB(path) as d:
        for i in range(N_PER_PROC):
            r = ok(linear_workload(64 + i % 5, 64, 64), us=1.0 + i, tile=i, run=f"w{worker}",
                   created=1e9 + i)
            assert d.add_result(r)
            if i % 10 == 0:
                d.add_baseline(base(created=1e9 + worker * 1000 + i))


def test_concurrent_appends_lose_nothing(tmp_path):
    path = tmp_path / "c.db"
    ctx = mp.get_context("spawn")  # fresh interpreters: no SQLite state shared through fork
    procs = [ctx.Process(target=_append, args=(path, k)) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    with TuningDB(path) as d:
        assert d.stats()["records"] == 2 * N_PER_PROC
        assert len(d.baselines()) == 2 * (N_PER_PROC // 10)
        assert len(d.workloads()) == 5 + 1 and len(d.targets()) == 1


def test_verdicts(full):
    """add_reverification: a pass appends the result measured here (served); a failure is kept
    with its reason; measured records take no verdict."""
    imported = [ok(W2, us=1.0, tile=7, created=9e8), ok(W2, us=2.0, tile=8, created=9e8)]
    buf = io.StringIO("".join(json.dumps(record_to_json(r)) + "\n" for r in imported))
    assert full.import_jsonl(buf) == (2, 0)
    pend = full.pending(H100.key)
    assert [r for _, r in pend] == imported  # both claim faster than the measured 3.0 us
    assert full.pending(CPU.key) == [] and full.pending(H100.key, workload_key=W1.key) == []
    (i1, _), (i2, _) = pend
    full.add_reverification(i1, error="wrong_result: out of tolerance")
    here = dataclasses.replace(imported[1], run_id="here", created=9.5e8)
    assert full.add_reverification(i2, measured=here)
    assert full.add_reverification(i2, error="again") is False  # the first verdict stands
    assert full.trust([i1, i2]) == {i1: ("reverify_failed", "wrong_result: out of tolerance"),
                                    i2: ("reverified", "")}
    assert full.best(W2.key, H100.key) == here and full.pending(H100.key) == []
    assert full.best(W2.key, H100.key, include_pending=True) == imported[1]  # i1 failed: never
    measured = full.iter_results(workload_key=W1.key, limit=1)[0][0]
    with pytest.raises(ValueError, match="not an imported record"):
        full.add_reverification(measured, error="x")


@contextlib.contextmanager
def _read_only(*paths):
    """The paths (files, directories) read-only for this process, for root too (chattr +i where chmod does
    not stop it); skips the test where neither can."""
    import shutil
    import stat
    import subprocess

    modes = {p: p.stat().st_mode for p in paths}
    for p in paths:
        p.chmod(stat.S_IMODE(modes[p]) & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    immutable = any(os.access(p, os.W_OK) for p in paths)  # root: chmod stops nothing
    try:
        if immutable and (shutil.which("chattr") is None or subprocess.run(
                ["chattr", "+i", *map(str, paths)], capture_output=True).returncode):
            pytest.skip("root, and no chattr +i here: cannot make a file read-only")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", *map(str, paths)], capture_output=True)
        for p in paths:
            p.chmod(modes[p])


def test_importing_another_db_only_reads_it(full, tmp_path):
    """Defect (before: import_db / merge_from opened the source as a TuningDB, which migrated an older schema
    in place and switched it to WAL mode): importing an older-version DB rewrote it, so the shapetune that made
    it no longer read it, and a read-only file could not be imported at all. Now the source is only read: a
    read-only v2 file in a read-only directory (a WAL-mode DB: no -shm beside it, and none can be made, so
    SQLite's read-only open failed, "unable to open database file", until it was read as immutable) imports
    and its bytes are unchanged."""
    import hashlib

    n = full.stats()["records"]
    full.close()
    _downgrade(full.path, 2)
    src = full.path
    assert not src.with_name(src.name + "-wal").exists() and not src.with_name(src.name + "-shm").exists()
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    with _read_only(src, src.parent):
        with TuningDB(tmp_path / "into.db") as d:
            assert d.import_db(src) == (n + 3, 0)
            assert d.stats()["by_trust"] == {"imported": n}
        with TuningDB(tmp_path / "merged.db") as d:
            assert d.merge_from(src) == (n + 3, 0)
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before
    assert sorted(os.listdir(src.parent)) == [src.name]
    c = sqlite3.connect(src)
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "2"
