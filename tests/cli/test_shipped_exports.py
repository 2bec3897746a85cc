"""Every export shipped under tuning_logs/ imports into a fresh DB with the checks `shapetune db import`
applies (scheduler.reverify.knob_error), so a user can always load what the project ships. Its failed
records count too: an earlier tuner's build_error of a template that no longer applies there is history,
never built or served, and must not reject the file (sm90_h200_sd15_norms_buckets did, 2026-12-03)."""

from __future__ import annotations

from pathlib import Path

import pytest

from scheduler.reverify import knob_error
from shapetune.db import TuningDB
from shapetune.records import Candidate, LatencyStats, MeasureResult
from shapetune.target import Target
from shapetune.workload import Workload

LOGS = Path(__file__).resolve().parents[2] / "tuning_logs"
EXPORTS = sorted(LOGS.glob("*.jsonl.xz"))


@pytest.mark.parametrize("path", EXPORTS, ids=[p.name for p in EXPORTS])
def test_a_shipped_export_imports(path, tmp_path):
    with TuningDB(tmp_path / "t.db") as db:
        added, _ = db.import_jsonl(path, validate=knob_error)
    assert added > 0


def _record(template: str = "dlight", latency: LatencyStats | None = None) -> MeasureResult:
    """A group_norm bucket over a symbolic batch on cuda, tried with `template` (dlight's default schedule
    cannot build there: scheduler/templates/dlight.py no longer applies to it); failed unless timed."""
    w = Workload.from_json({
        "op": "group_norm", "dims": [["n", 1], ["hw", 64], ["c", 1280], ["g", 32]], "dtype": "float16",
        "acc_dtype": "float32", "layout": "x[n,hw,c] nhwc eps=1e-05", "epilogue": ["affine", "silu"],
        "dynamic": [["n", 1, 1], ["hw", 33, 64]]})
    t = Target("cuda", "sm_90", "NVIDIA H200", 132, "0.27.0.post1", "13.0", "2.11.0")
    if latency is not None:
        return MeasureResult(w, t, Candidate(template, ()), "ok", latency)
    return MeasureResult(w, t, Candidate(template, ()), "build_error", error="the reduction block vars are "
                         "not used to index the output buffers")


def test_a_failed_record_of_a_template_that_does_not_apply_is_accepted():
    assert knob_error(_record()) is None


def test_a_timed_record_of_a_template_that_does_not_apply_is_still_rejected():
    why = knob_error(_record(latency=LatencyStats.of([5.0, 5.1, 4.9])))
    assert why is not None and "does not apply" in why


def test_a_failed_record_of_an_unknown_template_is_still_rejected():
    why = knob_error(_record(template="no_such_template"))
    assert why is not None and "unknown template" in why
