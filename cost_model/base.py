"""What every cost model offers: scores for candidates (higher = predicted faster) and a ranking."""

from __future__ import annotations

import numpy as np

from shapetune.records import Candidate, MeasureResult
from shapetune.target import Target
from shapetune.workload import Workload


class CostModel:
    """Interface of the cost models; subclasses implement `fit`, `predict`, `save`, `load`.

    `n_train` is the number of results the last `fit` learned from (0 when untrained);
    `is_trained` says whether `predict` comes from a model rather than a seeded random generator.
    """

    n_train: int = 0

    @property
    def is_trained(self) -> bool:
        return False

    def fit(self, results: list[MeasureResult]) -> CostModel:
        raise NotImplementedError

    def predict(self, workload: Workload, target: Target, candidates: list[Candidate]) -> np.ndarray:
        raise NotImplementedError

    def rank(self, workload: Workload, target: Target, candidates: list[Candidate]) -> list[int]:
        """Indices into `candidates`, predicted fastest first (ties keep input order).

        Parameters
        ----------
        workload, target : Workload, Target
            Where the candidates would run.
        candidates : list of Candidate
            Schedules to order.

        Returns
        -------
        list of int
            A permutation of ``range(len(candidates))``.
        """
        scores = np.asarray(self.predict(workload, target, candidates), dtype=np.float64)
        return np.argsort(-scores, kind="stable").tolist()

    def save(self, path) -> None:
        raise NotImplementedError


def random_scores(rng: np.random.Generator, n: int) -> np.ndarray:
    """Uniform [0, 1) scores: the untrained model's answer, so that the tuner explores."""
    return rng.random(n)
