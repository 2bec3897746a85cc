"""scripts/bench_buckets.py's shape lists: every family the registry buckets has one, and each shape (GPU
and CPU lists) lies in a bucket without being its representative, so the efficiency it reports is measured
off the shape the bucket kernel was scored at."""

from __future__ import annotations

import pytest

from shapetune.buckets import DEFAULT
from tests._scripts import script

bb = script("bench_buckets")


def test_every_bucketed_family_has_shapes():
    assert {op for op, _ in DEFAULT.dims} <= set(bb.FAMILIES)


@pytest.mark.parametrize("family", sorted(bb.FAMILIES))
@pytest.mark.parametrize("gpu", [True, False], ids=["gpu", "cpu"])
def test_shapes_are_off_their_buckets_representative(family, gpu):
    shapes = bb.FAMILIES[family][0 if gpu else 1]("float16" if gpu else "float32")
    assert shapes and len(set(shapes)) == len(shapes)
    for s in shapes:
        assert s.op == family and not s.dynamic
        b = DEFAULT.bucket_of(s)
        assert b is not None and b.covers(s), s.name
        assert b.dims != s.dims, f"{s.name} is its bucket's representative"


def test_a_family_run_and_its_benchmarks_section(tmp_path):
    """A real llvm run of one family (1 trial per search), then the per-family table
    scripts/make_benchmarks.py renders from its JSON (none without it)."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    repo = bb.Path(bb.__file__).resolve().parents[1]
    out = tmp_path / "bench_buckets_geglu_h200.json"
    pattern = str(tmp_path / "bench_buckets_{family}_h200.json")
    p = subprocess.run([sys.executable, str(repo / "scripts" / "bench_buckets.py"), "--family", "geglu,layer_norm",
                        "--trials", "1", "--batch", "1", "--db", str(tmp_path / "b.db"), "--json", pattern],
                       capture_output=True, text=True, timeout=900, env={**os.environ, "SHAPETUNE_TARGET": "llvm"})
    assert p.returncode == 0, p.stderr[-3000:]
    d = json.loads(out.read_text())
    # one file per family, each with the command that reruns that family alone
    assert d["op"] == "geglu" and d["command"].startswith("python scripts/bench_buckets.py --family geglu ")
    assert f"--json {out}" in d["command"]
    assert len(d["rows"]) == 2 and all(r["exact_us"] > 0 and r["bucket_us"] > 0 for r in d["rows"])
    assert all("[" in r["exact_candidate"] and "[" in r["bucket_candidate"] for r in d["rows"])  # template[knobs] timed
    ln = json.loads((tmp_path / "bench_buckets_layer_norm_h200.json").read_text())
    assert ln["op"] == "layer_norm" and len(ln["rows"]) == 2 and ln["min_efficiency"] > 0

    mb = script("make_benchmarks")
    shutil.copytree(repo / "tuning_logs", tmp_path / "tuning_logs")
    for card in ("h200", "h100"):  # the committed family runs (linear's bench_buckets_h200.json stays)
        for f in (tmp_path / "tuning_logs" / "bench").glob(f"bench_buckets_*_{card}.json"):
            f.unlink()
    without = mb.render(tmp_path)
    assert "### Per family" not in without
    shutil.copy(out, tmp_path / "tuning_logs" / "bench" / out.name)
    text = mb.render(tmp_path)
    sec = text[text.index("### Per family"):]
    g = d["geomean_efficiency"]
    assert f"| geglu | {d['target']['device_name']} | 2 | 1 | {g:.3f} |" in sec  # the card of the run's target
    assert "### geglu: `python scripts/bench_buckets.py --family geglu" in sec
