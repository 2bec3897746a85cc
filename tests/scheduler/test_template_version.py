"""Template and op-definition versions (Candidate.version): a record measured with an older version of
the code that makes its kernel is never served as measured, nor its kernel loaded from the kernel cache
(the version is in the candidate's key, so in the artifact's name); `shapetune db verify` and prebuild
rebuild its knobs as the current version, verify and re-time them here (issue 12 item 5's policy for
records of another GPU, applied to records of an older template or op definition). llvm, a tiny GEMM
tuned with gemm_llvm; a bump is the template's `version` (or the OpDef's) raised in this process.
"""

from __future__ import annotations

import dataclasses
import json
import lzma
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import kernels
from kernels.pack import PackError, write_pack
from kernels.registry import Registry
from scheduler import templates
from scheduler.builder import artifact_name
from scheduler.reverify import knob_error, reverify
from scheduler.tuner import TuneOptions, tune
from shapetune import config
from shapetune.cli import main
from shapetune.db import TuningDB, from_json_line
from shapetune.ops import OPS, opdef
from shapetune.ops.linear import linear_workload
from shapetune.records import Candidate
from shapetune.target import detect

W = linear_workload(16, 8, 16, "float32", bias=False)
OPTS = TuneOptions(trials=2, batch=2, templates=("gemm_llvm",))
LOGS = Path(__file__).resolve().parents[2] / "tuning_logs"


@pytest.fixture(scope="module")
def cpu():
    return detect("llvm")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, cpu, cheap):
    """W tuned here with gemm_llvm at version 1 (2 candidates), and its export."""
    d = tmp_path_factory.mktemp("versioned")
    tune([W], cpu, d / "t.db", OPTS)
    with TuningDB(d / "t.db") as db:
        db.export_jsonl(d / "export.jsonl")
    return d / "t.db", d / "export.jsonl"


def _copy(tuned, tmp_path) -> Path:
    shutil.copy(tuned[0], tmp_path / "t.db")
    return tmp_path / "t.db"


@pytest.fixture(params=["template", "op"])
def bump(request, monkeypatch):
    """bump() makes a new version of the code that makes W's kernels: gemm_llvm's (its candidates are
    then of version "2.1"), or linear's definition (every linear template's: "1.2"); returns it."""
    def bump() -> str:
        if request.param == "template":
            monkeypatch.setattr(templates.get("gemm_llvm"), "version", 2)
            return "2.1"
        monkeypatch.setitem(OPS, "linear", dataclasses.replace(opdef("linear"), version=2))
        return "1.2"

    return bump


def _registry(path, cpu) -> Registry:
    return Registry(db_path=path, target=cpu, require_faster=False)  # a tiny CPU GEMM may lose to torch


# -- (a) an older version's record is never served ---------------------------------------------------
def test_a_record_of_an_older_version_is_not_served_though_its_kernel_is_cached(tuned, tmp_path, cpu, bump):
    path = _copy(tuned, tmp_path)
    assert _registry(path, cpu).prebuild(jobs=1)["built"] == 1  # served at version 1: its .so into the cache
    with TuningDB(path) as db:
        old = db.best(W.key, cpu.key)
    cached = config.kernel_cache_dir(cpu.key) / artifact_name(W, old.candidate)
    assert old.candidate.version == "" and cached.exists()

    version = bump()
    reg = _registry(path, cpu)
    res = reg.resolve(W)
    assert res.kind == "fallback" and res.cause == "stale_version", res
    assert str(old.candidate) in res.reason and "shapetune db verify" in res.reason, res.reason
    out = CliRunner().invoke(main, ["db", "best", "--db", str(path), "--format", "json"])
    (row,) = json.loads(out.output)
    assert row["candidate"] == f"{old.candidate} (stale: this code is v{version})", row
    assert reg.served() == []
    prev = kernels.set_registry(reg)
    try:
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(16, 16, generator=g), torch.randn(8, 16, generator=g)
        torch.testing.assert_close(kernels.linear(x, w), torch.nn.functional.linear(x, w))
        assert kernels.fallback_summary()["linear"] == {"stale_version": 1}  # counted, torch ran
    finally:
        kernels.set_registry(prev)
    with pytest.raises(PackError, match="nothing to pack"):
        write_pack(tmp_path / "pack", path, cpu)


# -- (b) re-verified as the current version, then served ----------------------------------------------
def test_db_verify_re_verifies_it_as_the_current_version(tuned, tmp_path, cpu, bump, monkeypatch):
    monkeypatch.setenv("SHAPETUNE_TARGET", "llvm")
    path = _copy(tuned, tmp_path)
    version = bump()
    with TuningDB(path) as db:
        old = db.best(W.key, cpu.key)
        n = len(db.results())
    out = CliRunner().invoke(main, ["db", "verify", "--db", str(path)])
    assert out.exit_code == 0, out.output
    (line,) = [x for x in out.output.splitlines() if W.name in x]
    assert "reverified" in line and f"@v{version}" in line, line

    res = _registry(path, cpu).resolve(W)
    new = res.record
    assert res.kind == "exact" and new.candidate == dataclasses.replace(old.candidate, version=version), res
    assert new.candidate.key != old.candidate.key and new.run_id != old.run_id  # timed in this run
    new_so = config.kernel_cache_dir(cpu.key) / artifact_name(W, new.candidate)
    assert new_so.exists() and new_so.name != artifact_name(W, old.candidate)  # a new file, kept by db verify
    with TuningDB(path) as db:
        assert len(db.results()) == n + 1 and db.find(old.uid) is not None  # the old record stays, history
        assert db.baselines(W.key, cpu.key, limit=1)[0].run_id == new.run_id  # the vendor timed with it
    assert reverify(path, cpu) == []  # served now: nothing more to re-verify


def test_prebuild_re_verifies_and_builds_the_current_version(tuned, tmp_path, cpu, bump):
    path = _copy(tuned, tmp_path)
    version = bump()
    out = _registry(path, cpu).prebuild(jobs=1)
    assert out["reverified"] == 1 and out["reverify_failed"] == 0 and out["cached"] == 1, out
    assert _registry(path, cpu).resolve(W).record.candidate.version == version


def test_one_that_fails_as_the_current_version_is_stored_failed_and_not_retried(tuned, tmp_path, cpu, bump):
    with TuningDB(tuned[0]) as db:
        good = db.best(W.key, cpu.key)
    path = tmp_path / "t.db"
    with TuningDB(path) as db:  # W's only record: knobs this version's space does not hold
        db.add_result(dataclasses.replace(good, candidate=Candidate("gemm_llvm", (("tm", 999),)), run_id="x"))
    version = bump()
    verdicts = reverify(path, cpu)
    assert [v.workload for v in verdicts] == [W] and verdicts[0].passed is None
    assert all("knobs" in why for _, why in verdicts[0].failed), verdicts[0].failed
    with TuningDB(path) as db:
        failed = [r for r in db.results(W.key, cpu.key) if r.candidate.version == version]
    assert failed and {r.status for r in failed} == {"build_error"}
    assert reverify(path, cpu) == []  # tried as this version: not again
    assert _registry(path, cpu).resolve(W).cause == "stale_version"


# -- the tuner: an older version's knobs are not "measured" -------------------------------------------
def test_the_tuner_measures_the_current_version_where_an_older_one_filled_the_trials(tuned, tmp_path, cpu,
                                                                                    cheap, bump):
    path = _copy(tuned, tmp_path)
    version = bump()
    (rep,) = tune([W], cpu, path, OPTS)
    assert rep.measured == OPTS.trials and rep.held == OPTS.trials, rep
    with TuningDB(path) as db:
        assert len({r.candidate.key for r in db.results(W.key, cpu.key) if r.candidate.version == version}) \
            == OPTS.trials
    assert tune([W], cpu, path, OPTS)[0].measured == 0  # and a rerun resumes as before


# -- (c) version 1.1 keeps every key ------------------------------------------------------------------
def test_the_default_version_keeps_every_key_json_and_artifact_name():
    c = Candidate("norm_cuda", (("threads", 256), ("vec", 4), ("cache_x", True)))
    assert c.key == "2ae3955fdc83a16e" and Candidate("dlight").key == "d1bab40ad6d3c0be"  # keys before versions
    assert c.to_json() == {"template": "norm_cuda", "knobs": {"cache_x": True, "threads": 256, "vec": 4}}
    assert Candidate("norm_cuda", c.knobs, "1.1") == c and str(c) == "norm_cuda[cache_x=True,threads=256,vec=4]"
    v2 = Candidate("norm_cuda", c.knobs, "2.1")
    assert v2.key != c.key and v2.to_json()["version"] == "2.1" and str(v2).endswith("@v2.1")
    assert Candidate.from_json(json.dumps(v2.to_json())) == v2 and Candidate.from_json(c.to_json()) == c
    for bad in ("2", "0.1", "1.x", 2):
        with pytest.raises(ValueError):
            Candidate("dlight", (), bad)
    with lzma.open(LOGS / "sm90_h100_sd15_add_layer_norm.jsonl.xz", "rt") as f:
        line = next(d for d in map(json.loads, f) if d["type"] == "record")
    r = from_json_line(line)  # its uid and sha256, computed over the candidate's JSON, still match
    assert r.candidate.version == "" and r.candidate.to_json() == line["candidate"]


def test_space_and_current_version_follow_the_bump(cpu, bump):
    assert templates.get("gemm_llvm").space(W, cpu)[0].version == "" == templates.current_version("gemm_llvm", "linear")
    version = bump()
    assert templates.get("gemm_llvm").space(W, cpu)[0].version == version == templates.current_version("gemm_llvm", "linear")
    assert templates.current_version("no_such_template", "no_such_op") == ""


# -- (d) an export holding an older version's records imports, and is re-verified as this version ----
def test_an_export_of_an_older_version_imports_and_re_verifies_as_this_version(tuned, tmp_path, cpu, bump):
    _, export = tuned
    version = bump()
    with TuningDB(tmp_path / "fresh.db") as db:
        added, _ = db.import_jsonl(export, validate=knob_error)
        assert added > 0 and all(knob_error(r) is None for r in db.results())
    assert _registry(tmp_path / "fresh.db", cpu).resolve(W).cause == "unverified"
    (v,) = reverify(tmp_path / "fresh.db", cpu)
    assert v.passed is not None and v.passed.candidate.version == version
    assert _registry(tmp_path / "fresh.db", cpu).resolve(W).record.candidate.version == version
