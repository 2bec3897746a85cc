"""Full diffusers pipelines (text encoder, 20 UNet steps with CFG, VAE decode), eager vs optimized, one run.

    python scripts/bench_pipeline.py --db tuning_logs/sm90_h200_sd15_norms_rebench.jsonl.xz --json pipe.json
    python scripts/bench_pipeline.py --shapes 1x512,2x512,4x512,1x768,1x512x768 --json pipe.json
    python scripts/bench_pipeline.py --pipelines text2img,img2img,inpaint,alt,sdxl --json pipes.json
    python scripts/bench_pipeline.py --tiny --device cpu --steps 3        # a smoke run

Pipelines (--pipelines, default text2img; scheduler/pipelines.py's PIPELINES, each called as
scheduler.pipelines.run_pipeline does: a prompt and a negative prompt, img2img at strength 1 so every
step runs, inpaint with a random mask, AltDiffusion with prompt embeddings): StableDiffusion,
Img2Img and Inpaint (SD 1.5's UNet, the inpaint one with 9 input channels; DDIM), AltDiffusion (SD
1.5's UNet and VAE, an XLM-R text encoder; DDIM) and StableDiffusionXL (Euler), all with random weights,
fp16 on the GPU, guidance 7.5. Modes:
  eager        the pipeline as built
  compile_ro   torch.compile(mode="reduce-overhead") on the UNet and the VAE decoder, channels_last
  shapetune    kernels.optimize(pipe): patched, channels_last, CUDA graphs per signature
A shape is images per prompt x height [x width] in pixels (the UNet runs at twice that batch, for
classifier-free guidance). One pipeline per mode, run over the shapes in the order given, so a shape's
first call is the compile or capture at the first shape and the cost of a shape change after it.
Per pipeline, shape and mode: wall time of that first call and the median of --iters more
(synchronized), peak memory allocated, and the images' PSNR against eager's (same seed, same weights;
images in [0, 1], so PSNR = -10 log10(MSE)). Ratios against eager and compile_ro of the same pipeline
and shape from this run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from scheduler.pipelines import PIPELINES  # noqa: E402


def parse_shape(text: str, tiny: bool = False) -> tuple[int, int, int]:
    """"2x512" -> (2, 512, 512), "1x512x768" -> (1, 512, 768): images per prompt, height, width (pixels).
    tiny: the sizes are scaled by 1/8 (the tiny configs' 64 px for 512), multiples of 8 kept."""
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) not in (2, 3) or min(parts) < 1:
        raise SystemExit(f"--shapes: {text!r} is not images x height [x width]")
    n, h, w = parts[0], parts[1], parts[-1]
    if tiny:
        h, w = max(8, h // 8 // 8 * 8), max(8, w // 8 // 8 * 8)
    return n, h, w


def shape_name(shape: tuple[int, int, int]) -> str:
    n, h, w = shape
    return f"{n}x{h}" if h == w else f"{n}x{h}x{w}"


def ratios(rows: list[dict]) -> None:
    """Each row's speedups against eager and compile_ro of its pipeline at its shape, where those ran."""
    by = {(r["pipeline"], r["shape"], r["mode"]): r for r in rows}
    for r in rows:
        base, ro = (by.get((r["pipeline"], r["shape"], m), {}).get("s") for m in ("eager", "compile_ro"))
        r["speedup_vs_eager"] = base / r["s"] if base else None
        r["speedup_vs_compile_ro"] = ro / r["s"] if ro else None


def write(a, target, is_gpu: bool, rows: list[dict]) -> None:
    Path(a.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "target": target.to_json(),
                                        "device": torch.cuda.get_device_name() if is_gpu else "cpu",
                                        "torch": torch.__version__, "args": vars(a), "rows": rows}, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", action="append", default=[])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--pipelines", default="text2img", help=f"comma-separated, of {','.join(PIPELINES)}")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--shapes", default="1x512", help="images per prompt x height [x width], comma-separated")
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--modes", default="eager,compile_ro,shapetune")
    ap.add_argument("--json", default="")
    ap.add_argument("--isolate", action="store_true",
                    help="each mode in its own process, eager first (its images reach the others through a file)")
    ap.add_argument("--refs", default="", help=argparse.SUPPRESS)  # --isolate's children: eager's images
    a = ap.parse_args()
    kinds = [k for k in a.pipelines.split(",") if k]
    if not kinds or set(kinds) - set(PIPELINES):
        raise SystemExit(f"--pipelines: {a.pipelines!r}: comma-separated, of {', '.join(PIPELINES)}")
    if a.isolate:
        return isolated(a)

    import kernels
    from scheduler.pipelines import build_pipeline, psnr, run_pipeline
    from scripts.bench_e2e import install_registry
    from shapetune.target import detect

    dev = torch.device(a.device)
    is_gpu = dev.type == "cuda"
    dtype = torch.float16 if is_gpu else torch.float32
    shapes = [parse_shape(t, tiny=a.tiny) for t in a.shapes.split(",")]
    target = detect("cuda" if is_gpu else "llvm")
    install_registry(a.db, target)

    def timed(pipe, kind, shape):
        n, h, w = shape
        t0 = time.perf_counter()
        img = run_pipeline(pipe, kind, a.steps, h, w, images=n)
        return img, time.perf_counter() - t0

    rows, refs = [], {}
    for kind, mode in ((k, m) for k in kinds for m in a.modes.split(",")):
        pipe = build_pipeline(kind, tiny=a.tiny, dtype=dtype, device=dev)
        report = None
        if mode == "compile_ro":
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
            pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead")
            pipe.vae.decode = torch.compile(pipe.vae.decode, mode="reduce-overhead")
        elif mode == "shapetune":
            report = kernels.optimize(pipe)
        for shape in shapes:
            if is_gpu:
                torch.cuda.reset_peak_memory_stats()
            img, first = timed(pipe, kind, shape)
            ts = [timed(pipe, kind, shape)[1] for _ in range(a.iters)]
            row = {"pipeline": kind, "shape": shape_name(shape), "mode": mode, "first_call_s": first,
                   "s": sorted(ts)[len(ts) // 2]}
            if is_gpu:
                row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            ref = (kind, shape)
            if mode == "eager":
                refs[ref] = img
                if a.refs:
                    torch.save(refs, a.refs)
            elif a.refs and ref not in refs and Path(a.refs).exists():
                refs.update(torch.load(a.refs))
            if ref in refs:
                row["psnr_vs_eager_db"] = psnr(img, refs[ref])
            if report is not None:
                row["graphs"] = {k: dict(v) for k, v in report.graph_stats().items()}
                row["calls"] = kernels.fallback_summary()
                kernels.get_registry().calls.clear()
            rows.append(row)
        ratios(rows)
        if a.json:  # after every mode: a run cut short (a time limit) keeps the modes it finished
            write(a, target, is_gpu, rows)
        del pipe
        if mode == "compile_ro":
            torch._dynamo.reset()
        if is_gpu:
            torch.cuda.empty_cache()
    show(rows)


def show(rows: list[dict]) -> None:
    print(f"\n{'pipeline':9s} {'shape':10s} {'mode':12s} {'s/call':>8s} {'eager/mode':>10s} {'ro/mode':>8s} "
          f"{'1st call s':>10s} {'peak GiB':>9s} {'PSNR dB':>8s}")
    for r in rows:
        f = lambda v, w, p: f"{v:{w}.{p}f}" if isinstance(v, float) else f"{'n/a':>{w}s}"  # noqa: E731
        print(f"{r['pipeline']:9s} {r['shape']:10s} {r['mode']:12s} {r['s']:8.3f} {f(r['speedup_vs_eager'], 10, 2)} "
              f"{f(r['speedup_vs_compile_ro'], 8, 2)} {r['first_call_s']:10.2f} {f(r.get('peak_mem_gib'), 9, 2)} "
              f"{f(r.get('psnr_vs_eager_db'), 8, 1)}")
    for r in rows:
        if "graphs" in r:
            print(f"{r['pipeline']} {r['shape']} {r['mode']} graphs:", json.dumps(r["graphs"]))


def isolated(a) -> None:
    """--isolate: each mode as a child process of this script (the same arguments, that one mode), eager
    first, their JSON merged into one: one mode's state (torch.compile's, CUDA graph pools) cannot change
    another's timing."""
    import tempfile

    from scripts.bench_e2e import run_children

    modes = [m for m in a.modes.split(",") if m]
    if "eager" in modes and modes[0] != "eager":
        raise SystemExit("bench_pipeline: eager, the reference, must be the first mode")
    tmp = Path(tempfile.mkdtemp(prefix="shapetune-pipe-"))
    base = [sys.executable, __file__, "--device", a.device, "--steps", str(a.steps), "--shapes", a.shapes,
            "--pipelines", a.pipelines, "--iters", str(a.iters), "--refs", str(tmp / "refs.pt")]
    base += [x for db in a.db for x in ("--db", db)] + ["--tiny"] * a.tiny
    rows: list[dict] = []
    head: dict = {}

    def take(mode: str, d: dict) -> None:
        head.update({k: d[k] for k in ("date", "target", "device", "torch")})
        rows.extend(r for r in d["rows"] if r["mode"] == mode)
        ratios(rows)
        if a.json:
            Path(a.json).write_text(json.dumps({**head, "args": vars(a), "rows": rows}, indent=1))
    run_children(base, modes, tmp, take)
    show(rows)


if __name__ == "__main__":
    main()
