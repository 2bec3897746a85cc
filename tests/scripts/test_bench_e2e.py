"""scripts/bench_e2e.py on the CPU: what a run cut short keeps."""

from __future__ import annotations

import json
import sys

import pytest

from tests._scripts import run_main, script


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
    with pytest.raises(KeyboardInterrupt):
        run_main(monkeypatch, e2e.main, ["bench_e2e.py", "--tiny", "--device", "cpu", "--modes", "eager,shapetune",
                                         "--shapes", "2x512,1x512", "--iters", "2", "--warmup", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert set(rows["eager"]) == {"2x512", "1x512"}
    assert set(rows["shapetune"]) == {"2x512"}
    r = rows["shapetune"]["2x512"]
    assert r["us"] > 0 and r["speedup_vs_eager"] == rows["eager"]["2x512"]["us"] / r["us"]
    assert r["rel_l2_vs_eager"] < 1e-5


def test_each_mode_frees_the_previous_model_and_profiles_through_the_module(tmp_path, monkeypatch):
    """When a mode starts, the previous mode's model is gone (its memory would count in this mode's peak:
    on an H100, 2026-12-07, a profiled shapetune model held by main's scope made the next mode's peak
    3.42 GiB against 1.74), and the profile of an optimized model runs through the module (its hooks:
    kernels/temb.py's one GEMM), not its inner forward."""
    import weakref

    e2e = script("bench_e2e")
    built, alive_at_start = [], []
    real_make = e2e.make

    def make(mode, *args, **kwargs):
        alive_at_start.append([r() is not None for r in built])
        m, report = real_make(mode, *args, **kwargs)
        built.append(weakref.ref(m))
        return m, report

    monkeypatch.setattr(e2e, "make", make)
    out = tmp_path / "e2e.json"
    run_main(monkeypatch, e2e.main, ["bench_e2e.py", "--tiny", "--device", "cpu", "--profile", "--modes",
                                     "eager,shapetune,shapetune_nopack,eager_cl", "--shapes", "2x512",
                                     "--iters", "1", "--warmup", "1", "--json", str(out)])
    assert alive_at_start == [[], [False], [False, False], [False, False, False]]
    rows = json.loads(out.read_text())["rows"]
    calls = {m: rows[m]["2x512"]["calls"] for m in ("shapetune", "shapetune_nopack")}
    # the same runs per mode (warm-up and capture, or the eager calls on the CPU): the profile's calls are
    # counted in neither (before, they went to the next mode's)
    assert sum(calls["shapetune"]["conv2d"].values()) == sum(calls["shapetune_nopack"]["conv2d"].values())
    assert sum(calls["shapetune"]["linear"].values()) < sum(calls["shapetune_nopack"]["linear"].values())
    prof = rows["shapetune"]["2x512"]["profile"]
    assert prof["kernels"] > 0
    # every op between the big ones is listed, not only the top ones: the skip connections' cats among them
    assert any(k["category"] == "copy" and "cat" in k["name"] for k in prof["between"])


def test_isolate_keeps_what_an_interrupted_child_measured(tmp_path, monkeypatch):
    """--isolate: each mode a child process (no mode's leftover state, e.g. torch.compile's, can touch
    another's timing), merged into one JSON whose rel L2 is against the eager child's outputs; and a time
    limit that interrupts it while a child runs (on an H100, 2026-12-07, torch.compile's child was stopped
    at its third shape and nothing of it reached the JSON) keeps that child's finished shapes: here the
    interrupt comes as the shapetune child ends, after it wrote its JSON."""
    import subprocess

    e2e = script("bench_e2e")
    out = tmp_path / "e2e.json"
    real = subprocess.run

    def run_then_interrupt(cmd, *args, **kwargs):
        r = real(cmd, *args, **kwargs)
        if "shapetune" in cmd:
            raise KeyboardInterrupt
        return r

    monkeypatch.setattr(subprocess, "run", run_then_interrupt)
    monkeypatch.setattr(sys, "argv", ["bench_e2e.py", "--tiny", "--device", "cpu", "--isolate", "--modes",
                                      "eager,shapetune", "--shapes", "2x512", "--iters", "1", "--warmup", "1",
                                      "--json", str(out)])
    with pytest.raises(KeyboardInterrupt):
        e2e.main()
    d = json.loads(out.read_text())
    assert d["args"]["isolate"] and set(d["rows"]) == {"eager", "shapetune"}
    r = d["rows"]["shapetune"]["2x512"]
    assert r["rel_l2_vs_eager"] < 1e-5 and r["speedup_vs_eager"] == d["rows"]["eager"]["2x512"]["us"] / r["us"]
    assert sum(r["calls"]["conv2d"].values()) > 0 and d["graphs"]["shapetune"]  # counted in the child
