"""How well the XGBoost cost model ranks the candidates of a workload it has never seen (CPU only).

    python scripts/eval_cost_model.py tuning_logs/sm90_h200_sd15_*.jsonl.xz --json cost_model_eval.json

For each workload with at least `--min-ok` verified records, the model is trained without it and
without its twins (cost_model.evaluate.twins: the workloads equal to it but for the epilogue or the
dynamic ranges, e.g. its +bias variant, or the bucket whose representative is its shape), and ranks
that workload's verified candidates:
  in-family  trained on every other workload of the same op, twins excluded (the usual tuning
             situation: the DB already holds that op's other shapes);
  transfer   trained on the other ops only (a new op family, or a model shipped from elsewhere);
  random     the expectation under a uniformly random order (exact, by counting).
Metric quality@k = (true best latency) / (best latency among the model's top k): 1.0 means the
tuner would have found the best kernel measuring only k candidates. Also per-workload Spearman
between scores and throughput. The candidates in a DB were themselves picked by an earlier model
plus random exploration, so this measures ranking among plausible candidates, not over the space.

JSON (--json): {"date", "inputs" (the exports), "min_ok", "summary", "rows"}.
  rows: one per held-out workload: "op", "workload" (Workload.name), "key" (Workload.key), "target"
    (target key), "n_ok" (verified candidates ranked), "twins" (how many other workloads were held
    out with it), "random@k", "in_family@k", "transfer@k" (quality@k, k in 1, 4, 8; a mode's keys
    are absent when its model could not train), "in_family_spearman", "transfer_spearman".
  summary: per op and "all": "workloads" (rows) and the mean of each row metric over the rows
    that have it (null when none).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cost_model.evaluate import leave_out, quality_at, random_quality_at, spearman, twins  # noqa: E402
from cost_model.xgb import XGBCostModel  # noqa: E402
from shapetune.db import TuningDB  # noqa: E402

KS = (1, 4, 8)


def evaluate(results, min_ok: int, seed: int = 0) -> list[dict]:
    by_w = defaultdict(list)
    for r in results:
        by_w[(r.workload, r.target.key)].append(r)
    rows = []
    for (w, tkey), rs in sorted(by_w.items(), key=lambda kv: (kv[0][0].op, kv[0][0].name)):
        ok = [r for r in rs if r.status == "ok"]
        if len(ok) < min_ok:
            continue
        lat = [r.latency.median_us for r in ok]
        row = {"op": w.op, "workload": w.name, "key": w.key, "target": tkey, "n_ok": len(ok),
               "twins": len(twins(w, (r.workload for r in results))),
               **{f"random@{k}": random_quality_at(lat, k) for k in KS}}
        kept, _ = leave_out(results, w)
        for mode in ("in_family", "transfer"):
            train = [r for r in kept if (r.workload.op == w.op) == (mode == "in_family")]
            model = XGBCostModel(seed=seed).fit(train)
            if not model.is_trained:
                continue
            scores = model.predict(w, ok[0].target, [r.candidate for r in ok])
            order = sorted(range(len(ok)), key=lambda i: -scores[i])
            ranked = [lat[i] for i in order]
            row.update({f"{mode}@{k}": quality_at(ranked, k) for k in KS})
            row[f"{mode}_spearman"] = spearman(scores, [-x for x in lat])
        rows.append(row)
    return rows


def summarize(rows: list[dict]) -> dict:
    out = {}
    for op in sorted({r["op"] for r in rows}) + ["all"]:
        sel = [r for r in rows if op in ("all", r["op"])]
        s = {"workloads": len(sel)}
        for key in [f"{m}@{k}" for m in ("in_family", "transfer", "random") for k in KS] + \
                   ["in_family_spearman", "transfer_spearman"]:
            v = [r[key] for r in sel if key in r and not math.isnan(r[key])]
            s[key] = sum(v) / len(v) if v else None
        out[op] = s
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("exports", nargs="+", help="tuning DBs or JSONL(.xz) exports")
    ap.add_argument("--min-ok", type=int, default=8)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="shapetune-eval-"))
    with TuningDB(tmp / "all.db") as db:
        for p in a.exports:
            db.merge_from(p)
        results = db.results()
    t0 = time.time()
    rows = evaluate(results, a.min_ok)
    summary = summarize(rows)
    cols = [f"{m}@{k}" for m in ("in_family", "transfer", "random") for k in KS] + ["in_family_spearman"]
    print(f"{len(results)} records, {len(rows)} held-out workloads, {time.time() - t0:.0f} s\n")
    print(f"{'op':12s} {'n':>3s} " + " ".join(f"{c:>12s}" for c in cols))
    for op, s in summary.items():
        print(f"{op:12s} {s['workloads']:3d} " + " ".join(
            f"{s[c]:12.3f}" if s[c] is not None else f"{'n/a':>12s}" for c in cols))
    if a.json:
        Path(a.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "inputs": a.exports,
                                            "min_ok": a.min_ok, "summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
