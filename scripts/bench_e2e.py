"""End-to-end: one SD 1.5 UNet step, eager vs torch.compile vs shapetune-patched, in one run.

    python scripts/bench_e2e.py --db tuning_logs/sm90_h200_sd15_norms.jsonl.xz --db tuning_logs/... \
        --json e2e.json                       # GPU: fp16, batch 2, 512x512 (64x64 latents)
    python scripts/bench_e2e.py --tiny --device cpu     # a smoke run of the same code on a tiny UNet

Modes, all on the same random weights and inputs (no model hub: the UNet is built from its config):
  eager            diffusers as users run it (NCHW)
  eager_cl         the same with the model and input in channels_last memory
  compile          torch.compile(unet) (default mode), channels_last
  compile_ro       torch.compile(unet, mode="reduce-overhead"): inductor plus CUDA graphs
  shapetune        kernels.patch(unet) with the registry over the given DBs, channels_last: tuned
                   kernels where they measured faster than torch, torch's ops elsewhere
  shapetune_compile, shapetune_compile_ro   the patched UNet, then torch.compile as above (the ops
                   are custom ops: inductor calls them, and CUDA graphs capture their launches)
Per mode: median wall time per UNet call over `--iters` calls (CUDA events around each call, after
warm-up; what a pipeline step costs, launch overhead included), and the output's relative L2 error
against eager NCHW. The shapetune row also prints its fallback summary (tuned calls and fallbacks by
cause per op). Ratios are against eager from this same run. Writes JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

TINY = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=24, attention_head_dim=2, norm_num_groups=8)


def build(tiny: bool, device, dtype):
    import diffusers

    from scheduler.sd_configs import build_sd15_unet

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**TINY) if tiny else build_sd15_unet(device="cpu")
    return unet.to(device=device, dtype=dtype).eval()


def inputs(tiny: bool, batch: int, res: int, device, dtype) -> dict:
    g = torch.Generator().manual_seed(1)
    lat, ctx = (8, (7, 24)) if tiny else (res // 8, (77, 768))
    return dict(sample=torch.randn(batch, 4, lat, lat, generator=g).to(device, dtype),
                timestep=torch.tensor(500, device=device),
                encoder_hidden_states=torch.randn(batch, *ctx, generator=g).to(device, dtype))


def time_calls(fn, iters: int, warmup: int, is_gpu: bool) -> float:
    """Median µs per call; each call bracketed by CUDA events (GPU) or perf_counter (CPU)."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(iters):
            if is_gpu:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                samples.append(a.elapsed_time(b) * 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e6)
    return sorted(samples)[len(samples) // 2]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", action="append", default=[], help="tuning DB or JSONL(.xz) export (repeatable)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a tiny UNet config (smoke test)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--modes", default="eager,eager_cl,compile,compile_ro,shapetune,shapetune_compile_ro")
    ap.add_argument("--json", default="")
    a = ap.parse_args()

    import kernels
    from kernels.registry import Registry, set_registry
    from shapetune.db import TuningDB
    from shapetune.target import detect

    dev = torch.device(a.device)
    is_gpu = dev.type == "cuda"
    dtype = torch.float16 if is_gpu else torch.float32
    target = detect("cuda" if is_gpu else "llvm")
    tmp = Path(tempfile.mkdtemp(prefix="shapetune-e2e-"))
    db_path = tmp / "e2e.db"
    with TuningDB(db_path) as db:  # one DB over every given export / DB
        for p in a.db:
            db.merge_from(p)
    reg = Registry(db_path=db_path, target=target)
    set_registry(reg)
    t0 = time.time()
    built = reg.prebuild()  # every dispatched kernel compiled up front, in parallel (not on first call)
    print(f"kernels: {built} in {time.time() - t0:.0f} s")

    unet = build(a.tiny, dev, dtype)
    x = inputs(a.tiny, a.batch, a.res, dev, dtype)
    x_cl = {**x, "sample": x["sample"].contiguous(memory_format=torch.channels_last)}
    with torch.no_grad():
        ref = unet(**x).sample.float()
    print(f"device: {torch.cuda.get_device_name() if is_gpu else 'cpu'}  torch {torch.__version__}  "
          f"{'tiny' if a.tiny else 'SD 1.5'} UNet, batch {a.batch}, {dtype}")
    rows = {}
    for mode in a.modes.split(","):
        if mode == "eager":
            m, inp = unet, x
        else:
            m = build(a.tiny, dev, dtype).to(memory_format=torch.channels_last)
            inp = x_cl
            if mode.startswith("shapetune"):
                report = kernels.patch(m)
                print(f"  {report}")
            if mode.endswith("compile"):
                m = torch.compile(m)
            elif mode.endswith("compile_ro"):  # inductor + CUDA graphs (cudagraph trees)
                m = torch.compile(m, mode="reduce-overhead")
        t = time_calls(lambda: m(**inp), a.iters, a.warmup, is_gpu)
        with torch.no_grad():
            err = rel_l2(m(**inp).sample.float(), ref)
        rows[mode] = {"us": t, "rel_l2_vs_eager": err}
        if mode.startswith("shapetune"):
            rows[mode]["calls"] = kernels.fallback_summary()
            kernels.get_registry().calls.clear()
    base = rows.get("eager", {}).get("us")
    print(f"\n{'mode':12s} {'ms/call':>9s} {'eager/mode':>10s} {'rel L2 vs eager':>16s}")
    for mode, r in rows.items():
        r["speedup_vs_eager"] = base / r["us"] if base else None
        sp = f"{r['speedup_vs_eager']:10.2f}" if base else f"{'n/a':>10s}"
        print(f"{mode:12s} {r['us'] / 1e3:9.3f} {sp} {r['rel_l2_vs_eager']:16.2e}")
    for mode, r in rows.items():
        if "calls" in r:
            print(f"\n{mode} op calls:", json.dumps(r["calls"]))
    if a.json:
        Path(a.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "target": target.to_json(),
                                            "args": vars(a), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
