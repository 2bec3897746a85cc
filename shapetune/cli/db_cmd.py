"""`shapetune db ...`: inspect, explain, export, import, prune, diff and verify the tuning DB."""

from __future__ import annotations

import csv
import datetime
import functools
import json
import math
import sqlite3
import sys
from pathlib import Path

import click

from shapetune import config
from shapetune.db import BUSY_TIMEOUT_S, DBError, TuningDB
from shapetune.db.codec import MAX_FILE_CHARS, MAX_LINE_CHARS
from shapetune.db.schema import TRUST
from shapetune.records import STATUSES, MeasureResult

FORMATS = ("table", "json", "csv")
TRUST_STATES = ("measured", "imported", "reverified", "reverify_failed")


def _db_option(f):
    return click.option("--db", "db_path", type=click.Path(dir_okay=False),
                        default=lambda: str(config.default_db_path()), show_default="$SHAPETUNE_DB "
                        "or <user cache>/shapetune/tuning.db", help="Tuning DB file.")(f)


def _format_option(f):
    return click.option("--format", "fmt", type=click.Choice(FORMATS), default="table",
                        show_default=True, help="Output format.")(f)


def _errors(f):
    """DBError (and unreadable files) -> one-line ClickException, no traceback."""
    @functools.wraps(f)
    def run(*a, **kw):
        try:
            return f(*a, **kw)
        except DBError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            raise click.ClickException(f"{e.filename or ''}: {e.strerror or e}") from None
    return run


def _open(path: str, create: bool = False) -> TuningDB:
    return TuningDB(path, create=create)


# -- output ------------------------------------------------------------------------------------
def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def _json(v) -> str:
    """Strict JSON (NaN/inf -> null), so jq and friends can read it."""
    def fix(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: fix(y) for k, y in x.items()}
        if isinstance(x, list):
            return [fix(y) for y in x]
        return x
    return json.dumps(fix(v), indent=2, allow_nan=False)


def _emit(rows: list[dict], fmt: str, title: str | None = None,
          table_fmt: dict | None = None) -> None:
    """Print rows (dicts sharing keys) as a rich table, a JSON list, or CSV."""
    if fmt == "json":
        click.echo(_json(rows))
    elif fmt == "csv":
        if rows:
            w = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]), lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
    else:
        from rich.table import Table
        from rich.text import Text  # plain text: "[...]" in knobs or errors is not markup

        if not rows:
            click.echo(f"no {title or 'rows'}")
            return
        table_fmt = table_fmt or {}
        t = Table(title=title)
        for k in rows[0]:
            t.add_column(k, justify="right" if isinstance(rows[0][k], (int, float)) else "left")
        for r in rows:
            t.add_row(*(Text(table_fmt.get(k, _cell)(v) if v is not None else "-")
                        for k, v in r.items()))
        _print_table(t)


def _print_table(table) -> None:
    """On a terminal, at its width; piped or redirected (grep, a file), at the table's natural width,
    so every cell is whole and each row one line (a fixed width cut or folded long names)."""
    from rich.console import Console
    from rich.measure import Measurement

    console = Console()
    if not console.is_terminal:
        wide = Console(width=1_000_000)
        console = Console(width=Measurement.get(wide, wide.options, table).maximum)
    console.print(table)


def _candidate(r: MeasureResult) -> str:
    """The record's candidate (`Candidate.__str__`: "@vT.O" where not version 1.1), marked stale where
    this code's version of its template or op definition is another: never served, `db verify`
    re-verifies its knobs as this version."""
    from scheduler.templates import current_version

    now = current_version(r.candidate.template, r.workload.op)
    return str(r.candidate) + ("" if r.candidate.version == now else f" (stale: this code is v{now or '1.1'})")


def _result_row(id_: int, r: MeasureResult, trust: str) -> dict:
    lat = r.latency
    return {"id": id_, "uid": r.uid, "workload": r.workload.name, "template": r.candidate.template, "status": r.status,
            "trust": trust, "median_us": lat.median_us if lat else None, "created": r.created}


# -- commands ----------------------------------------------------------------------------------
@click.group()
def db():
    """Inspect, explain, export, import, prune, diff and verify the tuning DB."""


def _record_filters(f):
    """The record filters `db list` and `db records` share: --op, --target, --status, --template, --trust."""
    for opt in reversed((
            click.option("--op", help="Only this op (e.g. linear)."),
            click.option("--target", "target_key", help="Only this target key."),
            click.option("--status", type=click.Choice(STATUSES), help="Only this status."),
            click.option("--template", help="Only this schedule template."),
            click.option("--trust", "trust_state", type=click.Choice(TRUST_STATES), help="Only this trust state."))):
        f = opt(f)
    return f


@db.command("list")
@_record_filters
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True,
              help="At most this many records.")
@click.option("--all", "all_", is_flag=True, help="Every matching record (no --limit).")
@_db_option
@_format_option
@_errors
def list_(op, target_key, status, template, trust_state, limit, all_, db_path, fmt):
    """Stored measurements, newest first (`db records`: all of them)."""
    _list(op, target_key, status, template, trust_state, None if all_ else limit, db_path, fmt)


@db.command("records")
@_record_filters
@_db_option
@_format_option
@_errors
def records(op, target_key, status, template, trust_state, db_path, fmt):
    """Every stored measurement matching the filters, newest first (`db list --all`)."""
    _list(op, target_key, status, template, trust_state, None, db_path, fmt)


def _list(op, target_key, status, template, trust_state, limit, db_path, fmt):
    with _open(db_path) as d:
        # the trust filter applies after the query, so --limit counts matching records only
        hits = d.iter_results(target_key=target_key, op=op, status=status, template=template,
                              limit=None if trust_state else limit)
        trust = _trust(d, hits)
    rows = [_result_row(i, r, trust[i][0]) for i, r in hits
            if trust_state is None or trust[i][0] == trust_state][:limit]
    _emit(rows, fmt, "records", {"created": _when})


def _trust(d: TuningDB, hits: list) -> dict:
    """`TuningDB.trust` of any number of records (in chunks under SQLite's bound-parameter limit)."""
    out = {}
    for i in range(0, len(hits), 10_000):
        out.update(d.trust([j for j, _ in hits[i:i + 10_000]]))
    return out


@db.command("show")
@click.argument("ref")
@_db_option
@_format_option
@_errors
def show(ref, db_path, fmt):
    """One record in full, by row id, uid, or unique uid prefix (the uid names one record for good; the
    row ids of the last records `prune` deleted go to the next records stored)."""
    with _open(db_path) as d:
        hit = d.find(ref)
        if hit is None:
            raise click.ClickException(f"no record {ref!r} in {d.path}")
        trust, why = d.trust([hit[0]])[hit[0]]
    id_, r = hit
    row = {"id": id_, "uid": r.uid, "workload": r.workload.name, "workload_key": r.workload.key,
           "target": r.target.key, "device": r.target.describe(), "template": r.candidate.template,
           "candidate": _candidate(r), "candidate_key": r.candidate.key, "knobs": r.candidate.knob, "status": r.status,
           "verified": r.verified, "trust": trust, "trust_reason": why,
           "latency": r.latency.to_json() if r.latency else None,
           "max_rel_err": r.max_rel_err, "build_s": r.build_s, "run_id": r.run_id,
           "created": r.created, "error": r.error}
    if fmt == "json":
        click.echo(_json(row))
        return
    flat = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in row.items()}
    if fmt == "csv":
        _emit([flat], fmt)
        return
    from rich.table import Table
    from rich.text import Text

    t = Table(title=f"record {id_}", show_header=False)
    t.add_column("field", style="bold")
    t.add_column("value", overflow="fold")
    for k, v in row.items():
        if k == "knobs":
            v = ", ".join(f"{kk}={vv!r}" for kk, vv in v.items()) or "-"
        elif k == "latency" and v:
            v = ", ".join(f"{kk}={_cell(vv)}" for kk, vv in v.items())
        elif k == "created":
            v = f"{_when(v)} ({v!r})"
        t.add_row(k, Text("-" if v is None or v == "" else str(v)))
    _print_table(t)


@db.command("best")
@click.argument("op_arg", metavar="[OP]", required=False)
@click.option("--op", help="Only this op (same as the OP argument).")
@click.option("--target", "target_key", help="Only this target key.")
@click.option("--shape", help="How a call of OP at this shape resolves on this machine's target (or "
                              "--target): exact hit, bucket hit or fallback, and why. linear: m=..,n=..,k=..; "
                              "other ops take their workload's parameters, e.g. attention "
                              "b=2,sq=4096,skv=77,h=8,d=40; group_norm n=2,hw=4096,c=320,silu=1.")
@click.option("--dtype", default=None, help="With --shape (default: float16 on cuda, float32 on llvm).")
@click.option("--bias/--no-bias", default=True, help="With --shape (linear, conv2d).")
@_db_option
@_format_option
@_errors
def best(op_arg, op, target_key, shape, dtype, bias, db_path, fmt):
    """The fastest verified schedule per workload and target, against the vendor baseline
    (measured here, or imported and re-verified here: `db verify`)."""
    if op_arg and op and op_arg != op:
        raise click.UsageError(f"OP argument {op_arg!r} contradicts --op {op!r}")
    op = op_arg or op
    if shape:
        return _resolve_shape(op, shape, dtype, bias, target_key, db_path, fmt)
    rows = []
    with _open(db_path) as d:
        for r in d.best_all(target_key=target_key, op=op):
            b = d.baseline(r.workload.key, r.target.key)
            bu, mu = (b.latency.median_us if b else None), r.latency.median_us
            rows.append({"workload": r.workload.name, "target": r.target.key,
                         "template": r.candidate.template, "candidate": _candidate(r),
                         "median_us": mu, "baseline": b.name if b else None, "baseline_us": bu,
                         "speedup": bu / mu if bu is not None and mu > 0 else None,
                         "uid": r.uid})
    _emit(rows, fmt, "best schedules", {"speedup": lambda v: f"{v:.2f}x"})


def _shape_factories() -> dict:
    """op -> its workload constructor; --shape's keys are the constructor's parameters."""
    from shapetune.ops.attention import attention_workload
    from shapetune.ops.conv import conv2d_workload
    from shapetune.ops.norm import group_norm_workload, layer_norm_workload

    from shapetune.ops.linear import linear_workload

    from shapetune.ops.geglu import geglu_workload

    return {"linear": linear_workload, "geglu": geglu_workload, "group_norm": group_norm_workload,
            "layer_norm": layer_norm_workload, "conv2d": conv2d_workload, "attention": attention_workload}


def shape_workload(op: str, shape: str, dtype: str, bias: bool):
    """The workload a call of `op` makes at `shape` ("m=..,n=..,k=.." for linear; every op takes its
    constructor's parameters, e.g. attention b=2,sq=4096,skv=77,h=8,d=40; flags as silu=1)."""
    import inspect

    factories = _shape_factories()
    if op not in factories:
        raise click.UsageError(f"--shape needs OP, one of: {', '.join(factories)}")
    f = factories[op]
    params = {n: p for n, p in inspect.signature(f).parameters.items()
              if n != "dtype" and not n.endswith("_range")}
    try:
        given = dict(part.split("=") for part in shape.replace(" ", "").split(","))
    except ValueError:
        raise click.BadParameter(f"expected name=value,... (linear: m=..,n=..,k=..), got {shape!r}") from None
    bad = sorted(set(given) - set(params))
    if bad:
        raise click.BadParameter(f"{op} takes {', '.join(params)}; unknown: {', '.join(bad)}")
    kwargs = {}
    for n, v in given.items():
        kind = params[n].annotation
        try:
            kwargs[n] = (v.lower() in ("1", "true", "yes") if "bool" in str(kind)
                         else float(v) if "float" in str(kind) else int(v))
        except ValueError:
            raise click.BadParameter(f"{n}={v!r} is not a number") from None
    if "bias" in params and "bias" not in kwargs:
        kwargs["bias"] = bias
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in kwargs]
    if missing:
        raise click.BadParameter(f"{op} needs {', '.join(missing)}")
    return f(**kwargs, dtype=dtype)


def _resolve_shape(op, shape, dtype, bias, target_key, db_path, fmt):
    from kernels.registry import Registry

    from shapetune.target import detect

    with _open(db_path) as d:
        target = d.target(target_key) if target_key else detect()
        if target is None:
            raise click.ClickException(f"no target {target_key!r} in {d.path}")
    w = shape_workload(op, shape, dtype or ("float16" if target.is_gpu else "float32"), bias)
    res = Registry(db_path=db_path or None, target=target).resolve(w)
    row = {"workload": w.name, "target": target.key, "answer": res.kind, "cause": res.cause,
           "why": res.reason, "bucket": res.bucket.name if res.bucket else None,
           "candidate": str(res.record.candidate) if res.record else None,
           "tuned_us": res.record.latency.median_us if res.record else None,
           "vendor_us": res.vendor.latency.median_us if res.vendor else None}
    _emit([row], fmt, f"{op} at {shape}")


@db.command("explain")
@click.argument("op")
@click.option("--shape", required=True, help="The call's shape, as for `db best OP --shape` "
                                             "(linear: m=..,n=..,k=..; other ops their workload's parameters).")
@click.option("--target", "target_key", help="Explain for this target key (default: this machine's).")
@click.option("--dtype", default=None, help="Default: float16 on cuda, float32 on llvm.")
@click.option("--bias/--no-bias", default=True, help="linear, conv2d.")
@_db_option
@_format_option
@_errors
def explain(op, shape, target_key, dtype, bias, db_path, fmt):
    """Why a call of OP at this shape runs what it runs: the registry's own resolution (exact or
    bucket hit, or the fallback's cause), the served record's time against the vendor path timed
    in the same run, and the record's provenance (device, versions, run, date, trust)."""
    from kernels.registry import Registry, vendor_us

    from shapetune.target import detect

    with _open(db_path) as d:
        target = d.target(target_key) if target_key else detect()
        if target is None:
            raise click.ClickException(f"no target {target_key!r} in {d.path}")
        w = shape_workload(op, shape, dtype or ("float16" if target.is_gpu else "float32"), bias)
        res = Registry(db_path=db_path, target=target).resolve(w)
        r, v = res.record, res.vendor
        hit = d.find(r.uid) if r else None
        trust = d.trust([hit[0]])[hit[0]][0] if hit else None
    row = {"workload": w.name, "target": target.key, "device": target.describe(), "answer": res.kind,
           "cause": res.cause, "why": res.reason, "tuned_workload": res.bucket.name if res.bucket else None}
    if r:
        row |= {"record": r.uid, "record_id": hit[0] if hit else None, "template": r.candidate.template,
                "candidate": str(r.candidate), "tuned_us": r.latency.median_us,
                "max_rel_err": r.max_rel_err, "trust": trust, "run_id": r.run_id,
                "measured_on": r.target.describe(), "created": r.created}
    if v:
        row |= {"vendor": v.name, "vendor_us": vendor_us(v), "vendor_median_us": v.latency.median_us,
                "vendor_run_id": v.run_id, "vendor_created": v.created}
        if r:
            row["speedup"] = vendor_us(v) / r.latency.median_us
    if fmt != "table":
        return _emit([row], fmt) if fmt == "csv" else click.echo(_json(row))
    _fields(row, f"{op} at {shape}", {"created": _when, "vendor_created": _when,
                                      "speedup": lambda x: f"{x:.2f}x"})


def _fields(row: dict, title: str, fmts: dict | None = None) -> None:
    """One row as a two-column field/value table (on a terminal long values fold; "[...]" is not markup)."""
    from rich.table import Table
    from rich.text import Text

    t = Table(title=title, show_header=False)
    t.add_column("field", style="bold")
    t.add_column("value", overflow="fold")
    for k, v in row.items():
        t.add_row(k, Text("-" if v is None or v == "" else (fmts or {}).get(k, _cell)(v)))
    _print_table(t)


@db.command("buckets")
@click.option("--op", help="Only this op.")
@_db_option
@_format_option
@_errors
def buckets(op, db_path, fmt):
    """The shape buckets: stored ones, and this version's policy, with what is tuned per bucket."""
    from shapetune.buckets import DEFAULT

    with _open(db_path) as d:
        stored = {(r["policy"], r["op"], r["dim"], r["lo"], r["hi"]) for r in d.buckets(op)}
        tuned: dict = {}
        for r in d.best_all(op=op):
            for n, lo, hi in r.workload.dynamic:
                tuned.setdefault((r.workload.op, n, lo, hi), []).append(r.workload.name)
        rows = []
        for b in DEFAULT.rows(op) + [dict(zip(("policy", "op", "dim", "lo", "hi"), k), representative=k[4])
                                     for k in sorted(stored) if k[0] != DEFAULT.name]:
            names = tuned.get((b["op"], b["dim"], b["lo"], b["hi"]), [])
            rows.append({**b, "in_db": (b["policy"], b["op"], b["dim"], b["lo"], b["hi"]) in stored,
                         "tuned_workloads": len(names)})
    _emit(rows, fmt, "shape buckets")


@db.command("stats")
@_db_option
@_format_option
@_errors
def stats(db_path, fmt):
    """Counts per status, op and target; sizes and schema version."""
    with _open(db_path) as d:
        s = d.stats()
    if fmt == "json":
        click.echo(_json(s))
        return
    rows = []
    for k, v in s.items():
        if isinstance(v, dict):
            rows += [{"metric": f"{k}.{kk}", "value": vv} for kk, vv in v.items()]
        else:
            rows.append({"metric": k, "value": v})
    _emit(rows, fmt, "tuning DB", {"value": str})


@db.command("export")
@click.argument("path", type=click.Path(dir_okay=False, writable=True))
@click.option("--op", help="Only this op.")
@click.option("--target", "target_key", help="Only this target key.")
@_db_option
@_errors
def export(path, op, target_key, db_path):
    """Write records and baselines as JSON lines to PATH (.xz: compressed)."""
    with _open(db_path) as d:
        n = d.export_jsonl(path, target_key=target_key, op=op)
    click.echo(f"exported {n} lines to {path}")


@db.command("import")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--max-line-chars", type=click.IntRange(min=1), default=MAX_LINE_CHARS, show_default=True,
              help="A JSONL line longer than this many characters (decoded, newline not counted) "
                   "rejects the file.")
@click.option("--max-file-chars", type=click.IntRange(min=1), default=MAX_FILE_CHARS, show_default=True,
              help="A JSONL file longer than this many characters (decoded: an .xz export's text) "
                   "is rejected.")
@_db_option
@_errors
def import_(paths, max_line_chars, max_file_chars, db_path):
    """Append the records and baselines of JSONL exports, or of other tuning DB files (each file all
    or nothing, in the order given; a DB's bucket rows too): every line's sha256
    and every record's knobs (against its template's space) are checked first. Imported records
    are served only after `shapetune db verify` re-verified them on this machine. The size limits
    guard the reading of a JSONL file (a DB file is read by SQLite). A file that fails stops the
    command; the files before it stay imported (e.g. `shapetune db import tuning_logs/*.jsonl.xz`)."""
    from scheduler.reverify import knob_error

    total = 0
    with _open(db_path, create=True) as d:
        for i, path in enumerate(paths):
            with open(path, "rb") as f:
                is_db = f.read(16) == b"SQLite format 3\x00"
            try:
                if is_db:
                    added, skipped = d.import_db(path, validate=knob_error)
                else:
                    added, skipped = d.import_jsonl(path, validate=knob_error, max_line_chars=max_line_chars,
                                                    max_file_chars=max_file_chars)
            except DBError as e:
                if i == 0:
                    raise
                msg = str(e) if str(path) in str(e) else f"{path}: {e}"
                raise DBError(f"{msg}; the {i} file(s) before it were imported") from None
            total += added
            click.echo(f"imported {added} new, skipped {skipped} already stored, into {d.path}"
                       + (f"  ({path})" if len(paths) > 1 else ""))
    if total:
        click.echo("imported records are served once re-verified on this machine: "
                   f"shapetune db verify --db {d.path}  (shapetune prebuild does it too)")


@db.command("prune")
@click.option("--target", "target_key", help="Records of this target key.")
@click.option("--stale", is_flag=True, help="Records of every target but this machine's "
                                            "(another GPU, or another TVM/CUDA/torch version).")
@click.option("--older-than", "days", type=click.FloatRange(min=0), help="Records created over this many days ago.")
@click.option("--status", type=click.Choice(STATUSES), help="Records with this status.")
@click.option("--trust", "trust_state", type=click.Choice(TRUST_STATES), help="Records in this trust state.")
@click.option("--op", help="Records of this op.")
@click.option("--yes", is_flag=True, help="Delete them (without it: only say what would go).")
@_db_option
@_errors
def prune(target_key, stale, days, status, trust_state, op, yes, db_path):
    """Delete the records matching EVERY filter given (and their re-verification verdicts; an import
    that passed re-verification as a deleted record is pending again); a dry run unless --yes. The one
    command that deletes from the append-only DB: vendor baselines, bucket rows and every record not
    selected stay byte for byte. At least one filter."""
    import time

    if not any((target_key, stale, days is not None, status, trust_state, op)):
        raise click.UsageError("give at least one filter (--target, --stale, --older-than, --status, --trust, --op)")
    here = None
    if stale:
        from shapetune.target import detect

        here = detect().key
    _open(db_path).close()  # schema checked (and migrated); a missing DB is an error
    conds, args = [], []
    for cond, arg, given in (("t.key = ?", target_key, target_key),
                             ("t.key != ?", here, stale),
                             ("x.created < ?", time.time() - (days or 0) * 86400, days is not None),
                             ("x.status = ?", status, status),
                             (f"{TRUST} = ?", trust_state, trust_state),
                             ("w.op = ?", op, op)):
        if given:
            conds.append(cond)
            args.append(arg)
    con = sqlite3.connect(db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")
        try:
            con.execute("CREATE TEMP TABLE pruned AS SELECT x.id FROM records x "
                        "JOIN workloads w ON w.id = x.workload_id JOIN targets t ON t.id = x.target_id "
                        "LEFT JOIN reverifications v ON v.record_id = x.id WHERE " + " AND ".join(conds), args)
            # an import re-verified as a record deleted here is pending again, not reverified with nothing served
            con.execute("CREATE TEMP TABLE unverified AS SELECT v.record_id FROM reverifications v "
                        "JOIN records m ON m.uid = v.measured_uid WHERE m.id IN (SELECT id FROM pruned) "
                        "AND v.record_id NOT IN (SELECT id FROM pruned)")
            n = con.execute("SELECT COUNT(*) FROM pruned").fetchone()[0]
            total = con.execute("SELECT COUNT(*) FROM records").fetchone()[0]
            again = con.execute("SELECT COUNT(*) FROM unverified").fetchone()[0]
            if yes:
                con.execute("DELETE FROM reverifications WHERE record_id IN (SELECT id FROM pruned) "
                            "OR record_id IN (SELECT record_id FROM unverified)")
                con.execute("DELETE FROM records WHERE id IN (SELECT id FROM pruned)")
            con.execute("COMMIT" if yes else "ROLLBACK")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    except sqlite3.Error as e:
        raise DBError(f"tuning DB {db_path}: {e}") from e
    finally:
        con.close()
    pending = (f"; {again} import(s) re-verified as one of them {'are' if yes else 'would be'} pending again "
               f"(shapetune db verify)" if again else "")
    if yes:
        click.echo(f"deleted {n} of {total} records from {db_path}{pending}")
    else:
        click.echo(f"would delete {n} of {total} records from {db_path}{pending} (dry run: add --yes to delete)")


@db.command("diff")
@click.argument("a", type=click.Path(dir_okay=False))
@click.argument("b", type=click.Path(dir_okay=False))
@click.option("--op", help="Only this op.")
@click.option("--target", "target_key", help="Only this target key.")
@_format_option
@_errors
def diff(a, b, op, target_key, fmt):
    """Two tuning DBs side by side: records only in A, only in B, or stored in both with other
    contents (same uid), and per (workload, target) each DB's best served record."""
    sides = []
    for p in (a, b):
        with _open(p) as d:
            recs = {r.uid: r for _, r in d.iter_results(target_key=target_key, op=op)}
            best = {(r.workload.name, r.target.key): r for r in d.best_all(target_key=target_key, op=op)}
        sides.append((recs, best))
    (ra, ba), (rb, bb) = sides
    summary = {"records_a": len(ra), "records_b": len(rb), "only_a": len(ra.keys() - rb.keys()),
               "only_b": len(rb.keys() - ra.keys()),
               "changed": sum(ra[u] != rb[u] for u in ra.keys() & rb.keys())}
    rows = []
    for k in sorted(ba.keys() | bb.keys()):
        x, y = ba.get(k), bb.get(k)
        xu, yu = (x.latency.median_us if x else None), (y.latency.median_us if y else None)
        change = ("only_a" if y is None else "only_b" if x is None else "same" if x.uid == y.uid
                  else "faster_in_b" if yu < xu else "slower_in_b" if yu > xu else "other_record")
        rows.append({"workload": k[0], "target": k[1], "a_us": xu, "b_us": yu,
                     "a_uid": x.uid if x else None, "b_uid": y.uid if y else None, "change": change})
    if fmt == "json":
        click.echo(_json({"records": summary, "best": rows}))
        return
    _emit(rows, fmt, "best per workload and target")
    if fmt == "table":
        click.echo("records: " + ", ".join(f"{k} {v}" for k, v in summary.items()))


def _integrity(db_path: str) -> tuple[list[str], list[str]]:
    """(problems, facts) of a DB: SQLite's integrity check, every row against its stored sha256 and
    the codec's field checks (through a full export), records of other targets (stale here) and
    imports pending re-verification."""
    import io

    from shapetune.db import from_json_line
    from shapetune.target import detect

    problems, facts = [], []
    con = sqlite3.connect(Path(db_path).resolve().as_uri() + "?mode=ro", uri=True)  # escaped
    try:
        bad = [r[0] for r in con.execute("PRAGMA integrity_check")]
    finally:
        con.close()
    if bad != ["ok"]:
        problems += [f"sqlite integrity: {m}" for m in bad[:10]]
    here = detect()
    with _open(db_path) as d:
        facts.append(f"schema version {d.stats()['schema_version']}: ok")
        buf = io.StringIO()
        try:
            n = d.export_jsonl(buf)
        except DBError as e:
            problems.append(str(e))
        else:
            rejected = 0
            for no, line in enumerate(buf.getvalue().splitlines(), 1):
                try:
                    from_json_line(line)
                except (DBError, ValueError) as e:
                    rejected += 1
                    if rejected <= 10:
                        problems.append(f"entry {no}: {e}")
            facts.append(f"{n} records and baselines: sha256 and fields "
                         + ("ok" if not rejected else f"{rejected} rejected"))
        for t in d.targets():
            if t.key != here.key:
                k = len(d.iter_results(target_key=t.key))
                facts.append(f"stale here: {k} records of {t.key} ({'; '.join(here.differences(t))})")
        facts.append(f"pending re-verification here: {len(d.pending(here.key))} imported records")
    return problems, facts


@db.command("verify")
@click.option("--op", help="Only this op.")
@click.option("--jobs", type=click.IntRange(min=1), default=None, help="Parallel builds (default: cores).")
@click.option("--check-only", is_flag=True, help="Only the integrity checks; rebuild nothing.")
@_db_option
@_errors
def verify(op, jobs, check_only, db_path):
    """Check the DB's integrity (SQLite's own check, schema version, every row against its sha256
    and the import checks; stale and pending records counted), then rebuild and re-verify the
    imported records of this machine's target that could be served and, where it has no verified
    record of the current template and op version, its records of an older version (rebuilt as this
    one) and other targets' portable ones (per workload the fastest claim, then the next while they
    fail), as the tuner verifies; one that passes is served with the latency measured here, one that
    fails is marked and never served. One line per workload. Exits non-zero, rebuilding nothing, if
    a check fails."""
    from scheduler.reverify import reverify

    from shapetune.target import detect

    target = detect()
    _open(db_path).close()  # a missing DB is an error here, not a new empty one
    problems, facts = _integrity(db_path)
    for line in facts + problems:
        click.echo(line)
    if problems:
        raise click.ClickException(f"{db_path}: {len(problems)} integrity problem(s); nothing re-verified")
    if check_only:
        return
    verdicts = reverify(db_path, target, op=op, jobs=jobs)
    if not verdicts:
        click.echo(f"nothing to re-verify for {target.describe()} in {db_path}")
    for v in verdicts:
        click.echo(v.line())
