"""scripts/bench_lora.py on the CPU (tiny UNet, llvm target, no graphs there): a run writes each mode's
switch times, the host time of set_adapters alone, and for shapetune where its captures' time went
(GraphedCall.capture_parts: none on the CPU, where every call runs the patched eager path, counted)."""

from __future__ import annotations

import json

from tests._scripts import run_main, script


def test_a_cpu_run_writes_switch_times_and_their_parts(tmp_path, monkeypatch):
    lora = script("bench_lora")
    out = tmp_path / "lora.json"
    run_main(monkeypatch, lora.main, ["bench_lora.py", "--tiny", "--device", "cpu", "--switches", "2", "--iters", "1",
                                      "--modes", "eager,shapetune,shapetune_warm,shapetune_peft", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    for mode in ("eager", "shapetune", "shapetune_warm", "shapetune_peft"):
        r = rows[mode]
        assert len(r["switch_s"]) == len(r["set_adapters_s"]) == 2
        assert all(0 < s <= t for s, t in zip(r["set_adapters_s"], r["switch_s"]))
        assert r["rel_l2_vs_eager"] is not None and r["rel_l2_vs_eager"] < 1e-5
    assert rows["shapetune"]["capture_parts"] == [] and rows["shapetune"]["graphs"].get("cpu", 0) > 0
    # every LoRA layer call took kernels/lora.py's GEMM (into its own output, or into its columns of a packed
    # q/k/v GEMM), or PEFT's forward where it was turned off
    assert set(rows["shapetune"]["lora_linear_calls"]) == {"fused", "packed"}
    assert set(rows["shapetune_peft"]["lora_linear_calls"]) == {"peft"}


def test_a_hotswap_run_switches_in_place_and_matches_eager(tmp_path, monkeypatch):
    lora = script("bench_lora")
    out = tmp_path / "lora.json"
    run_main(monkeypatch, lora.main, ["bench_lora.py", "--tiny", "--device", "cpu", "--switches", "3", "--hotswap",
                                      "--iters", "1", "--json", str(out)])
    d = json.loads(out.read_text())
    assert d["args"]["hotswap"]
    for mode in ("eager", "shapetune"):
        r = d["rows"][mode]
        assert len(r["switch_s"]) == 3 and r["rel_l2_vs_eager"] is not None and r["rel_l2_vs_eager"] < 1e-5
