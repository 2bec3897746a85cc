"""The tuning DB's SQLite schema: tables, indexes, views, its version and the migrations to it.

Column lists (`REC_COLS`, `BASE_COLS`) and the trust-state expression (`TRUST`) are what the
store selects; `MIGRATIONS` maps a version to the statements (SQL, or a callable given the
`TuningDB`) that take a DB from it to the next.
"""

from __future__ import annotations

from .codec import LAT

SCHEMA_VERSION = 3

# Re-verification verdicts (one per imported record; `measured_uid`: the record appended as
# measured here when it passed), and the fastest ok record per (workload, target) in two views:
# `best` serves measured records only, `best_claimed` adds imports not failed re-verification.
_BEST = """CREATE VIEW IF NOT EXISTS {name} AS
    SELECT * FROM (
        SELECT r.*, ROW_NUMBER() OVER (
            PARTITION BY r.workload_id, r.target_id ORDER BY r.median_us, r.id) AS rank
        FROM records r
        WHERE r.verified = 1 AND typeof(r.median_us) IN ('real', 'integer') AND ({trusted}))
    WHERE rank = 1"""
_FAILED = "EXISTS (SELECT 1 FROM reverifications v WHERE v.record_id = r.id AND v.ok = 0)"
_V3 = [
    """CREATE TABLE IF NOT EXISTS reverifications (
    record_id INTEGER PRIMARY KEY REFERENCES records(id), created REAL NOT NULL,
    ok INTEGER NOT NULL, error TEXT NOT NULL, measured_uid TEXT)""",
    _BEST.format(name="best", trusted="r.origin = 'measured'"),
    _BEST.format(name="best_claimed", trusted=f"r.origin = 'measured' OR NOT {_FAILED}"),
]

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS workloads (
    id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, op TEXT NOT NULL, name TEXT NOT NULL,
    json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS targets (
    id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, arch TEXT NOT NULL,
    device_name TEXT NOT NULL, json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY, uid TEXT NOT NULL UNIQUE,
    workload_id INTEGER NOT NULL REFERENCES workloads(id),
    target_id INTEGER NOT NULL REFERENCES targets(id),
    run_id TEXT NOT NULL, created REAL NOT NULL, template TEXT NOT NULL,
    candidate_key TEXT NOT NULL, knobs TEXT NOT NULL, status TEXT NOT NULL,
    verified INTEGER NOT NULL, error TEXT NOT NULL, max_rel_err REAL, build_s REAL NOT NULL,
    median_us REAL, mean_us REAL, min_us REAL, max_us REAL, std_us REAL, repeats INTEGER,
    origin TEXT NOT NULL DEFAULT 'measured', sha256 TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS baselines (
    id INTEGER PRIMARY KEY, uid TEXT NOT NULL UNIQUE,
    workload_id INTEGER NOT NULL REFERENCES workloads(id),
    target_id INTEGER NOT NULL REFERENCES targets(id),
    run_id TEXT NOT NULL, created REAL NOT NULL, name TEXT NOT NULL,
    median_us REAL NOT NULL, mean_us REAL NOT NULL, min_us REAL NOT NULL, max_us REAL NOT NULL,
    std_us REAL NOT NULL, repeats INTEGER NOT NULL,
    origin TEXT NOT NULL DEFAULT 'measured', sha256 TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS buckets (
    policy TEXT NOT NULL, op TEXT NOT NULL, dim TEXT NOT NULL, lo INTEGER NOT NULL,
    hi INTEGER NOT NULL, representative INTEGER NOT NULL, PRIMARY KEY (policy, op, dim, lo, hi));
CREATE INDEX IF NOT EXISTS workloads_op ON workloads(op);
CREATE INDEX IF NOT EXISTS records_best ON records(workload_id, target_id, verified, median_us, id);
CREATE INDEX IF NOT EXISTS records_target ON records(target_id, status);
CREATE INDEX IF NOT EXISTS records_created ON records(created, id);
CREATE INDEX IF NOT EXISTS baselines_wt ON baselines(workload_id, target_id, created, id);
""" + ";\n".join(_V3)

# Candidates a tuner is measuring right now, so that a second tuner on the same workloads skips
# them. Coordination, not data: never exported or merged, no schema version; made on first use.
CLAIMS = """CREATE TABLE IF NOT EXISTS claims (
    workload_id INTEGER NOT NULL, target_id INTEGER NOT NULL, candidate_key TEXT NOT NULL,
    template TEXT NOT NULL, run_id TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL,
    created REAL NOT NULL, PRIMARY KEY (workload_id, target_id, candidate_key))"""

# Upgrades in place: version -> the statements that take a DB from it to the next version.
MIGRATIONS = {
    1: ["CREATE TABLE IF NOT EXISTS buckets (policy TEXT NOT NULL, op TEXT NOT NULL, "
        "dim TEXT NOT NULL, lo INTEGER NOT NULL, hi INTEGER NOT NULL, representative INTEGER NOT NULL, "
        "PRIMARY KEY (policy, op, dim, lo, hi))"],
    # Rows already stored were measured into this DB; their hashes are computed from their fields.
    2: [*(f"ALTER TABLE {t} ADD COLUMN {c} TEXT NOT NULL DEFAULT '{d}'"
          for t in ("records", "baselines") for c, d in (("origin", "measured"), ("sha256", ""))),
        "DROP VIEW IF EXISTS best", *_V3, lambda db: db._hash_existing()],
}

REC_COLS = ("id", "workload_id", "target_id", "run_id", "created", "knobs", "status", "error",
            "max_rel_err", "build_s") + LAT + ("origin", "sha256")
TRUST = ("CASE WHEN x.origin = 'measured' THEN 'measured' WHEN v.ok = 1 THEN 'reverified' "
         "WHEN v.ok = 0 THEN 'reverify_failed' ELSE 'imported' END")
BASE_COLS = ("id", "workload_id", "target_id", "run_id", "created", "name") + LAT \
    + ("origin", "sha256")
