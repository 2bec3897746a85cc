"""scripts/bench_e2e.py on the CPU: what a run cut short keeps."""

from __future__ import annotations

import json
import sys

import pytest

import kernels
from tests._scripts import script


def test_a_run_cut_short_keeps_every_shape_it_measured(tmp_path, monkeypatch):
    """A time limit mid-mode (a slow torch.compile) keeps that mode's finished shapes in the JSON, with
    their ratios against eager; before, the JSON was written after whole modes and kept none of them."""
    e2e = script("bench_e2e")
    out = tmp_path / "e2e.json"
    timed = []
    real = e2e.time_calls

    def cut_at_the_fourth(*args, **kwargs):  # eager: 2 shapes, then shapetune's first shape; cut at its second
        timed.append(1)
        if len(timed) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(e2e, "time_calls", cut_at_the_fourth)
    monkeypatch.setattr(sys, "argv", ["bench_e2e.py", "--tiny", "--device", "cpu", "--modes", "eager,shapetune",
                                      "--shapes", "2x512,1x512", "--iters", "2", "--warmup", "1", "--json", str(out)])
    prev = kernels.get_registry()
    try:
        with pytest.raises(KeyboardInterrupt):
            e2e.main()
    finally:
        kernels.set_registry(prev)
    rows = json.loads(out.read_text())["rows"]
    assert set(rows["eager"]) == {"2x512", "1x512"}
    assert set(rows["shapetune"]) == {"2x512"}
    r = rows["shapetune"]["2x512"]
    assert r["us"] > 0 and r["speedup_vs_eager"] == rows["eager"]["2x512"]["us"] / r["us"]
    assert r["rel_l2_vs_eager"] < 1e-5
