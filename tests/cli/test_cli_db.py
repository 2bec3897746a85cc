import csv
import dataclasses
import io
import json
import sqlite3

import pytest
from click.testing import CliRunner

from shapetune.cli.db_cmd import db
from shapetune.db import SCHEMA_VERSION, TuningDB
from shapetune.records import Candidate
from tests.shapetune._db_history import CPU, H100, W1, W2, history

FORMATS = ["table", "json", "csv"]




@pytest.fixture
def dlight_path(tmp_path):
    """The same history with a real candidate (dlight, whose space is itself): `db import`
    checks every record's knobs against its template's space."""
    p = tmp_path / "dlight.db"
    with TuningDB(p) as d:
        rs, bs = history()
        d.add_results(dataclasses.replace(r, candidate=Candidate("dlight")) for r in rs)
        for b in bs:
            d.add_baseline(b)
    return str(p)


def run(*args, ok=True):
    res = CliRunner().invoke(db, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output
    else:
        assert res.exit_code != 0 and "Traceback" not in res.output
    return res.output


def parse(out, fmt):
    if fmt == "json":
        return json.loads(out)
    if fmt == "csv":
        return list(csv.DictReader(io.StringIO(out)))
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_list(path, fmt):
    out = parse(run("list", "--db", path, "--format", fmt), fmt)
    if fmt == "table":
        assert "linear_m8192_n320_k320_f16+bias" in out and "wrong_result" in out
        return
    assert len(out) == 8 and set(out[0]) == {"id", "uid", "workload", "template", "status",
                                            "trust", "median_us", "created"}
    assert {r["trust"] for r in out} == {"measured"}
    assert float(out[0]["created"]) >= float(out[-1]["created"])
    ok = parse(run("list", "--db", path, "--format", fmt, "--status", "ok", "--limit", 2), fmt)
    assert len(ok) == 2 and {r["status"] for r in ok} == {"ok"}
    cpu = parse(run("list", "--db", path, "--format", fmt, "--target", CPU.key, "--op", "linear"),
                fmt)
    assert len(cpu) == 1 and float(cpu[0]["median_us"]) == 400.0
    none = parse(run("list", "--db", path, "--format", fmt, "--op", "conv2d"), fmt)
    assert none == [] if fmt == "json" else not none


@pytest.mark.parametrize("fmt", FORMATS)
def test_show(path, fmt):
    with TuningDB(path) as d:
        (i, r), = d.iter_results(status="build_error")
    for ref in (i, r.uid, r.uid[:8]):
        out = run("show", ref, "--db", path, "--format", fmt)
        if fmt == "table":
            assert r.uid in out and "build_error: boom" in out and "tile_m=999" in out
            assert "vec='f16x8'" in out
            continue
        row = parse(out, fmt)
        row = row if fmt == "json" else row[0]
        assert row["uid"] == r.uid and row["error"] == r.error
        knobs = row["knobs"] if fmt == "json" else json.loads(row["knobs"])
        assert knobs == {"tile_m": 999, "vec": "f16x8", "swizzle": True, "stages": 3}


@pytest.mark.parametrize("fmt", FORMATS)
def test_best(path, fmt):
    out = parse(run("best", "--db", path, "--format", fmt), fmt)
    if fmt == "table":
        assert "1.53x" in out and "tile_m=128" in out and "torch.nn.functional.linear" in out
        return
    assert len(out) == 3
    by = {(r["workload"], r["target"]): r for r in out}
    r = by[(W1.name, H100.key)]
    assert float(r["median_us"]) == 7.5 and float(r["baseline_us"]) == 11.5
    assert float(r["speedup"]) == pytest.approx(11.5 / 7.5)
    assert float(by[(W2.name, H100.key)]["speedup"]) == pytest.approx(4.5 / 3.0)
    cpu = by[(W1.name, CPU.key)]
    assert cpu["speedup"] in (None, "") and cpu["baseline"] in (None, "")
    assert len(parse(run("best", "linear", "--db", path, "--format", fmt, "--target", CPU.key),
                     fmt)) == 1
    assert not parse(run("best", "conv2d", "--db", path, "--format", fmt), fmt)


def test_best_op_conflict(path):
    out = run("best", "linear", "--op", "conv2d", "--db", path, ok=False)
    assert "contradicts" in out


@pytest.mark.parametrize("fmt", FORMATS)
def test_stats(path, fmt):
    out = parse(run("stats", "--db", path, "--format", fmt), fmt)
    if fmt == "table":
        assert "by_status.ok" in out and "schema_version" in out
    elif fmt == "json":
        assert out["records"] == 8 and out["by_status"]["ok"] == 5 and out["schema_version"] == SCHEMA_VERSION
    else:
        m = {r["metric"]: r["value"] for r in out}
        assert m["records"] == "8" and m["by_status.timeout"] == "1" and m["baselines"] == "3"


@pytest.mark.parametrize("name", ["h.jsonl", "h.jsonl.xz"])
def test_export_import(path, dlight_path, tmp_path, name):
    p = tmp_path / name
    assert "exported 11 lines" in run("export", p, "--db", dlight_path)
    fresh = tmp_path / "new" / "fresh.db"
    out = run("import", p, "--db", fresh)
    assert "imported 11 new, skipped 0" in out and "shapetune db verify" in out
    assert "imported 0 new, skipped 11" in run("import", p, "--db", fresh)
    with TuningDB(dlight_path) as a, TuningDB(fresh) as b:
        assert sorted(a.results(), key=lambda r: r.uid) == sorted(b.results(), key=lambda r: r.uid)
    assert {r["trust"] for r in json.loads(run("list", "--db", fresh, "--format", "json"))} == {"imported"}
    assert json.loads(run("best", "--db", fresh, "--format", "json")) == []  # nothing re-verified yet
    # this machine (llvm) is neither target: nothing of the file could be served here
    assert "nothing to re-verify" in run("verify", "--db", fresh)
    run("export", tmp_path / "mma.jsonl", "--db", path)  # tests/shapetune/_db_history.py's made-up template "mma"
    assert "line 1 rejected: unknown template 'mma'" in run("import", tmp_path / "mma.jsonl", "--db", fresh,
                                                            ok=False)
    assert "exported 1 lines" in run("export", tmp_path / "cpu.jsonl", "--target", CPU.key,
                                     "--db", path)
    assert "exported 0 lines" in run("export", tmp_path / "none.jsonl", "--op", "conv2d",
                                     "--db", path)


def test_import_malformed(dlight_path, tmp_path):
    p = tmp_path / "h.jsonl"
    run("export", p, "--db", dlight_path)
    p.write_text(p.read_text() + "{oops\n")
    fresh = tmp_path / "fresh.db"
    out = run("import", p, "--db", fresh, ok=False)
    assert "line 12" in out and "nothing imported" in out
    assert not fresh.exists()  # a failed import into a new path leaves no DB behind


def test_errors(path, tmp_path):
    assert "no record 'zzz'" in run("show", "zzz", "--db", path, ok=False)
    missing = tmp_path / "missing.db"
    for cmd in (["list"], ["best"], ["stats"], ["show", "1"], ["export", tmp_path / "x.jsonl"], ["verify"]):
        assert "no tuning DB" in run(*cmd, "--db", missing, ok=False)
    assert not missing.exists()
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"garbage" * 1000)
    out = run("list", "--db", bad, ok=False)
    assert "Error:" in out and str(bad) in out and len(out.strip().splitlines()) == 1
    c = sqlite3.connect(path)
    c.execute("UPDATE meta SET value='7' WHERE key='schema_version'")
    c.commit()
    c.close()
    assert "schema version 7" in run("stats", "--db", path, ok=False)
    assert "does not exist" in run("import", tmp_path / "nope.jsonl", "--db", path, ok=False)


def test_default_db_from_env(path, monkeypatch):
    monkeypatch.setenv("SHAPETUNE_DB", path)
    assert len(json.loads(run("list", "--format", "json"))) == 8


def test_main_cli_has_db():
    cli = pytest.importorskip("shapetune.cli")
    assert cli.main.commands.get("db") is db


def test_shape_workload_for_every_op():
    """`db best OP --shape` builds the workload a call of OP at that shape makes, for every family."""
    from shapetune.ops.attention import attention_workload
    from shapetune.ops.conv import conv2d_workload
    from shapetune.ops.norm import group_norm_workload
    from shapetune.cli.db_cmd import shape_workload
    from shapetune.ops.linear import linear_workload
    from shapetune.ops.geglu import geglu_workload

    f16 = "float16"
    assert shape_workload("linear", "m=154,n=320,k=768", f16, False) == linear_workload(154, 320, 768, f16, False)
    assert shape_workload("attention", "b=2,sq=4096,skv=77,h=8,d=40", f16, True) == \
        attention_workload(2, 4096, 77, 8, 40, f16)
    assert shape_workload("group_norm", "n=2,hw=4096,c=320,silu=1", f16, True) == \
        group_norm_workload(2, 4096, 320, dtype=f16, silu=True)
    assert shape_workload("conv2d", "n=2,h=8,w=8,ci=64,co=32,kh=1,kw=1,padding=0", f16, False) == \
        conv2d_workload(2, 8, 8, 64, 32, 1, 1, padding=0, dtype=f16, bias=False)
    assert shape_workload("geglu", "m=77,f=64,k=32", f16, True) == geglu_workload(77, 64, 32, f16)


def test_best_shape_other_ops_and_errors(path):
    out = json.loads(run("best", "attention", "--db", path, "--target", CPU.key, "--shape",
                         "b=1,sq=20,skv=77,h=2,d=16", "--format", "json"))
    assert out[0]["answer"] == "fallback" and out[0]["cause"] == "not_tuned"
    assert out[0]["bucket"] == "attention_b1-1_sq17-32_skv65-128_h2_d16_f32"  # batch bucketed too
    assert "needs skv, h, d" in run("best", "attention", "--db", path, "--target", CPU.key,
                                    "--shape", "b=1,sq=20", ok=False)
    assert "unknown: q" in run("best", "layer_norm", "--db", path, "--target", CPU.key,
                               "--shape", "m=3,c=4,q=1", ok=False)
    assert "one of" in run("best", "nonsense", "--db", path, "--target", CPU.key, "--shape", "m=1", ok=False)


def test_import_several_files_each_all_or_nothing(dlight_path, tmp_path):
    """`shapetune db import a b c` imports in order, each file all or nothing; a bad one stops it and
    the error names it; what came before stays imported."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    run("export", a, "--db", dlight_path)
    run("export", b, "--db", dlight_path, "--op", "linear")
    fresh = tmp_path / "fresh.db"
    out = run("import", a, b, "--db", fresh)
    assert f"({a})" in out and f"({b})" in out and "skipped 0 already" in out, out
    assert "imported 0 new" in out.splitlines()[1], out  # b: a's linear records again
    bad = tmp_path / "bad.jsonl"
    bad.write_text(a.read_text() + "{oops\n")
    other = tmp_path / "other.db"
    out = run("import", b, bad, a, "--db", other, ok=False)
    assert str(bad) in out and "line 12" in out and "the 1 file(s) before it were imported" in out, out
    with TuningDB(other) as d1, TuningDB(tmp_path / "only_b.db", create=True) as d2:
        d2.import_jsonl(b)
        assert len(d1.results()) == len(d2.results()) > 0  # b, and nothing of bad or a
