"""The tuning DB's store: `TuningDB`, one SQLite connection, its transactions, appends and queries.

Several processes may append at once (WAL, a 30 s busy timeout, and every write in one
``BEGIN IMMEDIATE`` transaction). Nothing is ever updated or deleted (but the ``claims`` of
candidates being measured now, which tuners drop when done); "the best schedule" is a
query over the history (the ``best`` view). Trust state and re-verification verdicts: see the
`shapetune.db` docstring. Export lines are made and read by `codec`; the SQL lives in `schema`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO

from .. import config
from ..records import Candidate, LatencyStats, MeasureResult, VendorBaseline
from ..target import Target
from ..workload import Workload
from .codec import (BUCKET_COLS, LAT, MAX_FILE_CHARS, MAX_LINE_CHARS, baseline_to_json,
                    bucket_to_json, canonical, line_sha256, read_jsonl, record_to_json, write_jsonl)
from .errors import DBError
from .schema import BASE_COLS, CLAIMS, MIGRATIONS, REC_COLS, SCHEMA, SCHEMA_VERSION, TRUST

BUSY_TIMEOUT_S = 30.0
CLAIM_TTL_S = 3600.0  # a claim older than this is dropped (its tuner, on another host, is gone)


# SQLite stores a NaN REAL as NULL; keep NaN distinct from "no value" by storing it as text.
def _enc(x):
    return "NaN" if isinstance(x, float) and math.isnan(x) else x


def _dec(x):
    return math.nan if x == "NaN" else x


def _lat_cols(lat: LatencyStats | None) -> tuple:
    if lat is None:
        return (None,) * len(LAT)
    return tuple(_enc(getattr(lat, c)) for c in LAT)


def _lat_of(row: sqlite3.Row) -> LatencyStats | None:
    if row["repeats"] is None:
        return None
    return LatencyStats(*(_dec(row[c]) for c in LAT))


class TuningDB:
    """Append-only store of tuning results in SQLite.

    Parameters
    ----------
    path : str or Path, optional
        The DB file; ``config.default_db_path()`` if None. Parent directories are created.
    create : bool
        If False (read-only commands), a missing or 0-byte file raises `DBError` instead of
        becoming an empty DB.

    Raises
    ------
    DBError
        The file is not a SQLite DB, is corrupt, is some other SQLite DB, or has another
        schema version.
    """

    def __init__(self, path: str | Path | None = None, *, create: bool = True):
        self.path = Path(path) if path is not None else config.default_db_path()
        if not create:
            self._check_file(self.path)
        self._create = create
        self._fresh = not self.path.exists()  # created by this open: a failed import removes it
        self._failed_import = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._wl: dict[int, Workload] = {}
        self._tg: dict[int, Target] = {}
        self._wid: dict[str, int] = {}
        self._tid: dict[str, int] = {}
        try:
            self._con = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                        check_same_thread=False)
        except sqlite3.Error as e:
            raise DBError(f"cannot open tuning DB {self.path}: {e}") from e
        self._con.row_factory = sqlite3.Row
        try:
            self._init()
        except BaseException:
            self._con.close()
            raise

    # -- setup -----------------------------------------------------------------------------
    @staticmethod
    def _check_file(path: Path) -> None:
        """An existing DB opened without create= must be a file that is not empty."""
        if not path.exists():
            raise DBError(f"no tuning DB at {path} (nothing tuned yet, or a wrong --db path)")
        if path.is_file() and path.stat().st_size == 0:
            raise DBError(f"{path} is an empty file, not a tuning DB (a wrong --db path, or "
                          f"delete it to start a fresh DB)")

    def _fail(self, what: str, e: Exception | None = None) -> DBError:
        why = f": {e}" if e else ""
        return DBError(f"tuning DB {self.path} {what}{why}. Move it aside (or delete it) to start "
                       f"a fresh DB, or point --db / SHAPETUNE_DB elsewhere")

    def _init(self) -> None:
        c = self._con
        try:
            c.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if tables and "meta" not in tables:
                raise self._fail("is a SQLite DB but not a shapetune tuning DB (no meta table)")
            if not tables and not self._create:
                raise self._fail("holds no tables (an empty SQLite DB, not a tuning DB)")
            if not tables:
                with self._tx():  # another process may be creating it too: IF NOT EXISTS
                    for stmt in SCHEMA.split(";\n"):
                        if stmt.strip():
                            c.execute(stmt)
                    c.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                              (str(SCHEMA_VERSION),))
            self._check_version()
            self._wal()
            c.execute("PRAGMA synchronous = NORMAL")
        except DBError:
            raise
        except sqlite3.DatabaseError as e:
            raise self._fail("is not a readable SQLite DB (corrupt, or not a DB file)", e) from e

    def _wal(self) -> None:
        # Switching the journal mode needs an exclusive lock and may not wait on the busy handler.
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                self._con.execute("PRAGMA journal_mode = WAL").fetchone()
                return  # a filesystem without WAL support answers with its old mode; fine
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e):
                    raise
            if time.monotonic() > deadline:
                raise DBError(f"tuning DB {self.path}: cannot switch it to WAL mode "
                              f"(locked by another process for {BUSY_TIMEOUT_S:.0f} s)")
            time.sleep(0.05)

    def _check_version(self) -> None:
        row = self._con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            raise self._fail("has no schema_version in its meta table")
        try:
            v = int(row[0])
        except ValueError:
            raise self._fail(f"has a malformed schema_version {row[0]!r}") from None
        if v < SCHEMA_VERSION and all(u in MIGRATIONS for u in range(v, SCHEMA_VERSION)):
            with self._tx() as c:
                v = int(c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])
                for u in range(v, SCHEMA_VERSION):
                    for stmt in MIGRATIONS[u]:
                        stmt(self) if callable(stmt) else c.execute(stmt)
                c.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
            return
        if v != SCHEMA_VERSION:
            raise DBError(
                f"tuning DB {self.path} has schema version {v}, this shapetune reads version "
                f"{SCHEMA_VERSION}. Use the shapetune that wrote it to `db export` it, then "
                f"`db import` the export into a fresh DB (or move the file aside)")

    def _hash_existing(self) -> None:
        """Migration to v3: the sha256 of every stored row, computed from its fields."""
        c = self._con
        for table, cols, of, enc in (("records", REC_COLS, self._result_of, record_to_json),
                                     ("baselines", BASE_COLS, self._baseline_of, baseline_to_json)):
            rows = c.execute(f"SELECT {', '.join(cols)} FROM {table}").fetchall()
            c.executemany(f"UPDATE {table} SET sha256 = ? WHERE id = ?",
                          [(line_sha256(enc(of(row))), row["id"]) for row in rows])

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taking the write lock up front (no deadlock on upgrade)."""
        c = self._con
        c.execute("BEGIN IMMEDIATE")
        try:
            yield c
        except BaseException:
            c.execute("ROLLBACK")
            self._wid.clear()  # ids handed out inside the rolled-back transaction are gone
            self._tid.clear()
            raise
        c.execute("COMMIT")

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.DatabaseError as e:
            raise DBError(f"tuning DB {self.path}: {e}") from e

    def close(self) -> None:
        """Close the connection; the DB object is unusable afterwards. A DB file this object
        created is removed (with its WAL files) if an import into it failed, it is empty, and no other
        connection has it open: leaving WAL mode needs every other connection gone (each holds the
        shared-memory file's lock while open), so a tuner that opened the new DB meanwhile keeps it
        (before, its records went into a deleted file, silently)."""
        discard = self._fresh and self._failed_import and not any(
            self._con.execute(f"SELECT 1 FROM {t} LIMIT 1").fetchone()
            for t in ("records", "baselines", "buckets"))
        if discard:
            try:
                discard = self._con.execute("PRAGMA journal_mode = DELETE").fetchone()[0].lower() == "delete"
            except sqlite3.DatabaseError:  # busy: another connection
                discard = False
        self._con.close()
        self._fresh = False  # closing again removes nothing
        if discard:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    def __enter__(self) -> TuningDB:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- interning ---------------------------------------------------------------------------
    def _workload_id(self, w: Workload) -> int:
        k = w.key
        if k not in self._wid:
            c = self._con
            c.execute("INSERT OR IGNORE INTO workloads(key, op, name, json) VALUES (?,?,?,?)",
                      (k, w.op, w.name, json.dumps(w.to_json(), sort_keys=True)))
            self._wid[k] = c.execute("SELECT id FROM workloads WHERE key=?", (k,)).fetchone()[0]
        return self._wid[k]

    def _target_id(self, t: Target) -> int:
        k = t.key
        if k not in self._tid:
            c = self._con
            c.execute("INSERT OR IGNORE INTO targets(key, kind, arch, device_name, json) "
                      "VALUES (?,?,?,?,?)",
                      (k, t.kind, t.arch, t.device_name, json.dumps(t.to_json(), sort_keys=True)))
            self._tid[k] = c.execute("SELECT id FROM targets WHERE key=?", (k,)).fetchone()[0]
        return self._tid[k]

    def _w(self, wid: int) -> Workload:
        if wid not in self._wl:
            row = self._con.execute("SELECT json FROM workloads WHERE id=?", (wid,)).fetchone()
            self._wl[wid] = Workload.from_json(row[0])
        return self._wl[wid]

    def _t(self, tid: int) -> Target:
        if tid not in self._tg:
            row = self._con.execute("SELECT json FROM targets WHERE id=?", (tid,)).fetchone()
            self._tg[tid] = Target.from_json(row[0])
        return self._tg[tid]

    # -- writes ------------------------------------------------------------------------------
    def _insert_result(self, r: MeasureResult, origin: str = "measured") -> bool:
        r = canonical(r)
        cand = r.candidate
        cur = self._con.execute(
            "INSERT OR IGNORE INTO records(uid, workload_id, target_id, run_id, created, template, "
            "candidate_key, knobs, status, verified, error, max_rel_err, build_s, median_us, "
            "mean_us, min_us, max_us, std_us, repeats, origin, sha256) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (r.uid, self._workload_id(r.workload), self._target_id(r.target), r.run_id, r.created,
             cand.template, cand.key, json.dumps(cand.to_json()), r.status, int(r.verified),
             r.error, _enc(r.max_rel_err), _enc(r.build_s)) + _lat_cols(r.latency)
            + (origin, line_sha256(record_to_json(r))))
        return cur.rowcount == 1

    def _insert_baseline(self, b: VendorBaseline, origin: str = "measured") -> bool:
        b = canonical(b)
        cur = self._con.execute(
            "INSERT OR IGNORE INTO baselines(uid, workload_id, target_id, run_id, created, name, "
            "median_us, mean_us, min_us, max_us, std_us, repeats, origin, sha256) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (b.uid, self._workload_id(b.workload), self._target_id(b.target), b.run_id, b.created,
             b.name) + _lat_cols(b.latency) + (origin, line_sha256(baseline_to_json(b))))
        return cur.rowcount == 1

    def _insert(self, obj: MeasureResult | VendorBaseline, origin: str) -> bool:
        if isinstance(obj, MeasureResult):
            return self._insert_result(obj, origin)
        return self._insert_baseline(obj, origin)

    def add_result(self, r: MeasureResult) -> bool:
        """Append one measurement.

        Returns
        -------
        bool
            True if it was new, False if a record with the same uid was already stored.
        """
        return self.add_results([r]) == 1

    def add_results(self, results: Iterable[MeasureResult]) -> int:
        """Append measurements in one transaction; duplicates (same uid) are skipped.

        Returns
        -------
        int
            How many were new.
        """
        with self._guard(), self._tx():
            return sum(self._insert_result(r) for r in results)

    def add_baseline(self, b: VendorBaseline) -> bool:
        """Append one vendor baseline; returns False if its uid was already stored."""
        with self._guard(), self._tx():
            return self._insert_baseline(b)

    # -- claims: candidates being measured now ---------------------------------------------
    def _held(self, c: sqlite3.Connection, wid: int, tid: int, templates: tuple[str, ...],
              versions: Mapping[str, str] | None = None) -> tuple[set[str], int]:
        """Drop dead tuners' claims; then (candidate keys, count) held for (workload, target): its
        records (rows counted) and live claims not yet recorded, of `templates` only if given; a record
        of a template in `versions` only if of that Candidate.version."""
        c.execute(CLAIMS)
        host = socket.gethostname()
        c.execute("DELETE FROM claims WHERE created < ?", (time.time() - CLAIM_TTL_S,))
        for (pid,) in c.execute("SELECT DISTINCT pid FROM claims WHERE host = ?", (host,)).fetchall():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                c.execute("DELETE FROM claims WHERE host = ? AND pid = ?", (host, pid))
            except PermissionError:
                pass  # alive, another user's
        tsql = f" AND template IN ({','.join('?' * len(templates))})" if templates else ""
        rec = [k for k, t, cand in c.execute(f"SELECT candidate_key, template, knobs FROM records WHERE "
                                             f"workload_id = ? AND target_id = ?{tsql}", (wid, tid, *templates))
               if t not in (versions or {}) or Candidate.from_json(cand).version == versions[t]]
        claimed = {k for (k,) in c.execute(f"SELECT candidate_key FROM claims WHERE workload_id = ? AND "
                                           f"target_id = ?{tsql}", (wid, tid, *templates))}
        return set(rec) | claimed, len(rec) + len(claimed - set(rec))

    def held(self, workload: Workload, target: Target, templates: tuple[str, ...] = (),
             versions: Mapping[str, str] | None = None) -> tuple[set[str], int]:
        """(candidate keys, count) that (workload, target) holds: records (every row counts, any
        status) and the live claims of tuners measuring it now; only `templates` if given. versions:
        {template: the Candidate.version of its candidates now}; that template's records of another
        version are not held (their knobs are measured again, as this version)."""
        with self._guard(), self._tx() as c:
            return self._held(c, self._workload_id(workload), self._target_id(target), templates, versions)

    def claim(self, workload: Workload, target: Target, candidates: list[Candidate], run_id: str,
              total: int | None = None, templates: tuple[str, ...] = (),
              versions: Mapping[str, str] | None = None) -> list[Candidate]:
        """Claim `candidates` (in order) for measuring under `run_id`: those no record or live claim
        holds, and with `total`, no more than bring what (workload, target) holds (`held`) to it.
        Returns the claimed ones; `release` them once their results are stored."""
        with self._guard(), self._tx() as c:
            wid, tid = self._workload_id(workload), self._target_id(target)
            keys, count = self._held(c, wid, tid, templates, versions)
            free = [x for x in {x.key: x for x in candidates}.values() if x.key not in keys]
            out = free if total is None else free[:max(0, total - count)]
            now, host, pid = time.time(), socket.gethostname(), os.getpid()
            c.executemany("INSERT INTO claims VALUES (?,?,?,?,?,?,?,?)",
                          [(wid, tid, x.key, x.template, run_id, host, pid, now) for x in out])
        return out

    def release(self, workload: Workload, target: Target, candidates: Iterable[Candidate], run_id: str) -> None:
        """Drop this run's claims on `candidates`."""
        with self._guard(), self._tx() as c:
            c.execute(CLAIMS)
            c.executemany("DELETE FROM claims WHERE workload_id = ? AND target_id = ? AND candidate_key = ? "
                          "AND run_id = ?", [(self._workload_id(workload), self._target_id(target), x.key, run_id)
                                             for x in candidates])

    # -- reads -------------------------------------------------------------------------------
    @staticmethod
    def _where(workload_key, target_key, op, **eq) -> tuple[str, list]:
        conds, args = [], []
        for col, v in (("w.key", workload_key), ("t.key", target_key), ("w.op", op),
                       *((f"x.{k}", v) for k, v in eq.items())):
            if v is not None:
                conds.append(f"{col} = ?")
                args.append(v)
        return (" WHERE " + " AND ".join(conds)) if conds else "", args

    def _result_of(self, row: sqlite3.Row) -> MeasureResult:
        mre = row["max_rel_err"]
        return MeasureResult(
            workload=self._w(row["workload_id"]), target=self._t(row["target_id"]),
            candidate=Candidate.from_json(row["knobs"]), status=row["status"],
            latency=_lat_of(row), error=row["error"],
            max_rel_err=None if mre is None else _dec(mre), build_s=_dec(row["build_s"]),
            run_id=row["run_id"], created=row["created"])

    def _baseline_of(self, row: sqlite3.Row) -> VendorBaseline:
        return VendorBaseline(
            workload=self._w(row["workload_id"]), target=self._t(row["target_id"]),
            name=row["name"], latency=_lat_of(row), run_id=row["run_id"], created=row["created"])

    def _select(self, table: str, cols: tuple, where: str, args: list, order: str,
                limit: int | None) -> list[sqlite3.Row]:
        sel = ", ".join(f"x.{c}" for c in cols)
        sql = (f"SELECT {sel} FROM {table} x JOIN workloads w ON w.id = x.workload_id "
               f"JOIN targets t ON t.id = x.target_id{where} ORDER BY {order}")
        if limit is not None:
            sql += " LIMIT ?"
            args = [*args, int(limit)]
        with self._guard():
            return self._con.execute(sql, args).fetchall()

    def iter_results(self, workload_key: str | None = None, target_key: str | None = None,
                     op: str | None = None, status: str | None = None,
                     template: str | None = None, limit: int | None = None, origin: str | None = None,
                     ) -> list[tuple[int, MeasureResult]]:
        """Like `results`, with each record's row id: ``[(id, MeasureResult), ...]``; origin:
        only "measured" (into this DB) or "imported" records."""
        where, args = self._where(workload_key, target_key, op, status=status, template=template,
                                  origin=origin)
        rows = self._select("records", REC_COLS, where, args, "x.created DESC, x.id DESC", limit)
        with self._guard():
            return [(row["id"], self._result_of(row)) for row in rows]

    def results(self, workload_key: str | None = None, target_key: str | None = None,
                op: str | None = None, status: str | None = None, template: str | None = None,
                limit: int | None = None) -> list[MeasureResult]:
        """Stored measurements, newest (by ``created``) first.

        Parameters
        ----------
        workload_key, target_key, op, status, template : str, optional
            Keep only records matching every filter given.
        limit : int, optional
            At most this many.

        Returns
        -------
        list of MeasureResult
        """
        return [r for _, r in self.iter_results(workload_key, target_key, op, status, template,
                                                limit)]

    def find(self, ref: str | int) -> tuple[int, MeasureResult] | None:
        """One record by row id, full uid, or a unique uid prefix.

        Returns
        -------
        (id, MeasureResult) or None
            None if nothing matches.

        Raises
        ------
        DBError
            If a uid prefix matches several records.
        """
        ref = str(ref).strip()
        sel = ", ".join(REC_COLS)
        with self._guard():
            rows = []
            if ref.isdigit():
                rows = self._con.execute(f"SELECT {sel} FROM records WHERE id=?",
                                         (int(ref),)).fetchall()
            if not rows and ref:
                pat = ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                rows = self._con.execute(
                    f"SELECT {sel} FROM records WHERE uid LIKE ? ESCAPE '\\' LIMIT 2",
                    (pat + "%",)).fetchall()
            if len(rows) > 1:
                raise DBError(f"uid prefix {ref!r} matches several records; give more characters")
            return (rows[0]["id"], self._result_of(rows[0])) if rows else None

    def best(self, workload_key: str, target_key: str, include_pending: bool = False,
             ) -> MeasureResult | None:
        """The verified, measured record with the lowest median latency (ties: the earliest
        stored): what may be served.

        Parameters
        ----------
        include_pending : bool
            Also imported records not re-verified here (yet), the claims of the export they came
            from: for tools that rebuild and re-measure the kernel themselves. Records that failed
            re-verification are never included.

        Returns
        -------
        MeasureResult or None
            None if the workload has no such record on that target.
        """
        where, args = self._where(workload_key, target_key, None)
        rows = self._select("best_claimed" if include_pending else "best", REC_COLS, where, args,
                            "x.id", None)
        with self._guard():
            return self._result_of(rows[0]) if rows else None

    def best_all(self, target_key: str | None = None, op: str | None = None,
                 include_pending: bool = False) -> list[MeasureResult]:
        """`best` for every (workload, target) pair, ordered by workload name then target key."""
        where, args = self._where(None, target_key, op)
        rows = self._select("best_claimed" if include_pending else "best", REC_COLS, where, args,
                            "w.name, t.key", None)
        with self._guard():
            return [self._result_of(row) for row in rows]

    # -- trust -----------------------------------------------------------------------------------
    def pending(self, target_key: str, workload_key: str | None = None, op: str | None = None,
                ) -> list[tuple[int, MeasureResult]]:
        """Imported ok records of a target, not re-verified yet, that could be served: faster
        than the workload's best measured record, or it has none. ``[(id, MeasureResult), ...]``
        by workload name, then fastest first."""
        where, args = self._where(workload_key, target_key, op)
        sel = ", ".join(f"x.{c}" for c in REC_COLS)
        sql = (f"SELECT {sel} FROM records x JOIN workloads w ON w.id = x.workload_id "
               f"JOIN targets t ON t.id = x.target_id LEFT JOIN best b "
               f"ON b.workload_id = x.workload_id AND b.target_id = x.target_id{where} "
               "AND x.origin = 'imported' AND x.verified = 1 "
               "AND typeof(x.median_us) IN ('real', 'integer') "
               "AND NOT EXISTS (SELECT 1 FROM reverifications v WHERE v.record_id = x.id) "
               "AND (b.id IS NULL OR (x.median_us, x.id) < (b.median_us, b.id)) "
               "ORDER BY w.name, w.key, x.median_us, x.id")
        with self._guard():
            return [(row["id"], self._result_of(row)) for row in self._con.execute(sql, args)]

    def trust(self, ids: Iterable[int]) -> dict[int, tuple[str, str]]:
        """{row id: (trust state, reason)} of records: measured | imported (pending
        re-verification) | reverified | reverify_failed (the reason: why it failed)."""
        ids = [int(i) for i in ids]
        sql = (f"SELECT x.id, {TRUST}, COALESCE(v.error, '') FROM records x LEFT JOIN "
               f"reverifications v ON v.record_id = x.id WHERE x.id IN ({','.join('?' * len(ids))})")
        with self._guard():
            return {i: (state, why) for i, state, why in self._con.execute(sql, ids)}

    def add_reverification(self, record_id: int, measured: MeasureResult | None = None,
                           error: str = "", uid: str | None = None) -> bool:
        """Store the verdict of re-verifying imported record `record_id` on this target: passed,
        with `measured` (its result measured here, appended as a measured record), or failed with
        `error`. Returns False if the record already had a verdict (it keeps the first), or `uid` is
        given and the record is no longer that one (a row id read earlier: `db prune` may have deleted
        it since, and SQLite gives the ids of the last rows deleted to the next rows stored)."""
        if (measured is None) == (not error) or (measured is not None and not measured.verified):
            raise ValueError("a verdict is either an ok result measured here or an error")
        with self._guard(), self._tx() as c:
            row = c.execute("SELECT origin, uid FROM records WHERE id = ?", (record_id,)).fetchone()
            if uid is not None and (row is None or row[1] != uid):
                return False
            if row is None or row[0] != "imported":
                raise ValueError(f"record {record_id} is not an imported record")
            cur = c.execute("INSERT OR IGNORE INTO reverifications VALUES (?, ?, ?, ?, ?)",
                            (record_id, time.time(), int(measured is not None), error,
                             measured.uid if measured else None))
            if cur.rowcount == 1 and measured is not None:
                self._insert_result(measured)
            return cur.rowcount == 1

    def baselines(self, workload_key: str | None = None, target_key: str | None = None,
                  op: str | None = None, name: str | None = None, limit: int | None = None,
                  ) -> list[VendorBaseline]:
        """Stored vendor baselines, newest (by ``created``) first, filtered like `results`."""
        where, args = self._where(workload_key, target_key, op, name=name)
        rows = self._select("baselines", BASE_COLS, where, args, "x.created DESC, x.id DESC",
                            limit)
        with self._guard():
            return [self._baseline_of(row) for row in rows]

    def baseline(self, workload_key: str, target_key: str) -> VendorBaseline | None:
        """The newest vendor baseline of a workload on a target, or None."""
        b = self.baselines(workload_key, target_key, limit=1)
        return b[0] if b else None

    def workloads(self, op: str | None = None) -> list[Workload]:
        """Every workload seen, ordered by name."""
        with self._guard():
            rows = self._con.execute(
                "SELECT id FROM workloads" + (" WHERE op=?" if op else "") + " ORDER BY name, key",
                (op,) if op else ()).fetchall()
            return [self._w(r[0]) for r in rows]

    def workload(self, key: str) -> Workload | None:
        """The workload with this key, or None."""
        with self._guard():
            row = self._con.execute("SELECT id FROM workloads WHERE key=?", (key,)).fetchone()
            return self._w(row[0]) if row else None

    def targets(self) -> list[Target]:
        """Every target seen, ordered by key."""
        with self._guard():
            return [self._t(r[0]) for r in self._con.execute("SELECT id FROM targets ORDER BY key")]

    def target(self, key: str) -> Target | None:
        """The target with this key, or None."""
        with self._guard():
            row = self._con.execute("SELECT id FROM targets WHERE key=?", (key,)).fetchone()
            return self._t(row[0]) if row else None

    # -- shape buckets ----------------------------------------------------------------------
    def add_buckets(self, rows: Iterable[dict]) -> int:
        """Record bucket definitions (policy, op, dim, lo, hi, representative); returns how many
        were new. Records of bucket workloads name their ranges; this table names the policy."""
        with self._guard(), self._tx():
            return self._insert_buckets(rows)

    def _insert_buckets(self, rows: Iterable[dict]) -> int:
        c = self._con
        before = c.total_changes
        c.executemany("INSERT OR IGNORE INTO buckets VALUES (?, ?, ?, ?, ?, ?)",
                      [tuple(r[k] for k in BUCKET_COLS) for r in rows])
        return c.total_changes - before

    def buckets(self, op: str | None = None) -> list[dict]:
        sql = "SELECT policy, op, dim, lo, hi, representative FROM buckets"
        args: tuple = ()
        if op:
            sql, args = sql + " WHERE op = ?", (op,)
        with self._guard():
            return [dict(r) for r in self._con.execute(sql + " ORDER BY policy, op, dim, lo", args)]

    def merge_from(self, path: str | Path) -> tuple[int, int]:
        """Append another DB's records, baselines and bucket rows (e.g. one shard of a multi-GPU
        job), or a JSONL(.xz) export's; returns (added, skipped). Entries already here (same uid)
        are skipped. A DB's entries keep their origin (a shard's measurements stay measured; its
        imports are pending here, its verdicts are not copied); an export's are imported
        (`import_jsonl`)."""
        if str(path).endswith((".jsonl", ".jsonl.xz")):
            return self.import_jsonl(path)
        with _read_only(path) as src:
            entries = list(src._stored())
            rows = src.buckets()
        with self._guard(), self._tx():
            new = [self._insert(obj, origin) for obj, origin, _ in entries]
        self.add_buckets(rows)
        return sum(new), len(new) - sum(new)

    def _stored(self, where: str = "", args: list | None = None,
                ) -> Iterator[tuple[MeasureResult | VendorBaseline, str, dict]]:
        """(entry, origin, export line) of every record, then every baseline, oldest first; a row
        whose fields no longer match its stored sha256 (edited in the DB) raises DBError."""
        for table, cols, of, enc in (("records", REC_COLS, self._result_of, record_to_json),
                                     ("baselines", BASE_COLS, self._baseline_of, baseline_to_json)):
            for row in self._select(table, cols, where, args or [], "x.id", None):
                with self._guard():
                    obj = of(row)
                line = enc(obj)
                h = line_sha256(line)
                if row["sha256"] != h:
                    raise DBError(f"tuning DB {self.path}: {table} row {row['id']} does not match "
                                  f"its stored sha256 (edited in the DB after it was stored)")
                yield obj, row["origin"], {**line, "sha256": h}

    def stats(self) -> dict:
        """Counts and facts about the DB.

        Returns
        -------
        dict
            ``path``, ``schema_version``, ``file_size`` (bytes, main file + WAL), ``records``,
            ``by_status``, ``by_trust``, ``by_op``, ``by_target`` (record counts), ``workloads``,
            ``targets``, ``baselines``, ``best`` (pairs with a verified, measured record).
        """
        c = self._con

        def one(sql):
            return c.execute(sql).fetchone()[0]

        def group(sql):
            return {k: n for k, n in c.execute(sql)}

        size = sum(os.path.getsize(p) for p in (self.path, Path(f"{self.path}-wal"))
                   if os.path.exists(p))
        with self._guard():
            return {
                "path": str(self.path),
                "schema_version": SCHEMA_VERSION,
                "file_size": size,
                "records": one("SELECT COUNT(*) FROM records"),
                "by_status": group("SELECT status, COUNT(*) FROM records GROUP BY status "
                                   "ORDER BY status"),
                "by_trust": group(f"SELECT {TRUST} AS s, COUNT(*) FROM records x LEFT JOIN "
                                  "reverifications v ON v.record_id = x.id GROUP BY s ORDER BY s"),
                "by_op": group("SELECT w.op, COUNT(*) FROM records r JOIN workloads w "
                               "ON w.id = r.workload_id GROUP BY w.op ORDER BY w.op"),
                "by_target": group("SELECT t.key, COUNT(*) FROM records r JOIN targets t "
                                   "ON t.id = r.target_id GROUP BY t.key ORDER BY t.key"),
                "workloads": one("SELECT COUNT(*) FROM workloads"),
                "targets": one("SELECT COUNT(*) FROM targets"),
                "baselines": one("SELECT COUNT(*) FROM baselines"),
                "best": one("SELECT COUNT(*) FROM best"),
            }

    # -- JSONL -------------------------------------------------------------------------------
    def export_jsonl(self, fp_or_path: str | Path | IO[str], target_key: str | None = None,
                     op: str | None = None) -> int:
        """Write records, then baselines, oldest first, then bucket rows, one JSON object per line,
        each with the ``sha256`` of the line without it (`line_sha256`). Origins and re-verification verdicts
        are not exported: whoever imports the file re-verifies it.

        Parameters
        ----------
        fp_or_path : path or text stream
            A path ending in ``.xz`` is written xz-compressed.
        target_key, op : str, optional
            Export only these.

        Returns
        -------
        int
            Lines written.
        """
        where, args = self._where(None, target_key, op)
        lines = [line for _, _, line in self._stored(where, args)]
        lines += [{**b, "sha256": line_sha256(b)} for b in map(bucket_to_json, self.buckets(op))]
        return write_jsonl(fp_or_path, lines)

    def import_jsonl(self, fp_or_path: str | Path | IO[str],
                     validate: Callable[[MeasureResult], str | None] | None = None,
                     max_line_chars: int = MAX_LINE_CHARS, max_file_chars: int = MAX_FILE_CHARS,
                     ) -> tuple[int, int]:
        """Append the records and baselines of a JSONL export, all or nothing, as imported:
        pending re-verification on this target, not served before (see `shapetune.db`).

        Every line is checked before anything is stored: its fields and uid, its ``sha256``
        (`from_json_line`), that an entry stored here with its uid has the same contents, and
        `validate`. A file whose lines carry no sha256 (exports older than schema v3, such as the
        shipped tuning_logs/) is accepted as legacy; one that mixes lines with and without is not.
        The hash catches edits that did not recompute it; re-verification is the trust boundary.
        The lines are read by `codec.read_jsonl`.

        Parameters
        ----------
        fp_or_path : path or text stream
            A path ending in ``.xz`` is read through lzma.
        validate : callable, optional
            ``validate(record) -> reason or None``, called on every record: a reason rejects the
            file (e.g. scheduler.reverify.knob_error: the knobs against the template's space).
        max_line_chars, max_file_chars : int
            Size limits of a line and of the file, in characters (``codec.MAX_LINE_CHARS``: 1 MiB,
            ``codec.MAX_FILE_CHARS``: 1 GiB); beyond them the file is rejected.

        Returns
        -------
        (added, skipped)
            Skipped lines were already stored (same uid, same contents).

        Raises
        ------
        DBError
            On a line that fails a check (named by number, with the reason); nothing from the
            file is then stored.
        """
        with self._discard_if_failed():
            objs = read_jsonl(fp_or_path, lambda obj: self._conflict(obj) or (
                validate(obj) if validate and isinstance(obj, MeasureResult) else None),
                max_line_chars, max_file_chars)
            entries = [obj for obj in objs if not isinstance(obj, dict)]
            with self._guard(), self._tx():
                new = [self._insert(obj, "imported") for obj in entries]
                self._insert_buckets([obj for obj in objs if isinstance(obj, dict)])
        return sum(new), len(new) - sum(new)

    def import_db(self, path: str | Path, validate: Callable[[MeasureResult], str | None] | None = None,
                  ) -> tuple[int, int]:
        """Another tuning DB file's records, baselines and bucket rows, as imported: claims made on
        another machine, pending re-verification here like a JSONL export's (`merge_from` is for
        shards of one's own job, whose measurements stay measured). Every entry is checked first
        (same uid, same contents; `validate`); one that fails rejects the file, nothing stored.

        Returns (added, skipped); raises DBError naming the entry and the reason."""
        with self._discard_if_failed():
            with _read_only(path) as src:
                entries = [obj for obj, _, _ in src._stored()]
                rows = src.buckets()
            for obj in entries:
                why = self._conflict(obj) or (validate(obj) if validate and isinstance(obj, MeasureResult) else None)
                if why:
                    raise DBError(f"{path}: {type(obj).__name__} {obj.uid} rejected: {why}; nothing imported")
            with self._guard(), self._tx():
                new = [self._insert(obj, "imported") for obj in entries]
                self._insert_buckets(rows)
        return sum(new), len(new) - sum(new)

    @contextlib.contextmanager
    def _discard_if_failed(self) -> Iterator[None]:
        """Mark a failed import: `close` then removes a DB file this object created if nothing
        was stored in it (a mistyped --db leaves nothing behind)."""
        try:
            yield
        except BaseException:
            self._failed_import = True
            raise

    def _conflict(self, obj: MeasureResult | VendorBaseline) -> str | None:
        """Why `obj` cannot be imported next to what is stored here under its uid, or None."""
        rec = isinstance(obj, MeasureResult)
        with self._guard():
            row = self._con.execute(f"SELECT sha256 FROM {'records' if rec else 'baselines'} "
                                    "WHERE uid = ?", (obj.uid,)).fetchone()
        h = line_sha256(record_to_json(obj) if rec else baseline_to_json(obj))
        if row is None or row[0] == h:
            return None
        return (f"uid {obj.uid} is stored here with other contents (status, latency or error "
                f"edited, or a different history)")


@contextlib.contextmanager
def _read_only(path: str | Path) -> Iterator[TuningDB]:
    """Another tuning DB file, only read (`import_db`, `merge_from`): copied through a read-only connection
    with SQLite's backup API (committed WAL pages included) into a temporary file, which is opened as the
    TuningDB (an older schema is migrated there, not in the source: the shapetune that wrote it keeps reading
    it, and a read-only file imports)."""
    path = Path(path)
    TuningDB._check_file(path)
    with tempfile.TemporaryDirectory(prefix="shapetune-import-") as tmp:
        copy = Path(tmp) / "source.db"
        try:
            _backup(path, copy)
        except sqlite3.Error as e:
            raise DBError(f"tuning DB {path} is not a readable SQLite DB (corrupt, or not a DB file): {e}") from e
        try:
            db = TuningDB(copy, create=False)
        except DBError as e:  # name the file the user gave, not the copy
            raise DBError(str(e).replace(str(copy), str(path))) from e
        with db:
            yield db


def _backup(path: Path, copy: Path) -> None:
    """Copy the DB at `path` into the file `copy`, through a read-only connection. A WAL-mode DB opens read-only
    only where its -shm file exists or can be made: in a directory this process cannot write, with neither
    -wal nor -journal beside it (every committed page in the file itself), it is read as immutable instead."""
    uri = path.resolve().as_uri()
    for query in ("mode=ro", "mode=ro&immutable=1"):
        src = sqlite3.connect(f"{uri}?{query}", uri=True, timeout=BUSY_TIMEOUT_S)
        try:
            with contextlib.closing(sqlite3.connect(copy)) as dst:
                src.backup(dst)
            return
        except sqlite3.OperationalError as e:
            if ("immutable" in query or "unable to open" not in str(e)
                    or any(Path(f"{path}{s}").exists() for s in ("-wal", "-journal"))):
                raise
        finally:
            src.close()
