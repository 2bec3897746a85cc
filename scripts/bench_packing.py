"""Packed projections A/B under CUDA graphs: the optimized SD 1.5 UNet with and without kernels/qkv.py's and
kernels/temb.py's (and kernels/ctxkv.py's) packing, in one process on the same weights and inputs, timed in
alternating rounds (`--variants`: packed, noctx (all but the cross-attention k/v one), nopack).

    python scripts/bench_packing.py --db all.db --shapes 2x512,1x512 --json packing_{shape}.json   # GPU, fp16
    python scripts/bench_packing.py --tiny --device cpu --json p_{shape}.json                      # smoke run

bench_e2e.py times one mode after another, so clocks and machine state between them enter its A/B (on an
H100, 2026-12-07, it measured the two within 0.2%); here every variant's graph is captured first, then all are timed in turns
(`--rounds` rounds of `--iters` calls each, CUDA events per call, median per round). On the GPU, one
torch.profiler window over 3 graph replays of each gives the kernels per call, the GPU busy time (sum of
kernel durations) and the gaps between kernels: the time a graph replay adds to its kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_e2e as be  # noqa: E402
import torch  # noqa: E402

# variant -> kernels.optimize's packing flags; "packed" (every packing) and "nopack" (none) make the A/B
VARIANTS = {"packed": {}, "noctx": {"fuse_ctxkv": False}, "nopack": {"fuse_qkv": False, "fuse_temb": False}}


def replay_profile(m, inp: dict, calls: int = 3) -> dict:
    """Kernels per call, GPU busy µs per call and the small gaps between kernels (<= 50 µs, the host's own
    pauses between calls excluded) over `calls` graph replays, and the top kernels by time."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            m(**inp)
        torch.cuda.synchronize()
    evs = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    gaps = [b.time_range.start - a.time_range.end for a, b in zip(evs, evs[1:])]
    small = [g for g in gaps if g <= 50]
    names: dict[str, list] = {}
    for e in evs:
        d = names.setdefault(e.name[:90], [0, 0.0])
        d[0] += 1
        d[1] += e.time_range.end - e.time_range.start
    return {"kernels_per_call": len(evs) / calls,
            "busy_us": sum(e.time_range.end - e.time_range.start for e in evs) / calls,
            "span_us": (evs[-1].time_range.end - evs[0].time_range.start) / calls if evs else 0.0,
            "small_gap_us": sum(small) / calls,
            "top": sorted(((v[1] / calls, v[0] / calls, n) for n, v in names.items()), reverse=True)[:40]}


def run(shape: str, a, dev, dtype) -> dict:
    import kernels

    b, h, w = be.parse_shape(shape)
    inp = be.inputs(a.tiny, b, h, w, dev, dtype)
    is_gpu = dev.type == "cuda"
    models, calls = {}, {}
    for name in a.variants.split(","):
        m = be.build(a.tiny, dev, dtype).to(memory_format=torch.channels_last)
        kernels.optimize(m, **VARIANTS[name])
        kernels.get_registry().calls.clear()
        with torch.no_grad():
            for _ in range(a.warmup):
                m(**inp)
        calls[name] = kernels.fallback_summary()
        models[name] = m
    if is_gpu:
        torch.cuda.synchronize()
    medians: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(a.rounds):
        for k, m in models.items():
            medians[k].append(be.time_calls(lambda m=m: m(**inp), a.iters, 2, is_gpu))
    out = {"shape": shape, "device": torch.cuda.get_device_name() if is_gpu else "cpu", "medians": medians,
           "calls": calls}
    for k, m in models.items():
        if is_gpu:
            out[k] = replay_profile(m, inp)
        kernels.restore(m)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", action="append", default=[], help="tuning DB or JSONL(.xz) export (repeatable)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--shapes", default="2x512,1x512")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--iters", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=4, help="calls before timing (the first captures the graph)")
    ap.add_argument("--variants", default="packed,nopack",
                    help=f"comma-separated, of {', '.join(VARIANTS)} (noctx: every packing but kernels/ctxkv.py's)")
    ap.add_argument("--json", default="", help="a path per shape: it must contain {shape}")
    a = ap.parse_args()
    if not set(a.variants.split(",")) <= set(VARIANTS) or "packed" not in a.variants.split(","):
        raise SystemExit(f"bench_packing: --variants takes packed and any of {', '.join(VARIANTS)}")
    if a.json and "{shape}" not in a.json:
        raise SystemExit("bench_packing: --json must contain {shape}")
    from shapetune.target import detect

    dev = torch.device(a.device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    be.install_registry(a.db, detect("cuda" if dev.type == "cuda" else "llvm"))
    for shape in [s for s in a.shapes.split(",") if s]:
        d = run(shape, a, dev, dtype)
        d["args"] = vars(a)
        med = {k: sorted(v)[len(v) // 2] for k, v in d["medians"].items()}
        print(f"[{shape}] median of round medians, us: "
              + ", ".join(f"{k} {v:.0f} ({v / med['packed']:.3f}x packed's time)" for k, v in med.items()))
        for k in med:
            if k in d:
                p = d[k]
                print(f"[{shape}] {k}: {p['kernels_per_call']:.0f} kernels per call, GPU busy {p['busy_us']:.0f} us, "
                      f"gaps {p['small_gap_us']:.0f} us")
        if a.json:
            Path(a.json.format(shape=shape)).write_text(json.dumps(d, indent=1))


if __name__ == "__main__":
    main()
