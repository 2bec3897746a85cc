"""cost_model.features: the generic featurization, GEMM tile features, FeatureSpace columns, and twins
(epilogue, layout, bucket vs exact shape) getting distinct rows."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cost_model import FeatureSpace, featurize, gemm_tile_features
from shapetune.records import Candidate

from ._synthetic import H100, HELD_OUT, PLAIN, TEMPLATE, _twins


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
