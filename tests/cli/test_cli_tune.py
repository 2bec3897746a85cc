"""`shapetune tune`: the main job, on the llvm target with tiny shapes."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from shapetune.cli import main
from shapetune.db import TuningDB
from shapetune.serving import servable, vendor_us


def _run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_tune_shape_json_then_db_sees_it(tmp_path):
    db = tmp_path / "t.db"
    out = _run("tune", "--target", "llvm", "--shape", "m=16,n=8,k=16", "--no-bias", "--trials", "2",
               "--batch", "2", "--template", "gemm_llvm", "--db", str(db), "--format", "json")
    assert out.exit_code == 0, out.output
    rep = json.loads(out.stdout)  # progress and the target line go to stderr
    (row,) = rep["workloads"]
    assert row["workload"] == "linear_m16_n8_k16_f32" and row["measured"] == 2
    assert row["ok"] == 2 and row["best_us"] > 0 and row["vendor_us"] > 0
    with TuningDB(db) as d:
        assert len(d.results()) == 2 and d.baselines()


def test_tune_buckets_table(tmp_path):
    db = tmp_path / "t.db"
    out = _run("tune", "--target", "llvm", "--shape", "m=20,n=8,k=16", "--buckets", "--trials", "1",
               "--batch", "1", "--template", "gemm_llvm", "--db", str(db))
    assert out.exit_code == 0, out.output
    assert "linear_m17-32_n8_k16_f32+bias" in out.output and f"DB: {db}" in out.output
    with TuningDB(db) as d:
        assert d.buckets("linear")


def test_tune_rejects_bad_input(tmp_path):
    bad = CliRunner().invoke(main, ["tune", "--target", "llvm", "--shape", "m=4,n", "--db", str(tmp_path / "x.db")])
    assert bad.exit_code != 0 and "m=..,n=..,k=.." in bad.output
    outside = CliRunner().invoke(main, ["tune", "--target", "llvm", "--shape", "m=2000000,n=8,k=8", "--buckets",
                                        "--db", str(tmp_path / "x.db")])
    assert outside.exit_code != 0 and "outside every bucket" in outside.output


def test_version_and_help():
    assert _run("--version").exit_code == 0
    out = _run("--help")
    assert "tune" in out.output and "db" in out.output


def test_tune_other_op_families_by_shape(tmp_path):
    """--op with its workload's parameters: attention (cross, 77 keys) tuned and verified on llvm."""
    db = tmp_path / "t.db"
    out = _run("tune", "--target", "llvm", "--op", "attention", "--shape", "b=1,sq=9,skv=77,h=2,d=8",
               "--trials", "2", "--batch", "2", "--db", str(db), "--format", "json")
    rows = json.loads(out.stdout)["workloads"]
    assert [r["workload"] for r in rows] == ["attention_b1_sq9_skv77_h2_d8_f32"] and rows[0]["ok"] >= 1
    bad = CliRunner().invoke(main, ["tune", "--target", "llvm", "--op", "layer_norm", "--shape", "m=4",
                                    "--db", str(db)])
    assert bad.exit_code != 0 and "needs c" in bad.output


def test_sd15_presets_cover_every_family():
    from scheduler.extract import SD15_FAMILIES, sd15_workloads
    from shapetune.cli import SD15_PRESETS

    assert set(SD15_PRESETS) == {"sd15"} | {f"sd15-{f}" for f in SD15_FAMILIES}
    ops = {o.workload.op for o in sd15_workloads()}
    assert ops == {"linear", "geglu", "group_norm", "layer_norm", "add_layer_norm", "conv2d", "attention", "gelu_gate",
                   "bias_add"}


def test_parallel_workers_merge_shards_and_survive_a_crashing_shard(tmp_path):
    """--workers: one process per shard; every shard DB is merged into --db, and a shard that dies
    (here on an unknown op) loses nothing it measured before, and the others' results all arrive."""
    from scheduler.parallel import tune_parallel
    from scheduler.tuner import TuneOptions
    from shapetune.workload import Workload
    from shapetune.ops.linear import linear_workload

    a, b = linear_workload(16, 8, 16, "float32", False), linear_workload(24, 8, 16, "float32", True)
    bad = Workload(op="no_such_op", dims=(("m", 1),), dtype="float32", acc_dtype="float32", layout="", epilogue=())
    db = tmp_path / "job.db"
    shards = tune_parallel([a, b, bad], db, TuneOptions(trials=2, batch=2, templates=("gemm_llvm",)), ["", ""], "llvm")
    assert [s.workloads for s in shards] == [2, 1]
    assert shards[0].returncode != 0 and shards[1].returncode == 0
    assert "no_such_op" in open(shards[0].log).read()
    with TuningDB(db) as d:
        keys = {r.workload.key for r in d.results()}
        assert keys == {a.key, b.key}
        for w in (a, b):  # one vendor timing, and one more where the run's record beat it (scheduler.tuner)
            timed = d.baselines(w.key)
            beat = servable(d.best(w.key, timed[0].target.key).latency.median_us, vendor_us(timed[-1]))
            assert len(timed) == 1 + beat

    out = _run("tune", "--target", "llvm", "--shape", "m=16,n=8,k=16", "--no-bias", "--trials", "2",
               "--template", "gemm_llvm", "--workers", "2", "--db", str(tmp_path / "cli.db"), "--format", "json")
    assert json.loads(out.stdout)["workloads"][0]["ok"] == 2


def test_prebuild_compiles_the_dispatched_kernels(tmp_path, monkeypatch):
    monkeypatch.setenv("SHAPETUNE_CACHE_DIR", str(tmp_path / "cache"))
    db = str(tmp_path / "t.db")
    _run("tune", "--target", "llvm", "--shape", "m=16,n=8,k=16", "--no-bias", "--trials", "2",
         "--template", "gemm_llvm", "--db", db)
    monkeypatch.setenv("SHAPETUNE_TARGET", "llvm")
    out = _run("prebuild", "--db", db, "--all")
    assert "1 built, 0 already cached, 0 failed" in out.output, out.output
    assert "0 built, 1 already cached" in _run("prebuild", "--db", db, "--all").output
    # --shapes: only what SD 1.5's UNet dispatches at 1x256 (and its buckets): not this GEMM
    assert "0 built, 0 already cached" in _run("prebuild", "--db", db, "--all", "--models", "unet",
                                               "--shapes", "1x256").output
    for bad, why in ((["--models", "unet"], "--models needs --shapes"),
                     (["--models", "nope", "--shapes", "1x256"], "unknown model 'nope'"),
                     (["--shapes", "1x"], "is not BATCHxSIZE")):
        r = CliRunner().invoke(main, ["prebuild", "--db", db, *bad])
        assert r.exit_code != 0 and why in r.output, (bad, r.output)


# -- issue 11 item 8: bad arguments, fused linears, progress, piped tables -----------------------------
def test_tune_bad_arguments_are_one_line(tmp_path):
    """What the db commands do: one `Error:` line, no traceback (they printed 30-40 lines)."""
    (tmp_path / "garbage.json").write_text("garbage")
    (tmp_path / "list.json").write_text('[{"op": "linear"}]')
    (tmp_path / "garbage.db").write_bytes(b"\x93not sqlite" * 50)
    shape = ["--shape", "m=4,n=8,k=8"]
    for args, says in [(["--shape", "m=0,n=8,k=8"], "m=0 must be positive"),
                       (["--workloads", str(tmp_path / "garbage.json")], "garbage.json: Expecting value"),
                       (["--workloads", str(tmp_path / "list.json")], "'workloads' list"),
                       ([*shape, "--db", str(tmp_path / "garbage.db")], "not a readable SQLite DB")]:
        out = CliRunner().invoke(main, ["tune", "--target", "llvm", "--trials", "1", "--db", str(tmp_path / "x.db"),
                                        *args], catch_exceptions=False)
        assert out.exit_code == 1 and "Traceback" not in out.output, out.output
        errors = [line for line in out.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and says in errors[0], out.output


@pytest.mark.parametrize("args, name", [(["--op", "linear_gelu", "--shape", "m=16,n=8,k=16"],
                                         "linear_m16_n8_k16_f32+bias+gelu"),
                                        (["--shape", "m=16,n=8,k=16,epilogue=residual", "--no-bias"],
                                         "linear_m16_n8_k16_f32+residual")])
def test_tune_fused_linears_from_the_cli(tmp_path, args, name):
    """linear_gelu and linear_residual (what kernels.linear_gelu / linear_residual call) can be tuned:
    --op linear_gelu, or linear's --shape with epilogue=gelu|residual (it was rejected as not a number)."""
    db = tmp_path / "t.db"
    out = _run("tune", "--target", "llvm", "--trials", "1", "--batch", "1", "--db", str(db), "--format", "json",
               *args)
    assert out.exit_code == 0, out.output
    (row,) = json.loads(out.stdout)["workloads"]
    assert row["workload"] == name and row["ok"] == 1


def test_tune_rejects_an_unknown_epilogue(tmp_path):
    out = CliRunner().invoke(main, ["tune", "--target", "llvm", "--shape", "m=4,n=8,k=8,epilogue=tanh",
                                    "--db", str(tmp_path / "x.db")])
    assert out.exit_code == 2 and "epilogue must be one of gelu, residual" in out.output, out.output


def test_tune_progress_shows_statuses_and_an_eta(tmp_path, monkeypatch):
    """On a terminal the bar reads "<workload> [ok]" (rich ate "[ok]" as markup) and has an ETA."""
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich treats stderr as a terminal
    monkeypatch.setenv("COLUMNS", "200")
    out = _run("tune", "--target", "llvm", "--shape", "m=16,n=8,k=16", "--no-bias", "--trials", "1", "--batch", "1",
               "--template", "gemm_llvm", "--db", str(tmp_path / "t.db"), "--format", "json")
    assert out.exit_code == 0, out.output
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.stderr)
    assert "linear_m16_n8_k16_f32 [ok]" in plain and "eta" in plain, plain


def test_piped_table_keeps_long_names(capsys):
    """Piped (not a terminal), a table is as wide as its longest cell: names are not cut to '…'."""
    from shapetune.cli.tune_cmd import _report
    from shapetune.target import cuda_target

    name = "linear_m" + "1" * 150 + "_n8_k16_f32+bias+gelu"
    best = "gemm_cuda[" + ",".join(f"knob{i}=64" for i in range(20)) + "]"
    _report([{"workload": name, "measured": 2, "ok": 2, "best_us": 1.0, "best": best, "dlight_us": 2.0,
              "vendor_us": 3.0, "speedup_vs_vendor": 3.0}], cuda_target(), "x.db", "table")
    out = capsys.readouterr().out
    assert name in out and best in out and "…" not in out, out


def test_help_states_the_sd15_preset_size():
    """`tune --help` says how many workloads `--preset sd15` tunes: the number extraction gives (it said
    118 after add_layer_norm had made it 126)."""
    from scheduler.extract import SD15_FAMILIES, sd15_workloads

    n = len(sd15_workloads(tuple(SD15_FAMILIES), dtype="float16"))
    out = _run("tune", "--help").output
    assert f"512² ({n};" in " ".join(out.split()), out
