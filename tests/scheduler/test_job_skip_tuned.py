"""`--skip-tuned` of the tuning jobs (scheduler.jobs.select): a job that fills the gaps of shipped
records leaves out the workloads an export already holds verified kernels for, on this target's
kernels only."""

from __future__ import annotations

import argparse

from scheduler import jobs
from scheduler.tuner import TuneOptions, tune
from shapetune.db import TuningDB
from shapetune.ops.norm import group_norm_workload
from shapetune.target import cuda_target, detect


def _args(**kw) -> argparse.Namespace:
    a = jobs.add_job_args(argparse.ArgumentParser(), "x.db").parse_args([])
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def test_skip_tuned_leaves_out_what_an_export_holds(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SHAPETUNE_TARGET", "llvm")
    cpu = detect()
    tuned, gap = (group_norm_workload(1, hw, 32, 8, "float32") for hw in (64, 96))
    db = tmp_path / "shipped.db"
    tune([tuned], cpu, db, TuneOptions(trials=1, batch=1))  # a real measured, verified record
    export = tmp_path / "shipped.jsonl"
    with TuningDB(db) as d:
        assert d.best(tuned.key, cpu.key) is not None
        d.export_jsonl(export, target_key=cpu.key)
    for path in (db, export):
        assert jobs.select([tuned, gap], _args(skip_tuned=[str(path)]), cpu) == [gap]
    assert "1 of 2 workloads already tuned" in capsys.readouterr().out
    # another target's kernels (a GPU's) are not this one's: nothing is left out for it
    assert jobs.select([tuned, gap], _args(skip_tuned=[str(export)]), cuda_target()) == [tuned, gap]
    assert jobs.select([tuned, gap], _args(), cpu) == [tuned, gap]
