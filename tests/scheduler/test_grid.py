"""Shape grids (scheduler.extract.shape_class, scheduler.jobs.grid_bucket_calls): the buckets and calls from
one extraction per shape class equal those from one extraction per shape, and scripts/tune_sd_grid.py
tunes a tiny grid's buckets on llvm under a budget, exporting as it goes."""

from __future__ import annotations

import json

import pytest

from scheduler import extract, jobs
from scheduler.extract import clog2, parse_grid, shape_class
from shapetune.db import TuningDB
from tests._scripts import script
from tests.scheduler._grid_helpers import summed

# batches 3 and 4 share their BATCH bucket but not the text rows' (231 vs 308: [129, 256] vs [257, 512]);
# 256x1024 and 1024x256 share their positions with each other and with 512x512's class members
SUB = [(b, h, w) for b in (3, 4) for h in (256, 512, 1024) for w in (256, 1024)]
FAMILIES = tuple(extract.FAMILY_RULES)  # conv included: its classes keep h and w


@pytest.fixture(scope="module")
def brute():
    """One extraction per shape, per model."""
    return {m: jobs.grid_bucket_calls(SUB, FAMILIES, {m: 1.0}, shortcut=False) for m in ("unet", "vae")}


def test_shape_classes_give_the_brute_force_buckets_and_calls(brute):
    got = jobs.grid_bucket_calls(SUB, FAMILIES)
    assert all(b.passes == len(SUB) for b in brute.values())
    want, outside = summed(brute["unet"], brute["vae"])
    assert got.calls == want and got.outside == outside
    # since the pow2 edges reach 2^20 (2026-12-03) the VAE's full-resolution passes at 1024² have buckets too
    assert len(want) > 500 and not outside
    ops = {w.op for w in want}
    assert ops == {"linear", "geglu", "group_norm", "layer_norm", "add_layer_norm", "conv2d", "attention", "gelu_gate",
                   "bias_add"}


def test_calls_beyond_every_bucket_are_counted_the_same_by_the_shortcut():
    """At 2048² the VAE decoder's last level has 2^22 positions, beyond the pow2 edges: its group_norm and
    bias_add calls are counted outside, per op, as one extraction per shape counts them."""
    shapes = [(1, 2048, 2048), (2, 2048, 1024)]
    got = jobs.grid_bucket_calls(shapes, ("norms", "elementwise"), {"vae": 1.0})
    want = jobs.grid_bucket_calls(shapes, ("norms", "elementwise"), {"vae": 1.0}, shortcut=False)
    assert got.calls == want.calls and got.outside == want.outside
    assert set(got.outside) == {"group_norm", "bias_add"} and got.calls


def test_a_coarser_class_key_is_caught(brute, monkeypatch):
    """Without the text rows' term, batches 3 and 4 share a class, and cross-attention's k / v GEMMs
    (m = 77 b) land in the wrong bucket: the comparison with one extraction per shape must see it."""
    def coarse(batch, height, width, exact_hw, seq=77):
        return shape_class(batch, height, width, exact_hw, seq)[:1] + shape_class(batch, height, width, exact_hw, seq)[2:]

    monkeypatch.setattr(extract, "shape_class", coarse)
    got = jobs.grid_bucket_calls(SUB, ("linear",), {"unet": 1.0})
    want = {w: n for w, n in brute["unet"].calls.items() if w.op == "linear"}
    assert got.calls != want and sum(got.calls.values()) == sum(want.values())


def test_class_keys():
    assert [clog2(v) for v in (1, 2, 3, 4, 5, 16, 17)] == [0, 1, 2, 2, 3, 4, 5]
    assert shape_class(2, 256, 1024, False) == shape_class(2, 512, 512, False) != shape_class(2, 512, 576, False)
    assert shape_class(5, 512, 512, False) == shape_class(6, 512, 512, False) != shape_class(7, 512, 512, False)
    assert shape_class(3, 512, 512, True) == shape_class(4, 512, 512, True) != shape_class(4, 512, 576, True)
    with pytest.raises(ValueError, match="multiples of 64"):
        shape_class(1, 500, 512, False)


def test_parse_grid():
    shapes = parse_grid("1-8x256-1024")
    assert len(shapes) == 8 * 13 * 13 and (1, 256, 1024) in shapes and (8, 1024, 320) in shapes
    assert parse_grid("2,4x512x512,768") == [(2, 512, 512), (2, 512, 768), (4, 512, 512), (4, 512, 768)]
    for bad in ("1-8x250-1024", "0-2x256", "1x256x512x64", "axb", "2x512-256"):
        with pytest.raises(ValueError, match="--grid"):
            parse_grid(bad)


def _run(argv, capsys):
    tune_sd_grid = script("tune_sd_grid")
    tune_sd_grid.main(argv)
    return capsys.readouterr().out


def test_tiny_grid_job_on_llvm(tmp_path, capsys, monkeypatch):
    """A tiny grid (batch 1-2, 64 px) of the tiny VAE's norms tuned on llvm, 4 trials per
    bucket: every grid bucket gets its warm-up round, with its grid calls as weight; the export and
    the JSON summary hold what was measured, the end-to-end estimate per grid shape is printed; a
    rerun with --skip-tuned on that export leaves the buckets it holds out."""
    monkeypatch.setenv("SHAPETUNE_TARGET", "llvm")
    db, export, summary = tmp_path / "grid.db", tmp_path / "grid.jsonl.xz", tmp_path / "grid.json"
    args = ["--tiny", "--grid", "1-2x64", "--models", "vae", "--families", "norms", "--trials", "4",
            "--batch", "4", "--budget", "120s", "--template", "norm_llvm"]
    out = _run(args + ["--db", str(db), "--export", str(export), "--json", str(summary)], capsys)
    grid = jobs.grid_bucket_calls(parse_grid("1-2x64"), ("norms",), {"vae": 1.0}, "float32", tiny=True)
    doc = json.loads(summary.read_text())
    assert {r["key"]: r["calls"] for r in doc["rows"]} == {w.key: n for w, n in grid.calls.items()}
    assert len(grid.calls) >= 4 and all(r["rounds"] >= 1 and r["trials"] >= 1 for r in doc["rows"])
    # where each bucket's time went: its rounds' wall time, of it its share of the warm-up builds
    assert all(0 < r["warmup_build_s"] < r["seconds"] for r in doc["rows"])
    est = doc["estimate"]
    assert est["per"] == 2 and est["vendor_ms_per"] > 0 and "gain_ms_per_gpu_min" in est
    assert "ms per grid shape per GPU-minute" in out
    served = sum(r["calls"] for r in doc["rows"] if r["served_us"] is not None)
    assert f"grid op calls in buckets this DB serves a tuned kernel for: {served:g} of " in out
    with TuningDB(tmp_path / "read.db") as back:
        back.merge_from(export)
        ok = {r.workload.key for _, r in back.iter_results(status="ok")}
    assert ok and ok <= set(r["key"] for r in doc["rows"])
    out = _run(args + ["--db", str(tmp_path / "again.db"), "--skip-tuned", str(export), "--dry-run"], capsys)
    assert f"{len(ok)} buckets already tuned" in out
