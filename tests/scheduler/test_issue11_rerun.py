"""Issue 11 item 4 leftovers on llvm: a rerun of a finished job measures nothing at all -- no
candidate, no vendor baseline (the stored one from the same target is reported) -- and says so; and
the report's dlight record skips records without a finite, positive median (a NULL median, which
an older version or raw SQL can leave, made `min` raise TypeError)."""

from __future__ import annotations

import argparse
import shutil
import sqlite3

import pytest

from scheduler import templates
from scheduler.jobs import run
from scheduler.tuner import TuneOptions, tune
from shapetune.db import TuningDB
from shapetune.ops.linear import linear_workload
from shapetune.target import detect

A = linear_workload(16, 8, 16, "float32", False)
DLIGHT = TuneOptions(trials=1, batch=1, templates=("dlight",))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A DB in which A was tuned to its trials (dlight only: one candidate, one build)."""
    p = tmp_path_factory.mktemp("tuned") / "t.db"
    (rep,) = tune([A], detect("llvm"), p, DLIGHT)
    assert rep.measured == 1 and rep.vendor is not None and rep.dlight is not None
    return p, rep


@pytest.fixture
def db_path(tuned, tmp_path):
    p = tmp_path / "t.db"
    shutil.copy(tuned[0], p)
    return p


def _rows(p) -> dict[str, int]:
    con = sqlite3.connect(p)
    try:
        return {t: con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("records", "baselines")}
    finally:
        con.close()


# -- a rerun measures nothing ----------------------------------------------------------------------
def test_rerun_of_a_finished_job_measures_no_candidate_and_no_vendor(tuned, db_path):
    before = _rows(db_path)
    # the run's vendor timing, and a second where its record beat the first (scheduler.tuner)
    assert before == {"records": 1, "baselines": 1 + tuned[1].vendor_retimed}
    (rep,) = tune([A], detect("llvm"), db_path, DLIGHT)
    assert _rows(db_path) == before
    assert rep.measured == 0 and rep.by_status == {}
    assert rep.vendor == tuned[1].vendor  # the stored baseline, from the run that measured the record
    assert rep.vendor_reused and rep.best == tuned[1].best and rep.speedup == tuned[1].speedup


def test_a_job_rerun_says_it_measured_nothing(db_path, capsys):
    a = argparse.Namespace(trials=1, batch=1, db=str(db_path), template=["dlight"], json="", export="")
    before = _rows(db_path)
    (row,) = run([A], a, "torch")
    assert _rows(db_path) == before and row["measured"] == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if A.name in x)
    assert "nothing measured" in line and "1/1 trials already in the DB" in line, line


def test_a_rerun_asking_more_trials_times_the_vendor_in_its_own_run(tuned, db_path, monkeypatch):
    """The baseline is reused only when nothing is measured: dispatch compares a record with the
    vendor timed in its own run, so a run that measures times the vendor (once, and once more
    where its record beat that timing: each run's count below)."""
    t = templates.get("gemm_llvm")  # candidates that compile in ~1 s (tests/scheduler/test_tuner.py)
    valid = t.valid
    monkeypatch.setattr(t, "valid", lambda w, tgt, kn: valid(w, tgt, kn) and not kn["unroll_k"])
    opts = TuneOptions(trials=2, batch=1, templates=("dlight", "gemm_llvm"))
    (rep,) = tune([A], detect("llvm"), db_path, opts)
    assert rep.measured == 1 and not rep.vendor_reused
    assert _rows(db_path) == {"records": 2, "baselines": 2 + tuned[1].vendor_retimed + rep.vendor_retimed}
    with TuningDB(db_path) as db:
        new = [r for r in db.results(A.key) if r.candidate.template == "gemm_llvm"]
        assert [r.run_id for r in new] == [rep.vendor.run_id]


# -- the dlight record skips records without a usable median ---------------------------------------
def _add_dlight_copy(p, median):
    """A second ok dlight record of A, its median set by SQL (NULL, NaN, 0): rows that an older
    version or raw SQL wrote, which the DB can hold."""
    con = sqlite3.connect(p)
    cols = [r[1] for r in con.execute("PRAGMA table_info(records)") if r[1] != "id"]
    sel = ", ".join("uid || '-copy'" if c == "uid" else "?" if c == "median_us" else c for c in cols)
    con.execute(f"INSERT INTO records ({', '.join(cols)}) SELECT {sel} FROM records WHERE template = 'dlight'",
                (median,))
    con.commit()
    con.close()


@pytest.mark.parametrize("median", [None, "NaN", 0.0, -1.0])
def test_dlight_skips_a_record_without_a_finite_positive_median(tuned, db_path, median):
    _add_dlight_copy(db_path, median)
    (rep,) = tune([A], detect("llvm"), db_path, TuneOptions(trials=2, batch=1, templates=("dlight",)))
    assert rep.dlight == tuned[1].dlight


def test_dlight_is_none_when_no_record_has_a_usable_median(db_path):
    _add_dlight_copy(db_path, None)
    con = sqlite3.connect(db_path)
    con.execute("UPDATE records SET median_us = NULL WHERE uid NOT LIKE '%-copy'")
    con.commit()
    con.close()
    (rep,) = tune([A], detect("llvm"), db_path, TuneOptions(trials=2, batch=1, templates=("dlight",)))
    assert rep.measured == 0 and rep.dlight is None


def test_a_rerun_reports_every_stored_vendor_variant(tmp_path):
    """group_norm's vendor variants (its NCHW path) come back from the same stored run as its default."""
    from shapetune.ops import opdef
    from shapetune.ops.norm import group_norm_workload

    w, p = group_norm_workload(1, 16, 8, 4, "float32"), tmp_path / "t.db"
    (first,) = tune([w], detect("llvm"), p, DLIGHT)
    before = _rows(p)
    (again,) = tune([w], detect("llvm"), p, DLIGHT)
    assert _rows(p) == before and again.measured == 0 and again.vendor_reused
    assert set(again.vendor_variants) == set(opdef("group_norm").vendor_variants)
    assert (again.vendor, again.vendor_variants) == (first.vendor, first.vendor_variants)
