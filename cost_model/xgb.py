"""XGBCostModel: gradient-boosted trees that rank candidates within a (workload, target) group.

Objective
---------
The tuner only ever compares candidates of the same workload on the same target, and only their
order decides what gets measured, so the model learns a ranking, not latencies: one query group per
``workload.key + target.key`` and ``rank:pairwise`` (LambdaRank gradients without metric
weighting), pairs sampled uniformly over each group (``lambdarank_pair_method="mean"``, 8 per row).
The label is a relevance grade from the throughput relative to the group's best,
``rel = best_latency / latency`` in (0, 1], mapped to ``1 + round((GRADES - 1) * rel**2)``; failed
candidates (build_error, wrong_result, runtime_error, timeout) get grade 0, below every working one.
Pairwise losses only see the order of labels, so the grades act as a noise floor: candidates within
a few percent of each other form no pair and the model is not asked to learn measurement noise.
Why this and not the alternatives:

* regression on latency spends capacity on absolute scale across shapes (microseconds for 77-token
  GEMMs, milliseconds for 8k-token ones) that ranking never needs, and cannot place failures;
* ``rank:ndcg`` weighs the top of each group more, which sounds right for a measurement budget, but
  on held-out shapes it generalized worse: leave-one-workload-out over 7 synthetic GEMM shapes
  (tests/cost_model/_synthetic.py's latency model), pairwise reached best-3-in-top-8 recall 0.98 and
  Spearman 0.97 against 0.93 / 0.67 for ndcg (0.89 / 0.66 with top-k pairs; with the default
  min_child_weight its tiny hessians grew no trees at all). Pairwise also learns the bottom of the
  order as well as the top, which is where failures belong.

Below `min_ok` verified results, or without a group holding two of them, there is nothing to rank
from; the model stays untrained and `predict` returns seeded uniform noise so the tuner explores.
`fit` always retrains from scratch on all the results it is given (a few thousand rows: well under
a second). An "ok" result without a finite, positive median latency (a row an older version wrote,
or one written with SQL: import rejects them, a DB may still hold them) cannot be graded; `fit`
leaves it out and counts it in `n_skipped` instead of handing xgboost a NaN or infinite label.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import xgboost as xgb

from shapetune.records import Candidate, MeasureResult
from shapetune.target import Target
from shapetune.workload import Workload

from .base import CostModel, random_scores
from .features import FeatureSpace, featurize

FORMAT = "shapetune.cost_model.xgb/1"
GRADES = 16  # ok results get grades 1..GRADES, failures 0

DEFAULT_PARAMS = {
    "objective": "rank:pairwise",
    "lambdarank_pair_method": "mean",
    "lambdarank_num_pair_per_sample": 8,
    "max_depth": 6,
    "eta": 0.2,
    "min_child_weight": 1.0,
    "subsample": 1.0,
    "tree_method": "hist",
    # One thread: on a small shared machine OpenMP spin-waiting made nthread=2 many times slower.
    "nthread": 1,
}


def group_key(workload: Workload, target: Target) -> str:
    """The query group of a result: one workload on one target."""
    return f"{workload.key}|{target.key}"


def relevance(results: list[MeasureResult]) -> np.ndarray:
    """Integer grades of one group's results: 0 for failures, 1..GRADES by throughput vs. the best."""
    lat = np.array([r.latency.median_us if r.status == "ok" else np.nan for r in results])
    ok = ~np.isnan(lat)
    g = np.zeros(len(results))
    if ok.any():
        rel = np.nanmin(lat) / lat[ok]
        g[ok] = 1 + np.rint((GRADES - 1) * rel**2)
    return g


def gradable(r: MeasureResult) -> bool:
    """Whether `relevance` can grade `r`: a failure, or "ok" with a finite, positive median latency."""
    if r.status != "ok":
        return True
    med = r.latency.median_us if r.latency is not None else None
    return isinstance(med, (int, float)) and math.isfinite(med) and med > 0


class XGBCostModel(CostModel):
    """Learned ranking cost model on gradient-boosted trees.

    Parameters
    ----------
    num_rounds : int
        Boosting rounds per `fit`.
    min_ok : int
        Fewest verified ("ok") results to train on; below it the model stays untrained.
    seed : int
        Seeds both xgboost and the generator of the untrained model's random scores.
    **params
        Overrides of `DEFAULT_PARAMS` (xgboost booster parameters).
    """

    kind = "xgb"

    def __init__(self, num_rounds: int = 150, min_ok: int = 16, seed: int = 0, **params):
        self.num_rounds = num_rounds
        self.min_ok = min_ok
        self.seed = seed
        self.params = {**DEFAULT_PARAMS, **params, "seed": seed}
        self.space = FeatureSpace()
        self.booster: xgb.Booster | None = None
        self.n_train = 0
        self.n_skipped = 0
        self._rng = np.random.default_rng(seed)

    @property
    def is_trained(self) -> bool:
        return self.booster is not None

    # -- training ------------------------------------------------------------------------------
    def _groups(self, results: list[MeasureResult]) -> list[list[MeasureResult]]:
        by = defaultdict(list)
        for r in results:
            by[group_key(r.workload, r.target)].append(r)
        # A group teaches order only if it holds a verified result and something to compare it to.
        return [by[k] for k in sorted(by) if len(by[k]) >= 2 and any(r.status == "ok" for r in by[k])]

    def fit(self, results: list[MeasureResult]) -> XGBCostModel:
        """Retrain from scratch on `results` (all statuses; failures rank below every ok result).

        Parameters
        ----------
        results : list of MeasureResult
            Every result known so far, of any workloads and targets.

        Returns
        -------
        XGBCostModel
            self; untrained if there were fewer than `min_ok` verified results or no group with
            two of them. `n_skipped` counts the "ok" results without a usable latency, left out.
        """
        usable = [r for r in results if gradable(r)]
        self.n_skipped = len(results) - len(usable)
        groups = self._groups(usable)
        n_ok = sum(r.status == "ok" for g in groups for r in g)
        if n_ok < self.min_ok or not any(sum(r.status == "ok" for r in g) >= 2 for g in groups):
            self.booster, self.space, self.n_train = None, FeatureSpace(), 0
            return self
        rows = [r for g in groups for r in g]  # sorted by group, as xgboost needs
        x = self.space.fit_transform(featurize(r.workload, r.target, r.candidate) for r in rows)
        y = np.concatenate([relevance(g) for g in groups])
        qid = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
        dtrain = xgb.DMatrix(x, label=y, qid=qid, missing=np.nan)
        self.booster = xgb.train(self.params, dtrain, num_boost_round=self.num_rounds)
        self.n_train = len(rows)
        return self

    # -- inference -----------------------------------------------------------------------------
    def predict(self, workload: Workload, target: Target, candidates: list[Candidate]) -> np.ndarray:
        """Scores of `candidates` on `workload`/`target`; higher = predicted faster.

        Only the order within one call is meaningful. Untrained: uniform [0, 1) noise from the
        model's seeded generator (each call draws afresh).

        Returns
        -------
        np.ndarray
            float64, shape ``(len(candidates),)``.
        """
        if not candidates:
            return np.zeros(0)
        if self.booster is None:
            return random_scores(self._rng, len(candidates))
        x = self.space.transform(featurize(workload, target, c) for c in candidates)
        return self.booster.predict(xgb.DMatrix(x, missing=np.nan)).astype(np.float64)

    # -- persistence ---------------------------------------------------------------------------
    def to_json(self) -> dict:
        booster = None
        if self.booster is not None:
            booster = json.loads(bytes(self.booster.save_raw(raw_format="json")))
        return {
            "format": FORMAT,
            "kind": self.kind,
            "num_rounds": self.num_rounds,
            "min_ok": self.min_ok,
            "seed": self.seed,
            "params": self.params,
            "n_train": self.n_train,
            "columns": self.space.columns,
            "booster": booster,
        }

    @classmethod
    def from_json(cls, d: dict) -> XGBCostModel:
        if d.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} model: format={d.get('format')!r}")
        params = {k: v for k, v in d["params"].items() if k != "seed"}
        m = cls(num_rounds=d["num_rounds"], min_ok=d["min_ok"], seed=d["seed"], **params)
        m.space = FeatureSpace(d["columns"])
        m.n_train = d["n_train"]
        if d["booster"] is not None:
            m.booster = xgb.Booster(params={"nthread": m.params["nthread"]})
            m.booster.load_model(bytearray(json.dumps(d["booster"]).encode()))
        return m

    def save(self, path) -> None:
        """Write the model (booster, feature columns, settings, n_train) as one JSON file."""
        Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path) -> XGBCostModel:
        """Read a model written by `save`."""
        return cls.from_json(json.loads(Path(path).read_text()))
