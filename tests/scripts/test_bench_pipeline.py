"""scripts/bench_pipeline.py: its shape grammar, a tiny CPU run over two shapes (one pipeline per mode, rows per
shape and mode, ratios against the same shape's eager), and the BENCHMARKS.md table made from that JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests._scripts import script

REPO = Path(__file__).resolve().parents[2]


def _table(tmp_path, out) -> str:
    """BENCHMARKS.md's pipeline table made from the run's JSON `out`, as committed under tuning_logs/bench."""
    mb = script("make_benchmarks")
    logs = mb.Logs(tmp_path)
    (logs.dir / "bench").mkdir(parents=True)
    (logs.dir / mb.PIPELINE).write_text(out.read_text())
    (logs.dir / "bench" / "provenance.json").write_text(json.dumps(
        {"files": {mb.PIPELINE: {"command": "python scripts/bench_pipeline.py --tiny", "machine": "cpu"}}}))
    return mb.pipeline_table(logs)


def test_shapes_parse():
    bp = script("bench_pipeline")
    assert bp.parse_shape("2x512") == (2, 512, 512)
    assert bp.parse_shape("1x512x768") == (1, 512, 768)
    assert bp.parse_shape("4x768", tiny=True) == (4, 96, 96)
    assert bp.shape_name((1, 512, 768)) == "1x512x768" and bp.shape_name((2, 64, 64)) == "2x64"
    for bad in ("512", "0x512", "1x512x768x2", "ax512"):
        with pytest.raises((SystemExit, ValueError)):
            bp.parse_shape(bad)


def test_tiny_run_rows_per_shape_and_mode(tmp_path):
    out = tmp_path / "pipe.json"
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_pipeline.py"), "--tiny", "--device", "cpu",
                        "--steps", "1", "--iters", "1", "--shapes", "1x512,2x512x768", "--modes", "eager,shapetune",
                        "--json", str(out)], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["shape"], r["mode"]) for r in rows] == [
        ("1x64", "eager"), ("2x64x96", "eager"), ("1x64", "shapetune"), ("2x64x96", "shapetune")]
    for r in rows:
        assert r["s"] > 0 and r["first_call_s"] > 0
        assert r["speedup_vs_eager"] == pytest.approx(
            next(e["s"] for e in rows if e["mode"] == "eager" and e["shape"] == r["shape"]) / r["s"])
    # the optimized pipeline's images match eager's at each shape (fp32 on the CPU: far above the 35 dB goal)
    assert all(r["psnr_vs_eager_db"] > 60 for r in rows if r["mode"] == "shapetune")

    md = _table(tmp_path, out)
    assert "| 2x64x96 | kernels.optimize(pipe) |" in md and "| 1x64 | eager |" in md


def test_isolate_runs_each_mode_in_its_own_process(tmp_path):
    """--isolate: a child process per mode, eager first; PSNR against the eager child's images."""
    out = tmp_path / "pipe.json"
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_pipeline.py"), "--tiny", "--device", "cpu",
                        "--steps", "1", "--iters", "1", "--shapes", "1x512", "--modes", "eager,shapetune",
                        "--isolate", "--json", str(out)], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["args"]["isolate"] and [(r["shape"], r["mode"]) for r in d["rows"]] == [("1x64", "eager"),
                                                                                     ("1x64", "shapetune")]
    st = d["rows"][1]
    assert st["psnr_vs_eager_db"] > 60 and st["speedup_vs_eager"] == pytest.approx(d["rows"][0]["s"] / st["s"])


def test_every_pipeline_of_issue_10_runs_and_matches_eager(tmp_path):
    """--pipelines: img2img, inpaint, AltDiffusion and SDXL (tiny, CPU), each eager and optimized: rows per
    pipeline and mode, ratios against that pipeline's eager, PSNR against its images; the table gets a
    pipeline column. An unknown pipeline is a one-line error."""
    out = tmp_path / "pipes.json"
    kinds = ["img2img", "inpaint", "alt", "sdxl"]
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_pipeline.py"), "--tiny", "--device", "cpu",
                        "--steps", "1", "--iters", "1", "--shapes", "1x512", "--modes", "eager,shapetune",
                        "--pipelines", ",".join(kinds), "--json", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["pipeline"], r["mode"]) for r in rows] == [(k, m) for k in kinds for m in ("eager", "shapetune")]
    for k in kinds:
        e, s = (next(r for r in rows if r["pipeline"] == k and r["mode"] == m) for m in ("eager", "shapetune"))
        assert s["speedup_vs_eager"] == pytest.approx(e["s"] / s["s"])
        assert 60 < s["psnr_vs_eager_db"] < float("inf")  # the same image, and not a copy of another pipeline's
        assert s["graphs"]["unet"]["cpu"] >= 2

    md = _table(tmp_path, out)
    assert "| StableDiffusionXLPipeline | 1x64 | kernels.optimize(pipe) |" in md
    assert "| AltDiffusionPipeline | 1x64 | eager |" in md

    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_pipeline.py"), "--tiny", "--device", "cpu",
                          "--pipelines", "text2img,upscale"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert bad.returncode != 0 and "--pipelines" in bad.stderr.strip().splitlines()[-1]
