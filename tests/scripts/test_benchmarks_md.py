"""scripts/make_benchmarks.py: BENCHMARKS.md is exactly what the committed JSON generates (no TVM, no GPU)."""

from __future__ import annotations

import difflib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from shapetune.ops.linear import linear_workload

REPO = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("make_benchmarks", REPO / "scripts" / "make_benchmarks.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


mb = _load()
COMMITTED = mb.render(REPO)  # rendered once; tests that edit data render their own copy


@pytest.fixture
def logs_copy(tmp_path):
    """A writable copy of tuning_logs/ under tmp_path; returns (root, edit) where edit(rel, fn) rewrites a JSON."""
    shutil.copytree(REPO / "tuning_logs", tmp_path / "tuning_logs")

    def edit(rel, fn):
        p = tmp_path / "tuning_logs" / rel
        d = json.loads(p.read_text())
        fn(d)
        p.write_text(json.dumps(d))

    return tmp_path, edit


def section(text: str, title: str) -> str:
    """The text of the section whose heading starts with `## title`."""
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_committed_benchmarks_md_is_what_the_json_generates():
    want = COMMITTED
    have = (REPO / "BENCHMARKS.md").read_text()
    diff = "".join(difflib.unified_diff(have.splitlines(True), want.splitlines(True), "BENCHMARKS.md", "generated"))
    assert have == want, f"BENCHMARKS.md is out of date: run python scripts/make_benchmarks.py\n{diff[:4000]}"


def test_geomean_is_geometric_not_arithmetic():
    assert mb.geomean([1.0, 4.0]) == pytest.approx(2.0)  # arithmetic mean: 2.5
    assert mb.geomean([0.25, 1.0, 4.0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no values"):
        mb.geomean([])
    with pytest.raises(ValueError, match="positive"):
        mb.geomean([1.0, 0.0])


def test_linear_summary_figure_is_the_geomean_of_the_table():
    res = mb.Logs(REPO).summary_results(mb.LINEAR)
    ratios = [m.vendor_us / m.row["best_us"] for m in res]
    row = next(line for line in COMMITTED.splitlines() if line.startswith("| linear (GEMM) |"))
    assert f"| {mb.geomean(ratios):.2f}x cuBLAS |" in row
    assert f"{sum(ratios) / len(ratios):.2f}x" not in row  # the hand-written 0.49x was the arithmetic mean


def test_a_row_added_to_a_summary_changes_the_tables(logs_copy):
    root, edit = logs_copy
    w = linear_workload(777, 320, 640, "float16", bias=True)
    new = {"workload": "stored name, not used", "workload_json": w.to_json(), "key": w.key, "best_us": 10.0,
           "best": "gemm_cuda_wmma[frag_m=1]", "dlight_us": 20.0, "vendor_us": 30.0, "by_status": {"ok": 32}}
    edit(mb.LINEAR, lambda d: d["rows"].append(new))
    before, after = COMMITTED, mb.render(root)
    lin = section(after, "Linear")
    assert f"| {w.name} | 10.00 | 20.00 | 30.00 | 3.00 | shapetune |" in lin
    assert "stored name" not in after
    assert "| linear (GEMM) | 24 | 32 |" in after and "| linear (GEMM) | 23 | 32 |" in before
    assert "1 of 24 measured at least 5% faster than cuBLAS (the registry's margin)" in lin


def test_names_come_from_the_workload_json_not_the_stored_string(logs_copy):
    root, edit = logs_copy
    res = mb.Logs(REPO).summary_results(mb.GEGLU)

    def rename(d):
        for r in d["rows"]:
            r["workload"] = "geglu_stale_name"
    edit(mb.GEGLU, rename)
    text = mb.render(root)
    assert "geglu_stale_name" not in text
    assert all(f"| {m.workload.name} |" in section(text, "GEGLU") for m in res)


def test_every_summary_row_finds_its_workload_json():
    """Names come from Workload.name today: no row falls back to its stored name string."""
    logs = mb.Logs(REPO)
    rows = [r for rel in (mb.LINEAR, mb.GEGLU, mb.CONV, mb.ATTENTION, mb.NORMS) for run in logs.runs(rel)
            for r in run["rows"]] + logs.load(mb.NORMS_BENCH)["rows"] + logs.load(mb.CONV_BENCH)["rows"] + logs.load(mb.METASCHEDULE)["rows"]
    assert rows and all(logs.workload(r) is not None and logs.workload(r).key == r["key"] for r in rows)


def test_conv_table_is_the_one_run_rebenchmark_and_reports_the_tuning_runs(logs_copy):
    root, edit = logs_copy
    conv = section(COMMITTED, "conv2d")
    bench = json.loads((REPO / "tuning_logs" / mb.CONV_BENCH).read_text())
    rows = [line for line in conv.splitlines() if line.startswith("| conv2d_")]
    assert len(rows) == len(bench["rows"]) == 43 and len(set(rows)) == 43  # one row per key, unique names
    assert " † |" not in conv and "6 of 36" in conv and "the slowest always in run1" in conv

    r0 = bench["rows"][0]
    name = mb.Logs(REPO).name(r0)

    def cudnn_slow(d):  # the first workload's cuDNN 10x slower in the benchmark run: ratio and dispatch follow
        d["rows"][0]["vendor_us"] *= 10
        d["rows"][0]["dispatch"] = "tuned"
    edit(mb.CONV_BENCH, cudnn_slow)
    line = next(x for x in section(mb.render(root), "conv2d").splitlines() if x.startswith(f"| {name} |"))
    assert f"| {r0['vendor_us'] * 10:.2f} | {r0['vendor_us'] * 10 / r0['tuned_us']:.2f} |" in line
    assert line.endswith("| shapetune |")

    def agree(d):  # the tuning runs measured cuDNN alike: nothing to report about them
        latest = {r["key"]: r["vendor_us"] for run in d["runs"] for r in run["rows"]}
        for run in d["runs"]:
            for r in run["rows"]:
                r["vendor_us"] = latest[r["key"]]
    edit(mb.CONV, agree)
    assert "differ by more than" not in section(mb.render(root), "conv2d")

    edit(mb.CONV, lambda d: d.update(runs=[r for r in d["runs"] if r["run"].startswith("run2")]))
    assert "tuning runs' own times" not in section(mb.render(root), "conv2d")

    def failed(d):  # a row that failed re-verification cannot be tabled as a measurement
        d["rows"][1].update(status="wrong_result")
    edit(mb.CONV_BENCH, failed)
    with pytest.raises(ValueError, match="failed re-verification"):
        mb.render(root)


def _new_norms_shape(d):
    """bench_tuned.py's new JSON (its docstring): bytes, GB/s, every torch baseline, a large copy; the last row
    failed re-verification."""
    for r in d["rows"]:
        op = "group_norm" if r["workload"].startswith("group_norm") else "layer_norm"
        name = "torch.nn.functional." + op
        nb = 4_000_000
        r.update(bytes=nb, copy_bytes=nb + 256, copy_gbps=(nb + 256) / r["copy_us"] / 1e3,
                 tuned_gbps=nb / r["tuned_us"] / 1e3, vendor_gbps=nb / r["vendor_us"] / 1e3,
                 vendors={name: r["vendor_us"]})
        r.update(tuned_frac_of_copy=r["tuned_gbps"] / r["copy_gbps"],
                 vendor_frac_of_copy=r["vendor_gbps"] / r["copy_gbps"])
        if op == "group_norm":
            r["vendors"][name + "[nchw]"] = r["vendor_us"] / 2
            r["speedup_vs_nchw"] = r["vendor_us"] / 2 / r["tuned_us"]
    d["rows"][0]["vendors"]["torch.nn.functional.group_norm[nchw]"] = None  # that baseline failed
    bad = d["rows"][-1]
    bad.update(status="wrong_result", error="input 0 changed")
    del bad["tuned_us"]
    d["large_copy"] = {"bytes": 2 << 30, "us": 500.0, "gbps": 4295.0}


def test_norms_section_renders_bench_tuneds_json_shape(logs_copy):
    root, edit = logs_copy
    edit(mb.NORMS_BENCH, _new_norms_shape)
    new = section(mb.render(root), "GroupNorm")
    head = next(line for line in new.splitlines() if line.startswith("| workload |"))
    for col in ("torch µs", "torch[nchw] µs", "ratio vs torch[nchw]", "copy GB/s", "shapetune GB/s"):
        assert f"| {col} |" in head
    assert "(2.00 GiB of read + write traffic) reached 4295 GB/s" in new
    assert "an aligned device-to-device copy" in new and "as eager diffusers runs it" in new
    d = json.loads((root / "tuning_logs" / mb.NORMS_BENCH).read_text())
    bad = d["rows"][-1]
    assert f"Not timed, left out of the table and geomeans: `{mb.Logs(REPO).name(bad)}` (wrong_result)" in new
    assert f"| {mb.Logs(REPO).name(bad)} |" not in new and "Geomeans over the 21 workloads" in new
    gn = [r for r in d["rows"][1:] if r["workload"].startswith("group_norm")]
    assert f"{mb.geomean(r['vendor_us'] / 2 / r['tuned_us'] for r in gn):.2f}x torch[nchw]" in new
    assert "x torch (channels_last)" in new
    first = next(line for line in new.splitlines() if line.startswith(f"| {mb.Logs(REPO).name(d['rows'][0])} |"))
    assert "|  |  |" in first  # the failed nchw baseline: blank, not 0 or n/a


def test_cost_model_tolerates_added_fields(logs_copy):
    root, edit = logs_copy

    def add(d):
        for r in d["rows"]:
            r["new_feature@1"] = 0.5
        d["summary"]["all"]["new_feature@1"] = 0.5
        d["features"] = ["epilogue", "layout"]
    edit(mb.COST_MODEL, add)
    assert section(mb.render(root), "Cost model") == section(COMMITTED, "Cost model")


def test_check_mode_exits_nonzero_with_a_diff(tmp_path, monkeypatch, capsys):
    out = tmp_path / "B.md"
    out.write_text(COMMITTED.replace("0.47", "0.49", 1))
    monkeypatch.setattr(sys, "argv", ["make_benchmarks.py", "--check", "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        mb.main()
    assert e.value.code and "out of date" in str(e.value.code)
    assert "+| linear (GEMM) | 23 | 32 | 0.47x cuBLAS" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["make_benchmarks.py", "--out", str(out)])
    mb.main()
    assert out.read_text() == COMMITTED


def test_command_must_agree_with_the_trial_count(logs_copy):
    root, edit = logs_copy
    edit(mb.GEGLU, lambda d: d.update(trials=64))
    with pytest.raises(ValueError, match="disagrees with trials"):
        mb.render(root)



def test_yardstick_comparison_is_computed_from_its_run(logs_copy):
    root, edit = logs_copy
    assert "old / aligned time" in section(COMMITTED, "GroupNorm")

    def slower_old(d):  # the odd-size copy 1.29x slower everywhere (the review's claim)
        for r in d["rows"]:
            r["old_over_aligned"] = 1.29
    edit(mb.COPY_YARDSTICK, slower_old)
    assert "old / aligned time 1.290 geomean (1.290-1.290)" in section(mb.render(root), "GroupNorm")
    (root / "tuning_logs" / mb.COPY_YARDSTICK).unlink()
    assert "old / aligned" not in section(mb.render(root), "GroupNorm")


def test_the_vae_grid_job_renders_its_budget_and_estimate(logs_copy):
    root, _ = logs_copy
    grid = section(COMMITTED, "Shape-grid buckets")
    d = json.loads((REPO / "tuning_logs" / mb.VAE_GRID).read_text())
    e = d["estimate"]
    timed = [r for r in d["rows"] if r.get("best_us") and r.get("vendor_us")]
    assert f"timed {e['tasks_timed']} of the {d['meta']['buckets']} buckets" in grid
    assert (f"{e['vendor_ms_per']:.1f} ms on torch's kernels, {e['served_ms_per']:.2f} ms as served; "
            f"{sum(r['calls'] for r in timed):g} of the {d['meta']['calls_in_buckets']:g} op calls") in grid
    assert "| group_norm + silu | 16 | 51 |" in grid  # calls are floats in the summary: printed as counts
    (root / "tuning_logs" / mb.VAE_GRID).unlink()
    assert "VAE decoder" not in section(mb.render(root), "Shape-grid buckets")


def test_per_family_bucket_runs_of_either_card_state_the_card_and_the_note():
    sec = COMMITTED[COMMITTED.index("### Per family"):]
    files = sorted((REPO / "tuning_logs" / "bench").glob("bench_buckets_*_h100.json"))
    assert files
    notes = json.loads((REPO / "tuning_logs" / mb.PROVENANCE).read_text())["files"]
    for p in files:
        d = json.loads(p.read_text())
        assert f"| {d['op']} | {d['target']['device_name']} | {len(d['rows'])} | {d['trials']} |" in sec
        if note := notes.get(f"bench/{p.name}", {}).get("note"):
            assert f"- {note}" in sec
    assert "is a small budget against the 32 of the linear table above" in sec


def test_the_next_runs_sections_render_where_their_json_exists(logs_copy):
    """bench_e2e's fusion A/B (shapetune_noaln, shapetune_noshift) and bench_pipeline --pipelines each get a
    section once their JSON is committed: here a copy of a committed run with those modes / pipelines."""
    root, _ = logs_copy
    bench = root / "tuning_logs" / "bench"
    e2e = json.loads((bench / "bench_e2e_h100_isolated.json").read_text())
    for mode in ("shapetune_noaln", "shapetune_noshift"):
        e2e["rows"][mode] = dict(e2e["rows"]["shapetune"])
    e2e["args"]["modes"] += ",shapetune_noaln,shapetune_noshift"
    (root / "tuning_logs" / mb.E2E_FUSIONS).write_text(json.dumps(e2e))
    pipe = json.loads((bench / "bench_pipeline_h100.json").read_text())
    pipe["rows"] = [dict(r, pipeline=k) for k in ("text2img", "sdxl") for r in pipe["rows"] if r["mode"] != "compile_ro"]
    (root / "tuning_logs" / mb.PIPELINE_ALL).write_text(json.dumps(pipe))
    prov = json.loads((bench / "provenance.json").read_text())
    for rel, src in ((mb.E2E_FUSIONS, "bench/bench_e2e_h100_isolated.json"), (mb.PIPELINE_ALL, mb.PIPELINE_H100)):
        prov["files"][rel] = prov["files"][src]
    (bench / "provenance.json").write_text(json.dumps(prov))
    text = mb.render(root)
    e2e_md = section(text, "End to end")
    assert "### The newest run: the between-op fusions" in e2e_md
    assert "kernels.optimize(unet, fuse_norm_shift=False): CUDA graphs" in e2e_md
    assert "### Every pipeline:" in e2e_md and "| StableDiffusionXLPipeline | 1x512 | kernels.optimize(pipe) |" in e2e_md
