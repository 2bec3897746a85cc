"""scripts/bench_packing.py on the CPU (tiny UNet, llvm target, no tuned kernels): both models run the same
inputs in turns; each packing makes fewer linear op calls (the cross-attention k/v one too)."""

from __future__ import annotations

import json

from tests._scripts import run_main, script


def test_a_tiny_run_times_both_in_turns_and_counts_the_packed_calls(tmp_path, monkeypatch):
    bp = script("bench_packing")
    run_main(monkeypatch, bp.main, ["bench_packing.py", "--tiny", "--device", "cpu", "--shapes", "2x512",
                                    "--rounds", "2", "--iters", "1", "--warmup", "1", "--variants", "packed,noctx,nopack",
                                    "--json", str(tmp_path / "p_{shape}.json")])
    d = json.loads((tmp_path / "p_2x512.json").read_text())
    assert [len(v) for v in d["medians"].values()] == [2, 2, 2] and all(x > 0 for v in d["medians"].values() for x in v)
    linear = {k: sum(c["linear"].values()) for k, c in d["calls"].items()}
    assert 0 < linear["packed"] < linear["noctx"] < linear["nopack"]
