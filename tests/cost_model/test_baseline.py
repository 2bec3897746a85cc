"""cost_model.baseline.RandomCostModel and the cost_model.create/load factory."""

from __future__ import annotations

import pytest

import cost_model
from cost_model import RandomCostModel, XGBCostModel

from ._synthetic import H100, HELD_OUT, measure, sample


def test_random_factory(tmp_path):
    m = cost_model.create("random", seed=5)
    assert isinstance(m, RandomCostModel) and not m.is_trained
    cands = [r.candidate for r in measure(HELD_OUT, sample(16, 1))]
    assert m.fit([]).rank(HELD_OUT, H100, cands) == RandomCostModel(seed=5).rank(HELD_OUT, H100, cands)
    m.save(tmp_path / "r.json")
    assert isinstance(cost_model.load(tmp_path / "r.json"), RandomCostModel)
    assert isinstance(cost_model.create(), XGBCostModel)
    with pytest.raises(ValueError):
        cost_model.create("nope")
