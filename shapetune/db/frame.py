"""`to_dataframe`: the tuning DB's records as a pandas DataFrame, for analysis in a notebook.

pandas is optional (the ``pandas`` extra); it is imported only when this is called.
"""

from __future__ import annotations

from pathlib import Path

from .store import TuningDB

COLUMNS = ("id", "uid", "op", "workload", "workload_key", "target", "device", "template",
           "candidate_key", "knobs", "status", "verified", "trust", "median_us", "mean_us", "min_us",
           "max_us", "std_us", "repeats", "max_rel_err", "build_s", "run_id", "created", "error")


def to_dataframe(db_or_path: TuningDB | str | Path | None = None, *, op: str | None = None,
                 target_key: str | None = None, status: str | None = None,
                 template: str | None = None):
    """Every stored record matching the filters, one row each, newest first.

    Parameters
    ----------
    db_or_path : TuningDB, path, or None
        An open DB (left open), or a DB file (opened read-only in spirit: a missing file raises
        `DBError`, nothing is created); None: ``config.default_db_path()``.
    op, target_key, status, template : str, optional
        Keep only records matching every filter given (as `TuningDB.results`).

    Returns
    -------
    pandas.DataFrame
        Columns `COLUMNS`: latencies in microseconds (NaN where not measured), ``knobs`` a dict,
        ``trust`` measured | imported | reverified | reverify_failed, ``created`` a UTC
        ``datetime64`` column.

    Raises
    ------
    ImportError
        pandas is not installed (``pip install 'shapetune[pandas]'``).
    """
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("shapetune.db.to_dataframe needs pandas: pip install 'shapetune[pandas]'") from None
    own = not isinstance(db_or_path, TuningDB)
    d = TuningDB(db_or_path, create=False) if own else db_or_path
    try:
        hits = d.iter_results(target_key=target_key, op=op, status=status, template=template)
        trust = {}
        for i in range(0, len(hits), 10_000):  # under SQLite's limit on bound parameters
            trust.update(d.trust([j for j, _ in hits[i:i + 10_000]]))
    finally:
        if own:
            d.close()
    rows = []
    for i, r in hits:
        lat = r.latency
        rows.append({
            "id": i, "uid": r.uid, "op": r.workload.op, "workload": r.workload.name,
            "workload_key": r.workload.key, "target": r.target.key, "device": r.target.describe(),
            "template": r.candidate.template, "candidate_key": r.candidate.key,
            "knobs": r.candidate.knob, "status": r.status, "verified": r.verified,
            "trust": trust[i][0],
            **{c: getattr(lat, c) if lat else None for c in ("median_us", "mean_us", "min_us",
                                                             "max_us", "std_us", "repeats")},
            "max_rel_err": r.max_rel_err, "build_s": r.build_s, "run_id": r.run_id,
            "created": r.created, "error": r.error})
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df["created"] = pd.to_datetime(df["created"], unit="s", utc=True)
    return df
