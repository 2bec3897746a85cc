"""Records and baselines <-> JSON export lines: fields, uid and sha256 checks, JSONL(.xz) files.

Usable without a DB. An export line is one JSON object (``"type": "record"``, ``"baseline"`` or
``"bucket"``: a row of the DB's buckets table) carrying the ``sha256`` of its canonical JSON without
that key (`line_sha256`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import lzma
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

from ..records import Candidate, LatencyStats, MeasureResult, VendorBaseline
from ..target import Target
from ..workload import Workload
from .errors import DBError

# The fields of LatencyStats in order (also the DB's latency columns).
LAT = ("median_us", "mean_us", "min_us", "max_us", "std_us", "repeats")

# Import size limits (characters of decoded text; read_jsonl's defaults). The longest shipped line
# is under 3 KB and the largest shipped export under 1 MB decompressed: a line over 1 MiB is not an
# export line, and a file over 1 GiB would not fit the all-or-nothing import in memory.
MAX_LINE_CHARS = 1 << 20
MAX_FILE_CHARS = 1 << 30


def canonical(r):
    """`created` as a float, as it will read back (its repr is part of the uid)."""
    return r if isinstance(r.created, float) else dataclasses.replace(r, created=float(r.created))


def open_text(fp_or_path, mode: str) -> tuple[IO[str], bool]:
    """(text stream, whether we opened it). Paths ending in .xz go through lzma."""
    if isinstance(fp_or_path, (str, os.PathLike)):
        p = Path(fp_or_path)
        if p.suffix == ".xz":
            return lzma.open(p, mode + "t", encoding="utf-8"), True
        return open(p, mode, encoding="utf-8", newline="\n"), True
    return fp_or_path, False


# -- JSON line codec ---------------------------------------------------------------------------
def _lat_json(lat: LatencyStats | None) -> dict | None:
    return None if lat is None else lat.to_json()


def line_sha256(line: dict) -> str:
    """The integrity hash of an export line: sha256 of its canonical JSON (keys sorted, no
    spaces), without its own ``sha256`` key."""
    body = {k: v for k, v in line.items() if k != "sha256"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def record_to_json(r: MeasureResult) -> dict:
    """The export line of a measurement (``"type": "record"``)."""
    r = canonical(r)
    return {"type": "record", "uid": r.uid, "workload": r.workload.to_json(),
            "target": r.target.to_json(), "candidate": r.candidate.to_json(), "status": r.status,
            "latency": _lat_json(r.latency), "error": r.error, "max_rel_err": r.max_rel_err,
            "build_s": r.build_s, "run_id": r.run_id, "created": r.created}


def baseline_to_json(b: VendorBaseline) -> dict:
    """The export line of a vendor baseline (``"type": "baseline"``)."""
    b = canonical(b)
    return {"type": "baseline", "uid": b.uid, "workload": b.workload.to_json(),
            "target": b.target.to_json(), "name": b.name, "latency": _lat_json(b.latency),
            "run_id": b.run_id, "created": b.created}


BUCKET_COLS = ("policy", "op", "dim", "lo", "hi", "representative")


def bucket_to_json(row: dict) -> dict:
    """The export line of a bucket row (``"type": "bucket"``; `TuningDB.buckets` rows)."""
    return {"type": "bucket", **{c: row[c] for c in BUCKET_COLS}}


def bucket_from_json(d: dict) -> dict:
    """The bucket row of an export line, its fields checked: strings, an op this shapetune
    defines, integers ``lo <= representative <= hi``."""
    from shapetune.ops import known_ops

    row = {c: _str(d[c], c) for c in BUCKET_COLS[:3]} | {c: _int(d[c], c) for c in BUCKET_COLS[3:]}
    if row["op"] not in known_ops():
        raise ValueError(f"unknown op {row['op']!r}; this shapetune defines {sorted(known_ops())}")
    if not row["lo"] <= row["representative"] <= row["hi"]:
        raise ValueError(f"bucket must have lo <= representative <= hi, got {row['lo']}, "
                         f"{row['representative']}, {row['hi']}")
    return row


def _num(x, what: str, nullable: bool = False):
    if x is None and nullable:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"{what} must be a number, got {x!r}")
    try:
        return float(x)
    except OverflowError:
        raise ValueError(f"{what} is too large for a float ({len(str(x))} digits)") from None


def _lat_from(d, nullable: bool) -> LatencyStats | None:
    if d is None and nullable:
        return None
    if not isinstance(d, dict):
        raise ValueError(f"latency must be an object, got {d!r}")
    rep = d["repeats"]
    if isinstance(rep, bool) or not isinstance(rep, int):
        raise ValueError(f"latency.repeats must be an integer, got {rep!r}")
    lat = LatencyStats(*(_num(d[c], f"latency.{c}") for c in LAT[:-1]), repeats=rep)
    if rep < 1:
        raise ValueError(f"latency.repeats must be >= 1, got {rep}")
    for c in ("median_us", "mean_us", "min_us", "max_us"):
        v = getattr(lat, c)
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"latency.{c} must be a positive finite number of µs, got {v!r}")
    if not math.isfinite(lat.std_us) or lat.std_us < 0:
        raise ValueError(f"latency.std_us must be finite and >= 0, got {lat.std_us!r}")
    if not lat.min_us <= lat.median_us <= lat.max_us:
        raise ValueError(f"latency must have min_us <= median_us <= max_us, got {lat.min_us}, {lat.median_us}, "
                         f"{lat.max_us}")
    return lat


def _int(x, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise ValueError(f"{what} must be an integer, got {x!r}")
    return x


def _check_workload_json(d) -> None:
    """Exact integers for every dim and dynamic range (Workload() would truncate 1.7 to 1), and an op
    this shapetune defines."""
    if not isinstance(d, dict) or not isinstance(d.get("dims"), list):
        raise ValueError("workload must be an object with a 'dims' list")
    for item in d["dims"]:
        if not isinstance(item, list) or len(item) != 2:
            raise ValueError(f"workload dims must be [name, size] pairs, got {item!r}")
        _int(item[1], f"workload dim {item[0]!r}")
    for item in d.get("dynamic", ()):
        if not isinstance(item, list) or len(item) != 3:
            raise ValueError(f"workload dynamic dims must be [name, lo, hi], got {item!r}")
        _int(item[1], f"dynamic {item[0]!r} lower bound")
        _int(item[2], f"dynamic {item[0]!r} upper bound")
    from shapetune.ops import known_ops

    if d.get("op") not in known_ops():
        raise ValueError(f"unknown op {d.get('op')!r}; this shapetune defines {sorted(known_ops())}")


def _str(x, what: str) -> str:
    if not isinstance(x, str):
        raise ValueError(f"{what} must be a string, got {x!r}")
    return x


def from_json_line(line: str | dict) -> MeasureResult | VendorBaseline | dict:
    """Parse one export line, checking types and (if present) that its uid and its sha256
    (`line_sha256`) match its fields. A bucket line gives its row (a dict).

    Raises
    ------
    ValueError, KeyError, TypeError
        The line is not a valid record or baseline.
    """
    d = json.loads(line) if isinstance(line, str) else line
    if not isinstance(d, dict):
        raise ValueError("a line must be a JSON object")
    kind = d.get("type")
    from .schema import SCHEMA_VERSION  # schema.py imports this module's column names

    if "schema_version" in d and d["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"written by schema version {d['schema_version']!r}; this shapetune reads version "
                         f"{SCHEMA_VERSION}")
    if kind == "bucket":
        row = bucket_from_json(d)
        if "sha256" in d and d["sha256"] != line_sha256(bucket_to_json(row)):
            raise ValueError(f"sha256 {d['sha256']!r} does not match the line's fields: edited "
                             f"after export, or written by an incompatible shapetune")
        return row
    _check_workload_json(d["workload"])
    w, t = Workload.from_json(d["workload"]), Target.from_json(d["target"])
    created = _num(d["created"], "created")
    if not math.isfinite(created):
        raise ValueError(f"created must be a finite timestamp, got {created!r}")
    common = dict(workload=w, target=t, run_id=_str(d.get("run_id", ""), "run_id"), created=created)
    if kind == "record":
        cand = d["candidate"]
        if not isinstance(cand, dict) or not isinstance(cand.get("knobs", {}), dict):
            raise ValueError("candidate must be {'template': ..., 'knobs': {...}}")
        obj = MeasureResult(
            candidate=Candidate.from_json(cand), status=_str(d["status"], "status"),
            latency=_lat_from(d.get("latency"), nullable=True), error=_str(d.get("error", ""), "error"),
            max_rel_err=_num(d.get("max_rel_err"), "max_rel_err", nullable=True),
            build_s=_num(d.get("build_s", 0.0), "build_s"), **common)
        e = obj.max_rel_err  # NaN where a failed check found NaN / Inf outputs (scheduler/verify.py)
        if not (e is None or (math.isfinite(e) and e >= 0) or (obj.status != "ok" and (math.isnan(e) or e >= 0))):
            raise ValueError(f"max_rel_err must be >= 0 (finite for an ok record), got {e!r}")
    elif kind == "baseline":
        obj = VendorBaseline(name=_str(d["name"], "name"),
                             latency=_lat_from(d["latency"], nullable=False), **common)
    else:
        raise ValueError(f"unknown line type {kind!r} (expected 'record', 'baseline' or 'bucket')")
    if "uid" in d and d["uid"] != obj.uid:
        raise ValueError(f"uid {d['uid']!r} does not match the line's fields ({obj.uid!r}): "
                         f"edited by hand, or written by an incompatible shapetune")
    if "sha256" in d:
        h = line_sha256(record_to_json(obj) if kind == "record" else baseline_to_json(obj))
        if d["sha256"] != h:
            raise ValueError(f"sha256 {d['sha256']!r} does not match the line's fields: edited "
                             f"after export, or written by an incompatible shapetune")
    return obj


# -- JSONL files -------------------------------------------------------------------------------
def write_jsonl(fp_or_path: str | Path | IO[str], lines: Iterable[dict]) -> int:
    """Write one JSON object per line (a path ending in ``.xz`` xz-compressed); returns how many."""
    lines = list(lines)
    fp, own = open_text(fp_or_path, "w")
    try:
        for line in lines:
            fp.write(json.dumps(line) + "\n")
    finally:
        if own:
            fp.close()
    return len(lines)


def read_jsonl(fp_or_path: str | Path | IO[str],
               check: Callable[[MeasureResult | VendorBaseline], str | None],
               max_line_chars: int = MAX_LINE_CHARS, max_file_chars: int = MAX_FILE_CHARS,
               ) -> list[MeasureResult | VendorBaseline | dict]:
    """Every entry of a JSONL(.xz) export, each line parsed by `from_json_line` and (records and
    baselines) passed to ``check(entry) -> reason or None``; blank lines are skipped. A file whose lines carry no
    sha256 is legacy; one that mixes lines with and without is rejected. A line longer than
    `max_line_chars` or a file longer than `max_file_chars` (decoded text) is rejected before it
    is read whole.

    Raises
    ------
    DBError
        On the first line that is malformed or rejected (named by number, with the reason), or
        an unreadable file.
    """
    fp, own = open_text(fp_or_path, "r")
    name = str(fp_or_path) if own else getattr(fp, "name", "<stream>")
    objs, hashed, n, total = [], None, 0, 0
    try:
        while line := fp.readline(max_line_chars + 1):
            n += 1
            total += len(line)
            if len(line) > max_line_chars and line[-1] != "\n":
                raise DBError(f"{name}: line {n} is longer than {max_line_chars} characters (the "
                              f"limit per line); nothing imported")
            if total > max_file_chars:
                raise DBError(f"{name}: more than {max_file_chars} characters (the limit per "
                              f"file) by line {n}; nothing imported")
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                obj = from_json_line(d)
                why = None if isinstance(obj, dict) else check(obj)
            except RecursionError as e:
                raise DBError(f"{name}: line {n} is malformed (JSON nested too deeply); "
                              f"nothing imported") from e
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise DBError(f"{name}: line {n} is malformed ({type(e).__name__}: {e}); "
                              f"nothing imported") from e
            has = "sha256" in d
            if hashed is not None and has != hashed[0]:
                why = why or (f"{'has a' if has else 'has no'} sha256, line {hashed[1]} "
                              f"{'has none' if has else 'has one'} (a hash removed from an "
                              f"edited line, or files joined: import them one by one)")
            hashed = hashed or (has, n)
            if why:
                raise DBError(f"{name}: line {n} rejected: {why}; nothing imported")
            objs.append(obj)
    except (OSError, EOFError, lzma.LZMAError, UnicodeDecodeError) as e:
        raise DBError(f"{name}: unreadable after line {n} ({type(e).__name__}: {e}); "
                      f"nothing imported") from e
    finally:
        if own:
            fp.close()
    return objs
