"""Imports are claims, not measurements: an integrity hash per line, knobs checked against the
template's space, and nothing imported is served before `shapetune db verify` (or `prebuild`)
rebuilt and re-verified it on this target (llvm, tiny GEMMs).

Builder workers import tests/_bad_templates.py through the pool's initializer (see tests/scheduler/test_tuner.py)
so a deliberately wrong template can be imported, re-verified and caught.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from scheduler.tuner import TuneOptions, search_space, tune
from shapetune.cli import main
from shapetune.db import DBError, TuningDB, from_json_line, record_to_json
from shapetune.records import Candidate, LatencyStats, MeasureResult
from shapetune.target import detect
from shapetune.ops.linear import linear_workload

W = linear_workload(16, 8, 16, "float32", bias=False)
W_ONLY_WRONG = linear_workload(24, 8, 16, "float32", bias=False)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cpu():
    return detect("llvm")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, cpu):
    """A DB tuned here (dlight + gemm_llvm, 3 trials) plus one build_error record of a valid
    candidate, and its export."""
    d = tmp_path_factory.mktemp("tuned")
    db_path = d / "t.db"
    tune([W], cpu, db_path, TuneOptions(trials=3, batch=3, templates=("dlight", "gemm_llvm")))
    with TuningDB(db_path) as db:
        used = {r.candidate.key for r in db.results()}
        spare = next(c for c in search_space(W, cpu, ("gemm_llvm",)) if c.key not in used)
        db.add_result(MeasureResult(W, cpu, spare, "build_error", error="boom", run_id="r0",
                                    created=1.8e9))
        db.export_jsonl(d / "export.jsonl")
    return db_path, d / "export.jsonl"



def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _lines(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def _rehash(d: dict) -> dict:
    """What a careful forger does: recompute the line's sha256 after editing it."""
    body = {k: v for k, v in d.items() if k != "sha256"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return {**body, "sha256": hashlib.sha256(canon.encode()).hexdigest()}


def _write(p: Path, lines: list[dict]) -> Path:
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return p


def _snapshot(db_path: Path) -> dict:
    """The DB's bytes on disk (main file and WAL), with no connection open."""
    return {s: Path(f"{db_path}{s}").read_bytes() for s in ("", "-wal") if Path(f"{db_path}{s}").exists()}


def _fresh_db_with_history(tmp_path, cpu) -> Path:
    """A non-empty DB, closed, so that a rejected import must leave its bytes as they were."""
    p = tmp_path / "fresh.db"
    with TuningDB(p) as db:
        db.add_result(MeasureResult(W_ONLY_WRONG, cpu, Candidate("dlight"), "build_error", error="x",
                                    created=1.0))
    return p


def _registry(db_path, cpu):
    from kernels.registry import Registry

    return Registry(db_path=db_path, target=cpu, require_faster=False)


def _forged_ok(line: dict, us: float = 0.5) -> dict:
    lat = LatencyStats.of([us]).to_json()
    return _rehash({**line, "status": "ok", "latency": lat, "error": "", "max_rel_err": 0.0})


# -- 1. the hash ------------------------------------------------------------------------------------
def test_export_lines_carry_a_sha256_over_every_field(tuned):
    _, export = tuned
    lines = _lines(export)
    assert lines and all(x == _rehash(x) for x in lines)  # sha256 of the line without it


@pytest.mark.parametrize("edit", ["status_and_latency", "baseline_latency", "hash_removed"])
def test_edited_line_is_rejected_with_its_line_number(tuned, tmp_path, cpu, edit):
    _, export = tuned
    lines = _lines(export)
    if edit == "baseline_latency":
        i = next(i for i, x in enumerate(lines) if x["type"] == "baseline")
        lat = lines[i]["latency"]  # a faster vendor, still a consistent latency: only the hash can tell
        lat["median_us"] = lat["min_us"]
        why = "sha256"
    else:
        i = next(i for i, x in enumerate(lines) if x.get("status") == "build_error")
        forged = {**lines[i], "status": "ok", "latency": LatencyStats.of([0.5]).to_json(), "error": ""}
        if edit == "hash_removed":  # an edited line whose hash was dropped, among hashed lines
            forged.pop("sha256")
            why = "no sha256"
        else:
            why = "sha256"
        lines[i] = forged
    bad = _write(tmp_path / "bad.jsonl", lines)
    db_path = _fresh_db_with_history(tmp_path, cpu)
    before = _snapshot(db_path)
    with TuningDB(db_path) as db, pytest.raises(DBError, match=f"line {i + 1}") as e:
        db.import_jsonl(bad)
    assert why in str(e.value) and "nothing imported" in str(e.value)
    assert _snapshot(db_path) == before
    out = _cli("db", "import", bad, "--db", db_path)
    assert out.exit_code != 0 and f"line {i + 1}" in out.output and "Traceback" not in out.output
    assert _snapshot(db_path) == before


def test_a_stored_record_cannot_be_reimported_with_other_contents(tuned, tmp_path):
    """Same uid as a stored record (the uid covers neither status nor latency), other contents."""
    db_path, export = tuned
    lines = _lines(export)
    i = next(i for i, x in enumerate(lines) if x.get("status") == "build_error")
    lines[i] = _forged_ok(lines[i])
    bad = _write(tmp_path / "bad.jsonl", lines)
    copy = tmp_path / "copy.db"
    copy.write_bytes(Path(db_path).read_bytes())
    with TuningDB(copy) as db:
        with pytest.raises(DBError, match=f"line {i + 1}.*stored here with other contents"):
            db.import_jsonl(bad)
        (kept,) = [r for r in db.results() if r.uid == lines[i]["uid"]]
        assert kept.status == "build_error"


# -- 2. knobs against the template's space ---------------------------------------------------------
@pytest.mark.parametrize("edit, why", [("knob", "outside"), ("template", "unknown template")])
def test_knobs_outside_the_space_are_rejected_by_db_import(tuned, tmp_path, cpu, edit, why):
    _, export = tuned
    lines = _lines(export)
    i = next(i for i, x in enumerate(lines) if x.get("candidate", {}).get("template") == "gemm_llvm")
    cand = dict(lines[i]["candidate"])
    if edit == "knob":
        cand["knobs"] = {**cand["knobs"], next(iter(cand["knobs"])): 999}
    else:
        cand["template"] = "no_such_template"
    edited = {**lines[i], "candidate": cand}
    edited["uid"] = from_json_line({k: v for k, v in edited.items() if k not in ("uid", "sha256")}).uid
    lines[i] = _rehash(edited)
    bad = _write(tmp_path / "bad.jsonl", lines)
    db_path = _fresh_db_with_history(tmp_path, cpu)
    before = _snapshot(db_path)
    out = _cli("db", "import", bad, "--db", db_path)
    assert out.exit_code != 0 and "Traceback" not in out.output, out.output
    assert f"line {i + 1}" in out.output and why in out.output
    assert _snapshot(db_path) == before


# -- 3. pending until re-verified --------------------------------------------------------------------
def test_import_is_served_only_after_db_verify(tuned, tmp_path, cpu, monkeypatch):
    monkeypatch.setenv("SHAPETUNE_TARGET", "llvm")
    db_path, export = tuned
    with TuningDB(db_path) as src:
        best_here = src.best(W.key, cpu.key)
    fresh = tmp_path / "fresh.db"
    out = _cli("db", "import", export, "--db", fresh)
    assert out.exit_code == 0, out.output
    with TuningDB(fresh) as db:
        assert db.best(W.key, cpu.key) is None and db.best_all(target_key=cpu.key) == []
    res = _registry(fresh, cpu).resolve(W)
    assert res.kind == "fallback" and res.cause == "unverified", res
    assert "shapetune db verify" in res.reason

    out = _cli("db", "verify", "--db", fresh)
    assert out.exit_code == 0, out.output
    (line,) = [x for x in out.output.splitlines() if W.name in x]
    assert "reverified" in line and str(best_here.candidate) in line
    res = _registry(fresh, cpu).resolve(W)
    assert res.kind == "exact" and res.record.candidate == best_here.candidate
    with TuningDB(fresh) as db:
        (i, imported), = [(i, r) for i, r in db.iter_results() if r.uid == best_here.uid]
        assert db.trust([i])[i] == ("reverified", "")
        assert res.record.run_id != imported.run_id  # what is served was measured here
    again = _cli("db", "verify", "--db", fresh)
    assert again.exit_code == 0 and "nothing to re-verify" in again.output


def test_pruning_the_copy_an_import_was_reverified_as_makes_it_pending_again(tuned, tmp_path, cpu, monkeypatch):
    """Defect (before: prune deleted only the verdicts of the records it deleted): `db prune --trust measured`
    deleted the record measured here that an import passed re-verification as, and left the import marked
    reverified: never re-verified again, and nothing served for it. Now that verdict goes too: the import is
    pending again, and `db verify` re-verifies it."""
    monkeypatch.setenv("SHAPETUNE_TARGET", "llvm")
    _, export = tuned
    fresh = tmp_path / "fresh.db"
    assert _cli("db", "import", export, "--db", fresh).exit_code == 0
    assert _cli("db", "verify", "--db", fresh).exit_code == 0
    assert _registry(fresh, cpu).resolve(W).kind == "exact"
    dry = _cli("db", "prune", "--trust", "measured", "--db", fresh).output
    assert "would delete 1 of" in dry and "1 import(s) re-verified as one of them would be pending again" in dry
    assert _registry(fresh, cpu).resolve(W).kind == "exact"  # a dry run changes nothing
    out = _cli("db", "prune", "--trust", "measured", "--yes", "--db", fresh)
    assert out.exit_code == 0 and "deleted 1 of" in out.output and "1 import(s)" in out.output, out.output
    with TuningDB(fresh) as db:
        assert db.stats()["by_trust"] == {"imported": db.stats()["records"]}
        assert db.best(W.key, cpu.key) is None and len(db.pending(cpu.key)) > 0
    res = _registry(fresh, cpu).resolve(W)
    assert res.kind == "fallback" and res.cause == "unverified", res
    out = _cli("db", "verify", "--db", fresh)
    assert out.exit_code == 0 and "reverified" in out.output, out.output
    assert _registry(fresh, cpu).resolve(W).kind == "exact"


def test_a_verdict_is_not_given_to_a_record_that_took_the_row_id_of_a_pruned_import(tuned, tmp_path, cpu):
    """Defect (before: a re-verification run stored each verdict on the row id it read when it started): the
    imports it was verifying pruned meanwhile and another export imported (another process, while the kernel
    was built and run), SQLite gave the new records the deleted rows' ids (the largest were deleted), and
    the verdict went to another workload's import: marked reverified, never re-verified, and nothing
    measured for it (or the run crashed, "not an imported record", where the id was not reused). Now a verdict
    is stored only on the record of the uid that was verified: the new imports stay pending."""
    from scheduler.reverify import reverify
    from scheduler.runner import Runner

    _, export = tuned
    fresh, other = tmp_path / "fresh.db", tmp_path / "other.jsonl"
    assert _cli("db", "import", export, "--db", fresh).exit_code == 0
    with TuningDB(fresh) as db:
        n = db.stats()["records"]
    with TuningDB(tmp_path / "o.db") as db:  # another export: as many dlight claims of another workload
        db.add_results(MeasureResult(W_ONLY_WRONG, cpu, Candidate("dlight"), "ok", LatencyStats.of([5.0 + k]),
                                     max_rel_err=0.0, run_id=f"other{k}", created=1.9e9 + k) for k in range(n))
        db.export_jsonl(other)

    class Meanwhile(Runner):
        """A Runner during whose first kernel run (the vendor's are timed first) another process prunes every
        import of `fresh` and imports `other`."""

        timed_vendor = False

        def vendors(self, workload):
            out = super().vendors(workload)
            self.timed_vendor = True
            return out

        def run(self, workload, artifact):
            if self.timed_vendor and other.exists():
                assert _cli("db", "prune", "--trust", "imported", "--yes", "--db", fresh).exit_code == 0
                assert _cli("db", "import", other, "--db", fresh).exit_code == 0
                other.unlink()
            return super().run(workload, artifact)

    (v,) = reverify(fresh, cpu, runner=Meanwhile(cpu))
    assert not other.exists() and v.workload == W
    with TuningDB(fresh) as db:
        got = db.iter_results(origin="imported")
        assert {i for i, _ in got} == set(range(1, n + 1))  # the ids of the pruned imports, reused
        assert {r.workload for _, r in got} == {W_ONLY_WRONG}
        assert {s for s, _ in db.trust([i for i, _ in got]).values()} == {"imported"}
        assert db.iter_results(origin="measured") == []
        assert len(db.pending(cpu.key, workload_key=W_ONLY_WRONG.key)) == n
    assert v.passed is None and v.failed == []  # nothing left to verify


def test_the_registry_serves_no_import_whose_row_id_a_measured_record_took_meanwhile(tuned, tmp_path, cpu,
                                                                                       monkeypatch):
    """Defect (before: the registry read this target's records, then their trust states by row id, in a second
    query): the imports it read pruned in between and records measured here stored (another process), those
    took the pruned rows' ids, and the imports were served as measured, never re-verified (or the registry
    raised KeyError, where an id was not reused). Now it reads the measured records alone, in one query."""
    _, export = tuned
    fresh = tmp_path / "fresh.db"
    assert _cli("db", "import", export, "--db", fresh).exit_code == 0
    with TuningDB(fresh) as db:
        n = db.stats()["records"]
    iter_results = TuningDB.iter_results

    def meanwhile(self, *args, **kwargs):
        out = iter_results(self, *args, **kwargs)
        monkeypatch.setattr(TuningDB, "iter_results", iter_results)  # once
        assert _cli("db", "prune", "--trust", "imported", "--yes", "--db", fresh).exit_code == 0
        with TuningDB(fresh) as db:  # a tuner of another workload stores as many records
            db.add_results(MeasureResult(W_ONLY_WRONG, cpu, Candidate("dlight"), "ok", LatencyStats.of([5.0 + k]),
                                         max_rel_err=0.0, run_id=f"here{k}", created=1.9e9 + k) for k in range(n))
            assert {i for i, _ in db.iter_results()} == set(range(1, n + 1))  # the pruned imports' ids
        return out

    monkeypatch.setattr(TuningDB, "iter_results", meanwhile)
    res = _registry(fresh, cpu).resolve(W)
    assert res.kind == "fallback" and res.record is None, res


def test_wrong_kernel_fails_reverification_and_is_never_served(tuned, tmp_path, cpu, bad_templates,
                                                                monkeypatch):
    """Forged, valid-hash records of a deliberately wrong template claim 0.5 us: the fastest claim
    fails re-verification, is marked, and the next best is re-verified and served instead; where
    only the wrong one exists, nothing is served."""
    monkeypatch.setenv("SHAPETUNE_TARGET", "llvm")
    _, export = tuned
    lines = _lines(export)
    tmpl = next(x for x in lines if x["type"] == "record" and x["status"] == "ok")
    forged = []
    for w in (W, W_ONLY_WRONG):
        r = MeasureResult(w, cpu, Candidate("wrong_gemm", (("variant", 0),)), "ok",
                          LatencyStats.of([0.5]), max_rel_err=0.0, run_id="forger", created=1.9e9)
        forged.append(_rehash(record_to_json(r)))
    assert forged[0]["target"] == tmpl["target"]
    imp = _write(tmp_path / "imp.jsonl", lines + forged)
    fresh = tmp_path / "fresh.db"
    assert _cli("db", "import", imp, "--db", fresh).exit_code == 0
    out = _cli("db", "verify", "--db", fresh, "--jobs", "2")
    assert out.exit_code == 0, out.output
    rows = {w.name: [x for x in out.output.splitlines() if x.startswith(w.name)] for w in (W, W_ONLY_WRONG)}
    assert len(rows[W.name]) == 1 and len(rows[W_ONLY_WRONG.name]) == 1, out.output
    assert "reverified" in rows[W.name][0] and "1 failed" in rows[W.name][0]
    assert "none passed" in rows[W_ONLY_WRONG.name][0] and "wrong_result" in rows[W_ONLY_WRONG.name][0]
    with TuningDB(fresh) as db:
        wrong = [(i, r) for i, r in db.iter_results() if r.candidate.template == "wrong_gemm"]
        states = db.trust([i for i, _ in wrong])
        assert {s for s, _ in states.values()} == {"reverify_failed"}
        assert all("wrong_result" in why for _, why in states.values())
        assert db.best(W_ONLY_WRONG.key, cpu.key) is None
        assert db.best(W.key, cpu.key).candidate.template != "wrong_gemm"
    reg = _registry(fresh, cpu)
    assert reg.resolve(W).record.candidate.template != "wrong_gemm"
    res = reg.resolve(W_ONLY_WRONG)
    assert res.kind == "fallback" and res.record is None and res.cause == "all_failed"
    assert "nothing to re-verify" in _cli("db", "verify", "--db", fresh).output  # marked: not retried


def test_prebuild_reverifies_imports_first(tuned, tmp_path, cpu, monkeypatch):
    monkeypatch.setenv("SHAPETUNE_CACHE_DIR", str(tmp_path / "cache"))
    _, export = tuned
    fresh = tmp_path / "fresh.db"
    with TuningDB(fresh) as db:
        db.import_jsonl(export)
    reg = _registry(fresh, cpu)
    out = reg.prebuild(jobs=2)
    # the kernel re-verification built and verified is the one cached: prebuild builds nothing again
    assert out["reverified"] == 1 and out["cached"] == 1 and out["built"] == 0 and out["failed"] == 0, out
    assert reg.resolve(W).kind == "exact"
    assert [p.name for p in (tmp_path / "cache").rglob("*.tmp.so")] == []


def test_a_kernel_that_fails_reverification_is_not_cached(tuned, tmp_path, cpu, bad_templates, monkeypatch):
    """Only a kernel that passed re-verification enters the kernel cache: a forged record of a wrong
    template is built and run, fails, and leaves nothing the registry could load."""
    monkeypatch.setenv("SHAPETUNE_TARGET", "llvm")
    monkeypatch.setenv("SHAPETUNE_CACHE_DIR", str(tmp_path / "cache"))
    _, export = tuned
    lines = _lines(export)
    r = MeasureResult(W_ONLY_WRONG, cpu, Candidate("wrong_gemm", (("variant", 0),)), "ok",
                      LatencyStats.of([0.5]), max_rel_err=0.0, run_id="forger", created=1.9e9)
    fresh = tmp_path / "fresh.db"
    assert _cli("db", "import", _write(tmp_path / "imp.jsonl", lines + [_rehash(record_to_json(r))]),
                "--db", fresh).exit_code == 0
    out = _cli("db", "verify", "--db", fresh, "--jobs", "2")
    assert out.exit_code == 0 and "wrong_result" in out.output, out.output
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*.so"))
    assert len(cached) == 1 and cached[0].startswith(W.key), cached  # the passing one only


def test_shard_merge_stays_measured_and_export_merge_is_pending(tuned, tmp_path, cpu):
    db_path, export = tuned
    with TuningDB(tmp_path / "job.db") as job:
        job.merge_from(db_path)  # a shard DB of this job: measured here
        assert job.best(W.key, cpu.key) is not None
    with TuningDB(tmp_path / "other.db") as other:
        other.merge_from(export)  # an export: a claim
        assert other.best(W.key, cpu.key) is None
        assert other.best(W.key, cpu.key, include_pending=True) is not None


# -- 4. shipped logs ------------------------------------------------------------------------------------
def test_a_shipped_log_without_hashes_still_imports_as_pending(tmp_path):
    log = REPO / "tuning_logs" / "sm90_h200_sd15_geglu.jsonl.xz"
    fresh = tmp_path / "fresh.db"
    out = _cli("db", "import", log, "--db", fresh)
    assert out.exit_code == 0, out.output
    with TuningDB(fresh) as db:
        n = db.stats()["records"]
        assert n > 0 and "imported %d new" % (n + len(db.baselines())) in out.output
        assert db.best_all() == [] and db.stats()["by_trust"] == {"imported": n}


def test_prebuild_reverifies_only_claims_that_beat_their_runs_vendor(tuned, tmp_path, cpu, monkeypatch):
    """A registry that serves only kernels faster than the vendor path re-verifies only the claims that
    were faster in their own run: here every ok record claims 3x its run's vendor time, so prebuild
    leaves them pending (no build, no run); `db verify` and a prebuild that serves everything
    (--all) still take them."""
    from kernels.registry import Registry
    from scheduler.reverify import claims_won

    monkeypatch.setenv("SHAPETUNE_CACHE_DIR", str(tmp_path / "cache"))
    _, export = tuned
    lines = _lines(export)
    vendor = {x["run_id"]: x["latency"]["median_us"] for x in lines if x["type"] == "baseline"}
    slow = []
    for x in lines:
        if x["type"] == "record" and x["status"] == "ok":
            t = 3 * vendor[x["run_id"]]
            x = {**x, "latency": {**x["latency"], "median_us": t, "mean_us": t, "min_us": t, "max_us": t,
                                  "std_us": 0.0}}
            x = _rehash(x)
        slow.append(x)
    fresh = tmp_path / "fresh.db"
    res = _cli("db", "import", _write(tmp_path / "slow.jsonl", slow), "--db", fresh)
    assert res.exit_code == 0, res.output
    with TuningDB(fresh) as db:
        pending = db.pending(cpu.key)
        assert pending and not any(claims_won(db)(r) for _, r in pending)
    out = Registry(db_path=fresh, target=cpu).prebuild(jobs=1)
    assert out == {"reverified": 0, "reverify_failed": 0, "cached": 0, "built": 0, "failed": 0}, out
    with TuningDB(fresh) as db:
        assert len(db.pending(cpu.key)) == len(pending)  # untouched: still claims
    monkeypatch.setenv("SHAPETUNE_TARGET", "llvm")
    line = _cli("prebuild", "--db", fresh).output  # what the CLI says of the claims it left
    assert "0 imports re-verified" in line and "1 workload(s) keep unverified claims here" in line, line
    assert "no claim beat the vendor path in its own run" in line
    out = Registry(db_path=fresh, target=cpu, require_faster=False).prebuild(jobs=1)
    assert out["reverified"] == 1, out


def test_prebuild_keys_limit_it_to_those_workloads(tuned, tmp_path, cpu, monkeypatch):
    """prebuild(keys=...) (`shapetune prebuild --models --shapes`) re-verifies and builds only the
    workloads of those keys."""
    from kernels.registry import Registry

    monkeypatch.setenv("SHAPETUNE_CACHE_DIR", str(tmp_path / "cache"))
    _, export = tuned
    fresh = tmp_path / "fresh.db"
    with TuningDB(fresh) as db:
        db.import_jsonl(export)
    reg = Registry(db_path=fresh, target=cpu, require_faster=False)
    assert reg.prebuild(jobs=1, keys={W_ONLY_WRONG.key})["reverified"] == 0
    with TuningDB(fresh) as db:
        assert db.pending(cpu.key)
    assert reg.prebuild(jobs=1, keys={W.key})["reverified"] == 1
