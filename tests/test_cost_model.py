"""Cost model on synthetic GEMM measurements: an analytical latency model with noise, no mocks."""

from __future__ import annotations

import importlib.util
import itertools
import math
import time
from pathlib import Path

import numpy as np
import pytest

import cost_model
from cost_model import (FeatureSpace, RandomCostModel, XGBCostModel, featurize, gemm_tile_features,
                        mean_spearman, register_feature_fn, spearman, topk_recall)
from shapetune.records import Candidate, LatencyStats, MeasureResult
from shapetune.target import Target
from shapetune.ops.linear import linear_workload

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "test_gemm_tiled"
H100 = Target("cuda", "sm_90", "NVIDIA H100 80GB HBM3", 132, "0.27.0", "13.0", "2.11.0")
SPACE = [dict(bm=bm, bn=bn, bk=bk, unroll=u, vec=v)
         for bm, bn, bk, u, v in itertools.product((16, 32, 64, 128, 256), (16, 32, 64, 128, 256),
                                                   (16, 32, 64), (False, True), (1, 4, 8))]
TRAIN = [linear_workload(8192, 320, 320), linear_workload(2048, 1280, 1280), linear_workload(154, 768, 3072)]
HELD_OUT = linear_workload(4096, 640, 1920)


def _tile_features(w, t, kn):
    d = w.dim
    return gemm_tile_features(d["m"], d["n"], d["k"], kn["bm"], kn["bn"], kn["bk"], t.num_cores,
                              cost_model.dtype_bytes(w.dtype))


register_feature_fn(TEMPLATE, _tile_features)


def simulate(w, t, kn, rng) -> MeasureResult:
    """Measure one candidate on a made-up H100: padding, wave quantization, per-step overhead."""
    m, n, k = w.dim["m"], w.dim["n"], w.dim["k"]
    bm, bn, bk, unroll, vec = kn["bm"], kn["bn"], kn["bk"], kn["unroll"], kn["vec"]
    c = Candidate(TEMPLATE, tuple(kn.items()))
    if 3 * (bm + bn) * bk * 2 > 160 * 1024:
        return MeasureResult(w, t, c, "build_error", error="shared memory exceeds 160 KB")
    if bm * bn > 128 * 256:
        return MeasureResult(w, t, c, "runtime_error", error="too many resources requested for launch")
    if vec == 8 and bk == 16 and unroll:
        return MeasureResult(w, t, c, "wrong_result", max_rel_err=0.3)
    eff = {1: 0.5, 4: 0.85, 8: 1.0}[vec] * (0.7 if bm * bn < 64 * 64 else 1.0)
    eff *= (1.15 if bk >= 32 else 0.95) if unroll else 1.0
    step = max(2.0 * bm * bn * bk / (1e6 * eff), (bm + bn) * bk * 2 / 80e3) + (0.025 if unroll else 0.05)
    tile_us = math.ceil(k / bk) * step + bm * bn * 2 / 80e3
    waves = math.ceil(math.ceil(m / bm) * math.ceil(n / bn) / t.num_cores)
    lat = (waves * tile_us + 4.0) * float(np.exp(rng.normal(0.0, 0.03)))
    return MeasureResult(w, t, c, "ok", latency=LatencyStats.of([lat]))


def measure(w, knobs_list, seed=0):
    rng = np.random.default_rng(seed)
    return [simulate(w, H100, kn, rng) for kn in knobs_list]


def sample(n, seed):
    rng = np.random.default_rng(seed)
    return [SPACE[i] for i in rng.choice(len(SPACE), size=n, replace=False)]


@pytest.fixture(scope="module")
def train_results():
    return [r for i, w in enumerate(TRAIN) for r in measure(w, sample(256, i), seed=i)]


@pytest.fixture(scope="module")
def trained(train_results):
    return XGBCostModel(seed=0).fit(train_results)


# -- features ---------------------------------------------------------------------------------
def test_featurize_generic_part():
    c = Candidate(TEMPLATE, (("bm", 64), ("bn", 128), ("bk", 32), ("unroll", True), ("vec", 4),
                             ("layout", "nt")))
    f = featurize(HELD_OUT, H100, c)
    assert f["dim:m"] == 12 and f["dim:k"] == math.log2(1920)
    assert f["dtype_bytes"] == 2 and f["num_cores"] == 132
    assert f["log2_flops"] == pytest.approx(math.log2(2 * 4096 * 640 * 1920))
    assert f["knob:bm"] == math.log2(65) and f["knob:unroll"] == 1.0 and f["knob:layout=nt"] == 1.0
    assert f[f"template={TEMPLATE}"] == 1.0
    assert f["x:waves"] == pytest.approx(64 * 5 / 132)  # registered analytical features


def test_gemm_tile_features():
    g = gemm_tile_features(100, 256, 64, 64, 128, 32, num_units=4, elem_bytes=2)
    assert g["pad_waste_m"] == pytest.approx(1 - 100 / 128) and g["pad_waste_n"] == 0
    assert g["tiles"] == 4 and g["waves"] == 1.0 and g["wave_eff"] == 1.0
    g = gemm_tile_features(100, 256, 64, 64, 128, 32, num_units=3, elem_bytes=2)
    assert g["wave_eff"] == pytest.approx(4 / 6)
    assert g["tile_ai"] == pytest.approx(2 * 64 * 128 / (192 * 2))
    assert g["smem_bytes"] == (64 + 128) * 32 * 2


def test_feature_space_stable_columns_and_nan():
    fs = FeatureSpace().fit([{"b": 1.0, "a": 2.0}, {"c": 3.0}])
    assert fs.columns == ["a", "b", "c"]
    x = FeatureSpace(fs.columns).transform([{"c": 5.0, "zzz": 9.0}])
    assert x.dtype == np.float32 and np.isnan(x[0, :2]).all() and x[0, 2] == 5.0


# -- untrained / random ---------------------------------------------------------------------------
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


# -- trained --------------------------------------------------------------------------------------
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


def test_quality_at_and_its_random_expectation():
    """quality@k of a ranking, and its exact expectation under random order, against brute force."""
    import itertools
    import math

    from cost_model.evaluate import quality_at, random_quality_at

    lat = [3.0, 1.0, 2.0, 5.0, 4.0]
    assert quality_at([1.0, 2.0, 3.0], 1) == 1.0 and quality_at([2.0, 1.0, 4.0], 1) == 0.5
    for k in (1, 2, 3, 5, 9):
        brute = [quality_at(list(p), k) for p in itertools.permutations(lat)]
        assert math.isclose(random_quality_at(lat, k), sum(brute) / len(brute), rel_tol=1e-12)


# -- twins: workloads that differ only in epilogue, layout or dynamic ranges (issue 8 item 9) -------
PLAIN = Candidate("test_untiled", (("vec", 4),))  # a template without analytical features (any op)


def _twins():
    from shapetune.ops.conv import conv2d_workload

    lin = [linear_workload(256, 320, 320), linear_workload(256, 320, 320, bias=False),
           linear_workload(256, 320, 320, epilogue=("bias", "gelu")),
           linear_workload(256, 320, 320, epilogue=("bias", "residual")),
           linear_workload(256, 320, 320, m_range=(129, 256)),  # the bucket whose representative is m=256
           linear_workload(256, 320, 320, m_range=(1, 256))]
    conv = [conv2d_workload(2, 32, 32, 64, 64, stride=s, padding=p, residual=r)
            for s, p, r in ((1, 1, False), (2, 1, False), (1, 0, False), (1, 1, True))]
    return lin, conv


def test_twins_get_different_feature_vectors():
    """±bias/±gelu/±residual, bucket vs exact shape, conv stride/padding: distinct rows; one key set per op."""
    c = Candidate(TEMPLATE, (("bm", 64), ("bn", 128), ("bk", 32), ("unroll", True), ("vec", 4)))
    for group, cand in zip(_twins(), (c, PLAIN)):
        feats = [featurize(w, H100, cand) for w in group]
        assert len({tuple(sorted(f)) for f in feats}) == 1  # fixed length: the same columns for every workload
        x = FeatureSpace().fit_transform(feats)
        assert not np.isnan(x).any() and len({row.tobytes() for row in x}) == len(group)
    lin, conv = _twins()
    f = featurize(lin[4], H100, c)
    assert f["bucket"] == 1.0 and f["range_lo:m"] == math.log2(129) and f["range_hi:m"] == 8.0
    assert featurize(lin[0], H100, c)["range_lo:m"] == 8.0 and featurize(lin[0], H100, c)["bucket"] == 0.0
    assert featurize(lin[2], H100, c)["epi:gelu"] == 1.0 and featurize(lin[0], H100, c)["epi:gelu"] == 0.0
    assert featurize(conv[1], H100, PLAIN)["layout:s"] == 2.0 and featurize(conv[2], H100, PLAIN)["layout:p"] == 0.0


def test_held_out_with_its_twins():
    """Holding a workload out also holds out its epilogue twins and its bucket/exact twins, nothing else."""
    from cost_model.evaluate import leave_out, twins

    lin, conv = _twins()
    others = [linear_workload(512, 320, 320), linear_workload(256, 640, 320)]
    results = [r for i, w in enumerate(lin + others) for r in measure(w, sample(24, i), seed=i)]
    results += [MeasureResult(w, H100, Candidate(PLAIN.template, (("vec", v),)), "ok",
                              latency=LatencyStats.of([float(v + i)])) for i, w in enumerate(conv) for v in range(1, 9)]
    train, held = leave_out(results, lin[0])
    assert {r.workload for r in held} == set(lin)
    assert {r.workload for r in train} == set(conv + others)
    assert set(twins(conv[0], [r.workload for r in results])) == {conv[3]}  # residual twin; s/p differ

    spec = importlib.util.spec_from_file_location("eval_cost_model", REPO / "scripts" / "eval_cost_model.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = {r["workload"]: r for r in script.evaluate([r for r in results if r.workload in lin + others], 8)}
    assert rows[lin[0].name]["twins"] == len(lin) - 1 and rows[others[0].name]["twins"] == 0
    assert "in_family@1" in rows[lin[0].name]
