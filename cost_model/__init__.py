"""Learned cost models that rank schedule candidates so that only promising ones get measured.

>>> model = create("xgb").fit(results)            # retrain as records arrive
>>> order = model.rank(workload, target, candidates)
"""

from .base import CostModel
from .baseline import RandomCostModel
from .evaluate import mean_spearman, spearman, spearman_per_group, topk_recall
from .features import (FeatureSpace, dtype_bytes, featurize, gemm_tile_features,
                       register_feature_fn, unregister_feature_fn)
from .xgb import XGBCostModel

KINDS = {"xgb": XGBCostModel, "random": RandomCostModel}


def create(kind: str = "xgb", **kwargs) -> CostModel:
    """A new, untrained cost model.

    Parameters
    ----------
    kind : {"xgb", "random"}
        "xgb": `XGBCostModel`; "random": `RandomCostModel`, the baseline of tuning curves.
    **kwargs
        Passed to the model's constructor (e.g. ``seed=1``).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown cost model kind {kind!r}; expected one of {sorted(KINDS)}")
    return KINDS[kind](**kwargs)


def load(path) -> CostModel:
    """Load a model saved by either kind's `save`."""
    import json
    from pathlib import Path

    kind = json.loads(Path(path).read_text()).get("kind")
    return KINDS[kind].load(path)


__all__ = [
    "CostModel", "FeatureSpace", "KINDS", "RandomCostModel", "XGBCostModel", "create", "dtype_bytes",
    "featurize", "gemm_tile_features", "load", "mean_spearman", "register_feature_fn", "spearman",
    "spearman_per_group", "topk_recall", "unregister_feature_fn",
]
