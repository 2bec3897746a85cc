"""cost_model.evaluate: quality@k and its random expectation, holding a workload out with its twins,
and scripts/eval_cost_model.py's evaluate() on those splits."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from shapetune.records import Candidate, LatencyStats, MeasureResult
from shapetune.ops.linear import linear_workload

from ._synthetic import H100, PLAIN, _twins, measure, sample

REPO = Path(__file__).resolve().parents[2]


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
