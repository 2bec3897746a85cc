"""LoRA switch cost on an optimized SD 1.5 UNet, against eager, in one run (issue 10 item 6).

    python scripts/bench_lora.py --db tuning_logs/sm90_h200_sd15_norms_rebench.jsonl.xz --json lora.json
    python scripts/bench_lora.py --tiny --device cpu          # a smoke run

Two PEFT LoRAs (rank --rank on to_q, to_k, to_v, to_out.0 of every attention: diffusers' default
targets; random A and B, no model hub) are added to the UNet of each mode, fp16, batch 2, 512². Per mode:
the median wall time of a UNet call, then for `--switches` switches alternating between the adapters
(`set_adapters`) the wall time of the switch plus the first call after it (for shapetune: the first
switch to an adapter captures its graph, the adapter state being part of the graph key; later switches
replay it), and the
output's relative L2 against eager with the same adapter active. `fuse_lora`-style merges are in-place
weight writes, which the graphs see without re-capture (tests/kernels/test_graphs_gpu.py).
--hotswap: one adapter instead, each switch diffusers' `load_lora_adapter(state_dict, hotswap=True)`, which
writes the other LoRA's weights (a CPU state dict) into the adapter's tensors in place: the graphs see new
weights and replay, nothing is captured; torch.compile gets `enable_lora_hotswap` first, diffusers' way
to switch without recompiling. Modes: eager (channels_last), shapetune (kernels.optimize: patched, graphs; a switch's capture skips
the warm-up runs), shapetune_warm (the same, every capture after the full warm-ups), shapetune_peft
(without kernels/lora.py: PEFT's GEMM, scale and add per LoRA layer), compile_ro
(torch.compile(mode="reduce-overhead"): a switch changes what its guards check, so it recompiles).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", action="append", default=[])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--switches", type=int, default=6)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--modes", default="eager,shapetune", help="eager,shapetune,shapetune_warm,shapetune_peft,compile_ro")
    ap.add_argument("--hotswap", action="store_true",
                    help="switch by load_lora_adapter(..., hotswap=True) into one adapter instead of set_adapters")
    ap.add_argument("--json", default="")
    a = ap.parse_args()

    import kernels
    from peft import LoraConfig
    from scripts.bench_e2e import build, inputs, install_registry, rel_l2, time_calls
    from shapetune.target import detect

    dev = torch.device(a.device)
    is_gpu = dev.type == "cuda"
    dtype = torch.float16 if is_gpu else torch.float32
    target = detect("cuda" if is_gpu else "llvm")
    install_registry(a.db, target)
    x = inputs(a.tiny, 2, 512, 512, dev, dtype)
    x = {**x, "sample": x["sample"].contiguous(memory_format=torch.channels_last)}

    def sync():
        if is_gpu:
            torch.cuda.synchronize()

    targets = ("to_q", "to_k", "to_v", "to_out.0")

    def lora_state(m, seed: int) -> dict:
        """A rank-`--rank` LoRA on every attention projection, PEFT format ("<module>.lora_A.weight"),
        random A and B on the CPU (as a LoRA file loads)."""
        g, sd = torch.Generator().manual_seed(seed), {}
        for n, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear) and n.endswith(targets):
                sd[f"{n}.lora_A.weight"] = (torch.randn(a.rank, mod.in_features, generator=g) * 0.05).to(dtype)
                sd[f"{n}.lora_B.weight"] = (torch.randn(mod.out_features, a.rank, generator=g) * 0.05).to(dtype)
        return sd

    def with_loras(m, mode: str):
        if a.hotswap:  # one adapter, "x", its weights overwritten in place by each switch
            if mode == "compile_ro":  # diffusers: before the first adapter is loaded (scales become tensors)
                m.enable_lora_hotswap(target_rank=a.rank)
            m.load_lora_adapter(states["a"], prefix=None, adapter_name="x")
            return m
        for name, seed in (("a", 1), ("b", 2)):
            m.add_adapter(LoraConfig(r=a.rank, lora_alpha=a.rank, target_modules=list(targets)),
                          adapter_name=name)
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if f"lora_B.{name}" in n or f"lora_A.{name}" in n:
                        p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))
        return m

    refs, rows, states = {}, {}, {}
    for mode in a.modes.split(","):
        kernels.get_registry().calls.clear()  # each mode's op calls its own
        m = build(a.tiny, dev, dtype).to(memory_format=torch.channels_last)
        if a.hotswap and not states:
            states = {"a": lora_state(m, 1), "b": lora_state(m, 2)}
        m = with_loras(m, mode)
        run = m
        if mode.startswith("shapetune"):
            kernels.optimize(m, fuse_lora_add=mode != "shapetune_peft")
            if mode == "shapetune_warm":
                m.forward.rewarmup = m.forward.warmup
        elif mode == "compile_ro":
            run = torch.compile(m, mode="reduce-overhead", dynamic=False)
        if not a.hotswap:
            m.set_adapters(["a"])
        with torch.no_grad():
            run(**x)
        us = time_calls(lambda: run(**x), a.iters, 2, is_gpu)
        switches, errs, set_s = [], [], []
        for i in range(a.switches):
            name = "b" if i % 2 == 0 else "a"
            sync()
            t0 = time.perf_counter()
            if a.hotswap:
                m.load_lora_adapter(states[name], prefix=None, adapter_name="x", hotswap=True)
            else:
                m.set_adapters([name])
            set_s.append(time.perf_counter() - t0)
            with torch.no_grad():
                out = run(**x).sample
            sync()
            switches.append(time.perf_counter() - t0)
            out = out.float().cpu()
            if mode == "eager":
                refs.setdefault(name, out)
            if name in refs:
                errs.append(rel_l2(out, refs[name]))
        row = {"us": us, "switch_s": switches, "switch_median_s": sorted(switches)[len(switches) // 2],
               "rel_l2_vs_eager": max(errs) if errs else None}
        row["set_adapters_s"] = set_s  # the host time of set_adapters (or of the hotswap) alone, per switch
        if mode.startswith("shapetune"):
            row["graphs"] = dict(m.forward.stats)
            row["capture_parts"] = m.forward.capture_parts  # where a capture's time goes (GraphedCall)
            # how the LoRA layers ran in the eager runs and captures (replays run no Python): kernels/lora.py
            row["lora_linear_calls"] = {k: n for (op, k), n in kernels.get_registry().calls.items() if op == "lora_linear"}
            kernels.restore(m)
        rows[mode] = row
        m = run = None
        if mode == "compile_ro":
            torch._dynamo.reset()
        if is_gpu:
            torch.cuda.empty_cache()
    print(f"device: {torch.cuda.get_device_name() if is_gpu else 'cpu'}  torch {torch.__version__}  "
          f"{'tiny' if a.tiny else 'SD 1.5'} UNet + 2 LoRAs (rank {a.rank}{', hotswapped into one adapter' if a.hotswap else ''}), "
          f"batch 2, 512², {dtype}")
    print(f"{'mode':12s} {'ms/call':>9s} {'switch+call ms (median)':>24s} {'max':>8s} {'rel L2':>9s}")
    for mode, r in rows.items():
        print(f"{mode:12s} {r['us'] / 1e3:9.3f} {r['switch_median_s'] * 1e3:24.1f} {max(r['switch_s']) * 1e3:8.1f} "
              f"{r['rel_l2_vs_eager'] if r['rel_l2_vs_eager'] is not None else float('nan'):9.2e}")
    if a.json:
        Path(a.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "target": target.to_json(),
                                            "device": torch.cuda.get_device_name() if is_gpu else "cpu",
                                            "torch": torch.__version__, "args": vars(a), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
