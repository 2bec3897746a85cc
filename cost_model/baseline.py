"""RandomCostModel: scores are seeded uniform noise; the baseline of tuning curves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .base import CostModel, random_scores


class RandomCostModel(CostModel):
    """Never learns; `predict` draws uniform scores from a seeded generator.

    Parameters
    ----------
    seed : int
        Seed of the numpy Generator; the same seed gives the same sequence of rankings.
    """

    kind = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.n_train = 0
        self._rng = np.random.default_rng(seed)

    def fit(self, results) -> RandomCostModel:
        """Record how many results were offered; learn nothing."""
        self.n_train = len(results)
        return self

    def predict(self, workload, target, candidates) -> np.ndarray:
        return random_scores(self._rng, len(candidates))

    def save(self, path) -> None:
        """Write ``{"kind": "random", "seed": ..., "n_train": ...}`` as JSON to `path`."""
        Path(path).write_text(json.dumps({"kind": self.kind, "seed": self.seed, "n_train": self.n_train}))

    @classmethod
    def load(cls, path) -> RandomCostModel:
        d = json.loads(Path(path).read_text())
        m = cls(seed=d["seed"])
        m.n_train = d["n_train"]
        return m
