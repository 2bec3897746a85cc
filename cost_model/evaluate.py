"""How well a cost model ranks held-out measured results: top-k recall and per-group Spearman.

A held-out workload leaves with its twins (`twins`): a model trained on a ±bias twin or on the
bucket whose representative is the same shape has seen nearly the same ranking, so leaving only
the workload itself out overstates how well the model ranks an unseen shape.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from shapetune.records import MeasureResult
from shapetune.workload import Workload

from .base import CostModel
from .xgb import group_key


def _groups(results: list[MeasureResult]) -> dict[str, list[MeasureResult]]:
    by = defaultdict(list)
    for r in results:
        by[group_key(r.workload, r.target)].append(r)
    return dict(by)


def twin_key(w: Workload) -> tuple:
    """What a workload shares with its twins: everything but the epilogue and the dynamic ranges
    (op, dims, which for a bucket are its representative shape, dtypes, layout)."""
    return w.op, w.dims, w.dtype, w.acc_dtype, w.layout


def twins(w: Workload, workloads) -> list[Workload]:
    """The distinct workloads among `workloads`, other than `w`, equal to it up to epilogue and
    dynamic ranges: its ±bias/±gelu/±silu/±residual variants, and the bucket (or exact) workloads
    whose representative dims are w's."""
    key = twin_key(w)
    return [x for x in dict.fromkeys(workloads) if x != w and twin_key(x) == key]


def leave_out(results: list[MeasureResult], w: Workload) -> tuple[list[MeasureResult], list[MeasureResult]]:
    """Split `results` into (train, held out): held out are those of `w` and of its `twins`."""
    key = twin_key(w)
    train, held = [], []
    for r in results:
        (held if twin_key(r.workload) == key else train).append(r)
    return train, held


def _rankdata(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties averaged (as scipy.stats.rankdata)."""
    order = np.argsort(a, kind="stable")
    s = a[order]
    ranks = np.empty(len(a))
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def quality_at(latencies_in_rank_order: list[float], k: int) -> float:
    """(true best latency) / (best latency among the first k): 1.0 when measuring the top k finds
    the best candidate."""
    return min(latencies_in_rank_order) / min(latencies_in_rank_order[:k])


def random_quality_at(latencies: list[float], k: int) -> float:
    """`quality_at` expected under a uniformly random order, exactly: the j-th fastest (0-based) is
    the best of k drawn without replacement with probability C(n-1-j, k-1) / C(n, k)."""
    import math

    lat = sorted(latencies)
    n, k = len(lat), min(k, len(lat))
    total = math.comb(n, k)
    return sum(math.comb(n - 1 - j, k - 1) / total * lat[0] / lat[j] for j in range(n - k + 1))


def spearman(a, b) -> float:
    """Spearman rank correlation of two equal-length sequences (NaN if either is constant)."""
    ra, rb = _rankdata(np.asarray(a, float)), _rankdata(np.asarray(b, float))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def topk_recall(model: CostModel, results: list[MeasureResult], k: int, n_best: int = 1) -> float:
    """Mean over groups of the fraction of the true `n_best` fastest found in the model's top `k`.

    Parameters
    ----------
    model : CostModel
        Ranks each group's candidates (all statuses, as the tuner would see them).
    results : list of MeasureResult
        Held-out measured results; groups are (workload, target); groups with fewer than `n_best`
        verified results are skipped.
    k : int
        How many candidates the tuner would measure.
    n_best : int
        How many of the truly fastest count as "the best"; with 1, the share of groups whose
        fastest candidate is in the top k. Random ranking scores about ``k / group_size``.

    Returns
    -------
    float
        In [0, 1]; NaN if no group qualifies.
    """
    hits = []
    for rs in _groups(results).values():
        ok = [i for i, r in enumerate(rs) if r.status == "ok"]
        if len(ok) < n_best:
            continue
        best = set(sorted(ok, key=lambda i: rs[i].latency.median_us)[:n_best])
        top = set(model.rank(rs[0].workload, rs[0].target, [r.candidate for r in rs])[:k])
        hits.append(len(best & top) / n_best)
    return float(np.mean(hits)) if hits else float("nan")


def spearman_per_group(model: CostModel, results: list[MeasureResult]) -> dict[str, float]:
    """Spearman correlation of model scores with measured throughput (1 / median latency), per group.

    Only verified results count (failures have no latency). Keys are ``workload.key|target.key``;
    groups with fewer than 3 verified results are skipped.
    """
    out = {}
    for key, rs in _groups(results).items():
        rs = [r for r in rs if r.status == "ok"]
        if len(rs) < 3:
            continue
        scores = model.predict(rs[0].workload, rs[0].target, [r.candidate for r in rs])
        out[key] = spearman(scores, [-r.latency.median_us for r in rs])
    return out


def mean_spearman(model: CostModel, results: list[MeasureResult]) -> float:
    """Mean of `spearman_per_group` over the groups (NaN groups ignored)."""
    v = [x for x in spearman_per_group(model, results).values() if not np.isnan(x)]
    return float(np.mean(v)) if v else float("nan")
