"""XGBCostModel.fit on records a DB can hold but import would reject (an older version's rows, or
rows written with SQL): zero, negative, NaN, infinite or missing latencies of "ok" results are left
out and counted, never handed to xgboost (which failed "Label contains NaN, infinity")."""

from __future__ import annotations

import sqlite3

from cost_model import XGBCostModel
from shapetune.db.store import TuningDB

from ._synthetic import TRAIN, measure, sample


def test_fit_skips_and_counts_bad_latencies_in_db(tmp_path):
    db = TuningDB(tmp_path / "t.db")
    db.add_results(measure(TRAIN[0], sample(64, 0)))
    db.close()
    con = sqlite3.connect(tmp_path / "t.db")
    ids = [r[0] for r in con.execute("SELECT id FROM records WHERE status='ok' ORDER BY id LIMIT 5")]
    for i, v in zip(ids, [0.0, -3.0, "NaN", 9e999, None]):  # 9e999 is stored as +inf
        con.execute("UPDATE records SET median_us=?, min_us=? WHERE id=?", (v, v, i))
    con.commit()
    con.close()
    results = TuningDB(tmp_path / "t.db").results()
    m = XGBCostModel(seed=0).fit(results)
    assert m.is_trained and m.n_skipped == 5
    assert m.n_train == len(results) - 5
    good = XGBCostModel(seed=0).fit([r for r in results if r.latency is None
                                     or r.latency.median_us not in (0.0, -3.0, None)])
    assert good.n_skipped == 2  # NaN and inf are still in there
