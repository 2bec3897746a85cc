"""cost_model.xgb.XGBCostModel on synthetic GEMM measurements (see _synthetic.py): untrained ranking,
ranking an unseen workload better than random, failed candidates scoring low, save/load, fit time."""

from __future__ import annotations

import time

import numpy as np
import pytest

import cost_model
from cost_model import RandomCostModel, XGBCostModel, mean_spearman, spearman, topk_recall
from shapetune.records import Candidate
from shapetune.ops.linear import linear_workload

from ._synthetic import H100, HELD_OUT, SPACE, TEMPLATE, TRAIN, measure, sample


@pytest.fixture(scope="module")
def train_results():
    return [r for i, w in enumerate(TRAIN) for r in measure(w, sample(256, i), seed=i)]


@pytest.fixture(scope="module")
def trained(train_results):
    return XGBCostModel(seed=0).fit(train_results)


def test_untrained_ranks_randomly_but_deterministically(train_results):
    cands = [r.candidate for r in measure(HELD_OUT, sample(64, 9))]
    a, b = XGBCostModel(seed=3), XGBCostModel(seed=3)
    ra = a.rank(HELD_OUT, H100, cands)
    assert sorted(ra) == list(range(64)) and ra == b.rank(HELD_OUT, H100, cands)
    assert ra != XGBCostModel(seed=4).rank(HELD_OUT, H100, cands)
    small = XGBCostModel(seed=3).fit(train_results[:10])  # below min_ok: stays untrained
    assert not small.is_trained and small.n_train == 0
    assert small.rank(HELD_OUT, H100, cands) == ra
    singles = [measure(linear_workload(64 * (i + 1), 320, 320), [SPACE[0]])[0] for i in range(20)]
    assert not XGBCostModel().fit(singles).is_trained  # 20 ok results, but no group to rank within
    assert small.rank(HELD_OUT, H100, []) == []


def test_ranks_unseen_workload_better_than_random(trained):
    assert trained.is_trained and trained.n_train == 3 * 256
    held = [measure(HELD_OUT, sample(64, 100 + i), seed=100 + i) for i in range(20)]
    rnd = RandomCostModel(seed=0)
    recall = np.mean([topk_recall(trained, rs, k=8, n_best=3) for rs in held])
    recall_rnd = np.mean([topk_recall(rnd, rs, k=8, n_best=3) for rs in held])
    rho = np.mean([mean_spearman(trained, rs) for rs in held])
    print(f"\nunseen {HELD_OUT.name}: best-3 in top-8 {recall:.3f} (random {recall_rnd:.3f}); "
          f"spearman {rho:.3f}; top-1 in top-8 {np.mean([topk_recall(trained, rs, 8) for rs in held]):.3f}")
    assert recall > 2.5 * max(recall_rnd, 8 / 64)
    assert rho > 0.5


def test_failed_candidates_score_low(trained):
    rs = measure(HELD_OUT, SPACE)
    s = trained.predict(HELD_OUT, H100, [r.candidate for r in rs])
    ok = np.array([r.status == "ok" for r in rs])
    assert (~ok).sum() > 10
    # Most failures in the bottom half, and on average far below the working candidates.
    assert np.mean(s[~ok] < np.median(s)) > 0.8
    assert spearman(s, ok) > 0.3


def test_save_load_round_trip(trained, tmp_path):
    cands = [Candidate(TEMPLATE, tuple(kn.items())) for kn in SPACE]
    trained.save(tmp_path / "m.json")
    back = cost_model.load(tmp_path / "m.json")
    assert isinstance(back, XGBCostModel) and back.n_train == trained.n_train
    assert back.space.columns == trained.space.columns
    np.testing.assert_array_equal(back.predict(HELD_OUT, H100, cands), trained.predict(HELD_OUT, H100, cands))
    XGBCostModel(seed=1).save(tmp_path / "u.json")  # untrained models round-trip too
    assert not XGBCostModel.load(tmp_path / "u.json").is_trained


def test_fit_few_thousand_rows_is_fast():
    ws = [linear_workload(m, n, k) for m, n, k in
          [(8192, 320, 320), (2048, 1280, 1280), (154, 768, 3072), (4096, 640, 640), (1024, 2560, 640),
           (77, 768, 768), (16384, 320, 1280), (512, 1280, 5120)]]
    results = [r for i, w in enumerate(ws) for r in measure(w, SPACE, seed=i)]
    assert len(results) >= 3000
    t0 = time.perf_counter()
    m = XGBCostModel().fit(results)
    dt = time.perf_counter() - t0
    print(f"\nfit on {len(results)} rows: {dt:.2f} s")
    assert m.is_trained and m.n_train == len(results) and dt < 5.0
