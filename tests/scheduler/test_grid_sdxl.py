"""SDXL's shape grid: one extraction per shape class (scheduler.extract.shape_class) gives SDXL's UNet and VAE
the buckets and calls of one extraction per shape, and scripts/tune_sd_grid.py --models sdxl tunes a tiny
SDXL grid's buckets on llvm under a budget."""

from __future__ import annotations

import json

import pytest

from scheduler import extract, jobs
from scheduler.extract import parse_grid, shape_class
from shapetune.db import TuningDB
from tests._scripts import script
from tests.scheduler._grid_helpers import summed

# batches 3 and 4 share their BATCH bucket, P and b x P buckets, not the text rows' (231 vs 308); 4 x 512x1024
# and 4 x 1024x512 share every bucket but conv's (h and w exact); conv's class of 3 and 4 x 512x1024 is one
SUB = [(3, 512, 1024), (4, 512, 1024), (4, 1024, 512)]
FAMILIES = tuple(extract.FAMILY_RULES)  # conv included: its classes keep h and w
MODELS = {"sdxl_unet": 20.0, "sdxl_vae": 1.0}


@pytest.fixture(scope="module")
def brute():
    """One extraction per shape, per SDXL model."""
    return {m: jobs.grid_bucket_calls(SUB, FAMILIES, {m: w}, shortcut=False) for m, w in MODELS.items()}


def test_sdxl_shape_classes_give_the_brute_force_buckets_and_calls(brute):
    got = jobs.grid_bucket_calls(SUB, FAMILIES, MODELS)
    assert all(b.passes == len(SUB) for b in brute.values()) and got.passes == 2 * (2 + 2)  # (rest, conv) classes
    want, outside = summed(brute["sdxl_unet"], brute["sdxl_vae"])
    assert got.calls == want and got.outside == outside
    ops = {w.op for w in brute["sdxl_unet"].calls}
    assert ops == {"linear", "geglu", "group_norm", "layer_norm", "add_layer_norm", "conv2d", "attention", "gelu_gate",
                   "bias_add"}
    # the added conditions' GEMM (m = b: bucket [1, 16]), weighted by the UNet's 20 steps, once per shape
    add = [(w, n) for w, n in want.items() if w.op == "linear" and w.dim["k"] == 2816]
    assert len(add) == 1 and add[0][1] == 20 * len(SUB)


def test_a_coarser_class_key_is_caught_on_sdxl(brute, monkeypatch):
    """Without the text rows' term, batches 3 and 4 share a class, and cross-attention's k / v GEMMs over
    SDXL's 2048-wide context (m = 77 b) land in the wrong bucket: the brute-force comparison must see it."""
    def coarse(batch, height, width, exact_hw, seq=77):
        key = shape_class(batch, height, width, exact_hw, seq)
        return key if exact_hw else key[:1] + key[2:]

    monkeypatch.setattr(extract, "shape_class", coarse)
    got = jobs.grid_bucket_calls(SUB, ("linear",), {"sdxl_unet": 20.0})
    want = {w: n for w, n in brute["sdxl_unet"].calls.items() if w.op == "linear"}
    assert got.calls != want and sum(got.calls.values()) == sum(want.values())
    assert {w.key for w in want} - {w.key for w in got.calls}  # batch 4's text-row buckets, lost


def _run(argv, capsys):
    tune_sd_grid = script("tune_sd_grid")
    tune_sd_grid.main(argv)
    return tune_sd_grid, capsys.readouterr().out


def test_default_grids_and_bad_models():
    tune_sd_grid = script("tune_sd_grid")
    assert extract.default_grid(["sdxl_unet"]) == extract.default_grid(["sdxl_unet", "sdxl_vae"]) == "1-2x1024"
    assert extract.default_grid(["unet", "vae"]) == "1-8x256-1024"
    assert extract.parse_models("sdxl,sdxl_vae") == ["sdxl_unet", "sdxl_vae"]
    for bad, msg in ((["--models", "sdxl,unet"], "mixes SD 1.5 and SDXL"), (["--models", "sdxl_vea"], "unknown model")):
        with pytest.raises(SystemExit, match=msg):
            tune_sd_grid.main(bad + ["--dry-run"])


def test_tiny_sdxl_grid_job_on_llvm(tmp_path, capsys, monkeypatch):
    """`--models sdxl` on the tiny SDXL UNet and VAE (batch 1, 64 px, norms; llvm, 2 trials per bucket) under
    a 3 s budget: the scheduler holds every grid bucket with its grid calls as weight (the UNet's x
    --unet-steps), stops near the budget with some tuned, and the export and JSON summary hold what it measured."""
    monkeypatch.setenv("SHAPETUNE_TARGET", "llvm")
    db, export, summary = tmp_path / "grid.db", tmp_path / "grid.jsonl.xz", tmp_path / "grid.json"
    _, out = _run(["--tiny", "--models", "sdxl", "--grid", "1x64", "--families", "norms", "--unet-steps", "3",
                   "--trials", "2", "--batch", "2", "--budget", "3s", "--template", "norm_llvm",
                   "--template", "add_norm_llvm",
                   "--db", str(db), "--export", str(export), "--json", str(summary)], capsys)
    grid = jobs.grid_bucket_calls(parse_grid("1x64"), ("norms",), {"sdxl_unet": 3.0, "sdxl_vae": 1.0}, "float32",
                                  tiny=True)
    doc = json.loads(summary.read_text())
    assert doc["meta"]["models"] == {"sdxl_unet": 3.0, "sdxl_vae": 1.0} and doc["meta"]["grid"] == "1x64"
    assert {r["key"]: r["calls"] for r in doc["rows"]} == {w.key: n for w, n in grid.calls.items()}
    assert {w.op for w in grid.calls} == {"group_norm", "layer_norm", "add_layer_norm"}
    reached = [r for r in doc["rows"] if r["rounds"]]
    assert reached and all(r["trials"] >= 1 for r in reached)
    assert doc["estimate"]["wall_s"] < 3 + 10  # the budget, and at most the round that was running
    assert doc["estimate"]["per"] == 1 and doc["estimate"]["vendor_ms_per"] > 0
    assert "grid 1x64: 1 shapes x sdxl_unet x3+sdxl_vae x1" in out and "ms per grid shape per GPU-minute" in out
    with TuningDB(tmp_path / "read.db") as back:
        back.merge_from(export)
        ok = {r.workload.key for _, r in back.iter_results(status="ok")}
    assert ok and ok <= set(r["key"] for r in doc["rows"])
