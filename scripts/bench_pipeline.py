"""A full diffusers pipeline (text encoder, 20 UNet steps with CFG, VAE decode), eager vs optimized, one run.

    python scripts/bench_pipeline.py --db tuning_logs/sm90_h200_sd15_norms_rebench.jsonl.xz --json pipe.json
    python scripts/bench_pipeline.py --tiny --device cpu --steps 3        # a smoke run

SD 1.5 shapes with random weights (scheduler/pipelines.py; DDIM, guidance 7.5), fp16 on the GPU. Modes:
  eager        the pipeline as built
  compile_ro   torch.compile(mode="reduce-overhead") on the UNet and the VAE decoder, channels_last
  shapetune    kernels.optimize(pipe): patched, channels_last, CUDA graphs per signature
Per mode: wall time of the first pipeline call (compile or capture included) and the median of --iters
more (synchronized), peak memory allocated, and the image's PSNR against eager's (same seed, same
weights; images in [0, 1], so PSNR = -10 log10(MSE)). Ratios against eager and compile_ro from this run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else -10 * math.log10(mse)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", action="append", default=[])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--modes", default="eager,compile_ro,shapetune")
    ap.add_argument("--json", default="")
    a = ap.parse_args()

    import kernels
    from scheduler.pipelines import build_sd_pipeline
    from scripts.bench_e2e import install_registry
    from shapetune.target import detect

    dev = torch.device(a.device)
    is_gpu = dev.type == "cuda"
    dtype = torch.float16 if is_gpu else torch.float32
    res = 64 if a.tiny else a.res
    target = detect("cuda" if is_gpu else "llvm")
    install_registry(a.db, target)

    def run(pipe):
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            out = pipe("a photo of a cat", num_inference_steps=a.steps, height=res, width=res, generator=g,
                       output_type="pt").images
        if is_gpu:
            torch.cuda.synchronize()
        return out.float().cpu()

    def timed(pipe):
        t0 = time.perf_counter()
        img = run(pipe)
        return img, time.perf_counter() - t0

    rows, ref = {}, None
    for mode in a.modes.split(","):
        pipe = build_sd_pipeline(tiny=a.tiny, dtype=dtype, device=dev)
        report = None
        if mode == "compile_ro":
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
            pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead")
            pipe.vae.decode = torch.compile(pipe.vae.decode, mode="reduce-overhead")
        elif mode == "shapetune":
            report = kernels.optimize(pipe)
        if is_gpu:
            torch.cuda.reset_peak_memory_stats()
        img, first = timed(pipe)
        ts = [timed(pipe)[1] for _ in range(a.iters)]
        row = {"first_call_s": first, "s": sorted(ts)[len(ts) // 2]}
        if is_gpu:
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        if mode == "eager":
            ref = img
        if ref is not None:
            row["psnr_vs_eager_db"] = psnr(img, ref)
        if report is not None:
            row["graphs"] = {k: dict(v) for k, v in report.graph_stats().items()}
            row["calls"] = kernels.fallback_summary()
            kernels.get_registry().calls.clear()
        rows[mode] = row
        del pipe
        if mode == "compile_ro":
            torch._dynamo.reset()
        if is_gpu:
            torch.cuda.empty_cache()
    base, ro = rows.get("eager", {}).get("s"), rows.get("compile_ro", {}).get("s")
    print(f"\n{'mode':12s} {'s/image':>8s} {'eager/mode':>10s} {'ro/mode':>8s} {'1st call s':>10s} {'peak GiB':>9s} "
          f"{'PSNR dB':>8s}")
    for mode, r in rows.items():
        r["speedup_vs_eager"] = base / r["s"] if base else None
        r["speedup_vs_compile_ro"] = ro / r["s"] if ro else None
        f = lambda v, w, p: f"{v:{w}.{p}f}" if isinstance(v, float) else f"{'n/a':>{w}s}"  # noqa: E731
        print(f"{mode:12s} {r['s']:8.3f} {f(r['speedup_vs_eager'], 10, 2)} {f(r['speedup_vs_compile_ro'], 8, 2)} "
              f"{r['first_call_s']:10.2f} {f(r.get('peak_mem_gib'), 9, 2)} {f(r.get('psnr_vs_eager_db'), 8, 1)}")
    for mode, r in rows.items():
        if "graphs" in r:
            print(f"{mode} graphs:", json.dumps(r["graphs"]))
    if a.json:
        Path(a.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "target": target.to_json(),
                                            "device": torch.cuda.get_device_name() if is_gpu else "cpu",
                                            "torch": torch.__version__, "args": vars(a), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
