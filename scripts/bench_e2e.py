"""End-to-end: one SD 1.5 UNet step over a matrix of shapes, eager vs torch.compile vs shapetune, in one run.

    python scripts/bench_e2e.py --db tuning_logs/sm90_h200_sd15_norms.jsonl.xz --db tuning_logs/... \
        --shapes 2x512,1x512,4x512,2x768,2x512x768 --json e2e.json     # GPU: fp16; BATCHxRES or BATCHxHxW
    python scripts/bench_e2e.py --tiny --device cpu     # a smoke run of the same code on a tiny UNet

Modes, all on the same random weights and inputs (no model hub: the UNet is built from its config):
  eager            diffusers as users run it (NCHW)
  eager_cl         the same with the model and input in channels_last memory
  compile          torch.compile(unet, dynamic=False) (default mode), channels_last
  compile_ro       torch.compile(unet, mode="reduce-overhead", dynamic=False): inductor plus CUDA graphs
  shapetune_eager  kernels.optimize(unet, graphs=False): patched, channels_last, no graphs (the host path)
  shapetune        kernels.optimize(unet): the same, with a CUDA graph per call signature
  shapetune_nopack shapetune without the packed projections (optimize(fuse_qkv=False, fuse_temb=False)):
                   what one GEMM per attention's input projections and one for the resnets'
                   time-embedding projections gain
  shapetune_noaln  shapetune without add_layer_norm (optimize(fuse_add_norm=False)): what one kernel for
                   each transformer block's residual add and the LayerNorm after it gains
  shapetune_noshift  shapetune without group_norm's shift step (optimize(fuse_norm_shift=False)): what
                   adding conv1's bias and the time embedding inside each resnet's norm2 kernel gains
One model per mode, run over the shapes in order. Per mode and shape: the wall time of the shape's
first call (at the first shape: torch.compile's compile, shapetune's warm-up and capture; at the others:
the cost of a shape change, a recompile or a capture), the median time per UNet call over `--iters`
calls after warm-up (CUDA events around each call: what a pipeline step costs, host launch overhead
included), peak memory allocated and reserved during that shape's calls (weights included), and the
output's relative L2 error against eager NCHW at the same shape. `--profile`: GPU time of one shapetune
forward (its patched eager path) and of one torch.compile call by kernel category, with the number of
kernel launches (torch.profiler). The UNet's weights (1.7 GB in fp16) and activations are far over the H200's L2,
so inputs are not rotated. shapetune rows also print the op calls by outcome. Ratios are against eager
and against compile_ro from this same run. Writes JSON with --json.
"""

from __future__ import annotations

import argparse
import gc
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


def inputs(tiny: bool, batch: int, height: int, width: int | None = None, device="cpu", dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(1)
    width = width or height
    (lh, lw), ctx = ((8, 8), (7, 24)) if tiny else ((height // 8, width // 8), (77, 768))
    return dict(sample=torch.randn(batch, 4, lh, lw, generator=g).to(device, dtype),
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


def install_registry(dbs: list[str], target):
    """A registry for `target` installed for the process, and every kernel it dispatches compiled up
    front, in parallel (not on first call). Over one temporary DB merged from every given export / DB
    (their imports re-verified here), or over the one `.db` given, in place: its re-verification
    verdicts stay in it, so the next script over it re-verifies nothing (scripts/bench_*.py in a row
    on one GPU machine: `shapetune db import` the exports into one DB first)."""
    from kernels.registry import Registry, set_registry
    from shapetune.db import TuningDB

    if len(dbs) == 1 and str(dbs[0]).endswith(".db"):
        db_path = Path(dbs[0])
    else:
        db_path = Path(tempfile.mkdtemp(prefix="shapetune-bench-")) / "bench.db"
        with TuningDB(db_path) as db:
            for p in dbs:
                db.merge_from(p)
    reg = Registry(db_path=db_path, target=target)
    set_registry(reg)
    t0 = time.time()
    built = reg.prebuild()
    print(f"kernels: {built} in {time.time() - t0:.0f} s")
    return reg


def first_call_s(fn, is_gpu: bool) -> float:
    if is_gpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        fn()
    if is_gpu:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def make(mode: str, tiny: bool, dev, dtype):
    import kernels

    if mode == "eager":
        return build(tiny, dev, dtype), None
    m = build(tiny, dev, dtype).to(memory_format=torch.channels_last)
    if mode.startswith("shapetune"):
        pack = mode != "shapetune_nopack"
        report = kernels.optimize(m, graphs=mode != "shapetune_eager", fuse_qkv=pack, fuse_temb=pack,
                                  fuse_add_norm=mode != "shapetune_noaln", fuse_norm_shift=mode != "shapetune_noshift")
        return m, report
    # dynamic=False: one specialized graph per shape, the fastest torch.compile serves a shape with (its
    # default, automatic dynamic shapes, recompiles a symbolic graph on the first shape change instead)
    if mode == "compile":
        return torch.compile(m, dynamic=False), None
    if mode == "compile_ro":  # inductor + CUDA graphs (cudagraph trees)
        return torch.compile(m, mode="reduce-overhead", dynamic=False), None
    return m, None


def parse_shape(s: str) -> tuple[int, int, int]:
    """BATCHxRES or BATCHxHxW -> (batch, height, width) in pixels."""
    v = [int(p) for p in s.split("x")]
    if len(v) == 2:
        return v[0], v[1], v[1]
    if len(v) == 3:
        return v[0], v[1], v[2]
    raise SystemExit(f"bench_e2e: shape {s!r} is not BATCHxRES or BATCHxHxW")


def kernel_profile(fn, top: int = 25, gpu: bool = True) -> dict:
    """GPU time of one call by kernel category and the top kernels (torch.profiler, CUDA activities; on
    the CPU its ops by the same categories, a smoke run of this code)."""
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if gpu else (lambda: None)
    with torch.no_grad():
        fn()
        sync()
        with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
            fn()
            sync()
    cats: dict[str, float] = {}
    launches = 0
    kern = []
    for e in prof.key_averages():
        us = (e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total) if gpu else e.self_cpu_time_total
        if us <= 0:
            continue
        n = e.key.lower()
        c = ("attention" if any(k in n for k in ("flash", "fmha", "attention", "sdpa")) else
             "conv" if any(k in n for k in ("conv", "fprop", "implicit", "dgrad", "cudnn")) else
             "gemm" if any(k in n for k in ("gemm", "cutlass", "sm90_xmma", "cublas", "matmul", "nvjet")) else
             "tvm" if n.startswith("shapetune") or "_kernel" in n and "at::" not in n and "void" not in n else
             "copy" if any(k in n for k in ("copy", "cat", "memcpy", "memset")) else
             "elementwise" if "elementwise" in n or "vectorized" in n or "unrolled" in n else
             "reduce" if "reduce" in n or "norm" in n else "other")
        cats[c] = cats.get(c, 0.0) + us
        launches += e.count
        kern.append((us, c, e.count, e.key[:400]))
    kern.sort(reverse=True)
    row = lambda u, c, k, n: {"us": u, "category": c, "count": k, "name": n}  # noqa: E731
    return {"by_category_us": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
            "total_us": sum(cats.values()), "kernels": launches,
            "top": [row(u, c, k, n[:120]) for u, c, k, n in kern[:top]],
            # every kernel between the big ops (what fusion could still remove), its name whole enough
            # to tell a torch copy's functor (direct_copy, CatArrayBatchedCopy, ...)
            "between": [row(u, c, k, n) for u, c, k, n in kern if c in ("copy", "elementwise", "reduce", "other")]}


def eager_profile(m, inp: dict, is_gpu: bool) -> dict:
    """kernel_profile of one call of an optimized model through its patched eager path: called as users
    call it (module hooks run, e.g. kernels/temb.py's), with graph capture off for that call. Holds no
    reference to the model afterwards (one kept by the caller's scope held a whole UNet, 1.7 GB, into the
    next mode's peak-memory figure)."""
    import os

    prev = os.environ.get("SHAPETUNE_GRAPHS")
    os.environ["SHAPETUNE_GRAPHS"] = "0"
    try:
        return kernel_profile(lambda: m(**inp), gpu=is_gpu)
    finally:
        if prev is None:
            del os.environ["SHAPETUNE_GRAPHS"]
        else:
            os.environ["SHAPETUNE_GRAPHS"] = prev


def ratios(rows: dict[str, dict], shapes: list[str]) -> None:
    """Each row's speedups against eager and torch.compile reduce-overhead at its shape, where those ran."""
    for s in shapes:
        base = rows.get("eager", {}).get(s, {}).get("us")
        ro = rows.get("compile_ro", {}).get(s, {}).get("us")
        for per in rows.values():
            if s in per:
                per[s]["speedup_vs_eager"] = base / per[s]["us"] if base else None
                per[s]["speedup_vs_compile_ro"] = ro / per[s]["us"] if ro else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", action="append", default=[], help="tuning DB or JSONL(.xz) export (repeatable)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a tiny UNet config (smoke test)")
    ap.add_argument("--shapes", default="2x512,1x512",
                    help="BATCHxRES or BATCHxHxW per shape, comma-separated; the first is the first call")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--modes", default="eager,eager_cl,compile_ro,shapetune_eager,shapetune")
    ap.add_argument("--profile", action="store_true",
                    help="GPU time by kernel category of the shapetune (eager path) and torch.compile modes")
    ap.add_argument("--json", default="")
    ap.add_argument("--isolate", action="store_true",
                    help="each mode in its own process (one model's state, e.g. torch.compile's, cannot change "
                         "another's timing); eager's outputs reach the others through a file")
    ap.add_argument("--refs", default="", help=argparse.SUPPRESS)  # --isolate's children: eager's outputs
    a = ap.parse_args()
    if a.isolate:
        return isolated(a)

    import kernels
    from shapetune.target import detect

    dev = torch.device(a.device)
    is_gpu = dev.type == "cuda"
    dtype = torch.float16 if is_gpu else torch.float32
    target = detect("cuda" if is_gpu else "llvm")
    install_registry(a.db, target)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    shapes = [s for s in a.shapes.split(",") if s]
    xs = {s: inputs(a.tiny, *parse_shape(s), dev, dtype) for s in shapes}
    print(f"device: {torch.cuda.get_device_name() if is_gpu else 'cpu'}  torch {torch.__version__}  "
          f"{'tiny' if a.tiny else 'SD 1.5'} UNet, {dtype}, shapes {shapes}")
    refs: dict[str, torch.Tensor] = {}
    rows: dict[str, dict] = {}
    graphs: dict[str, dict] = {}

    def save() -> None:
        ratios(rows, shapes)
        if a.json:
            Path(a.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "target": target.to_json(),
                                                "device": torch.cuda.get_device_name() if is_gpu else "cpu",
                                                "torch": torch.__version__, "args": vars(a), "rows": rows,
                                                "graphs": graphs}, indent=1))
    for mode in a.modes.split(","):
        m, report = make(mode, a.tiny, dev, dtype)
        per_shape = {}
        for i, s in enumerate(shapes):
            x = xs[s]
            inp = x if mode == "eager" else {**x, "sample": x["sample"].contiguous(memory_format=torch.channels_last)}
            if is_gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            first = first_call_s(lambda: m(**inp), is_gpu)
            t = time_calls(lambda: m(**inp), a.iters, a.warmup, is_gpu)
            with torch.no_grad():
                out = m(**inp).sample.float()
            if s not in refs and a.refs and mode != "eager":
                refs.update(torch.load(a.refs))
            if s not in refs:
                if mode != "eager":
                    raise SystemExit("bench_e2e: the first mode must be eager (the reference)")
                refs[s] = out.cpu()
                if a.refs:
                    torch.save(refs, a.refs)
            r = {"us": t, ("first_call_s" if i == 0 else "shape_change_s"): first,
                 "rel_l2_vs_eager": rel_l2(out.cpu(), refs[s])}
            if is_gpu:
                r["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
                r["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2 ** 30
            if report is not None:
                r["calls"] = kernels.fallback_summary()
                kernels.get_registry().calls.clear()
                if a.profile:
                    r["profile"] = eager_profile(m, inp, is_gpu)
                    kernels.get_registry().calls.clear()  # its op calls are not the next shape's or mode's
            elif a.profile and is_gpu and mode.startswith("compile"):  # its graph replay's kernels, where CUPTI sees them
                r["profile"] = kernel_profile(lambda: m(**inp))
            per_shape[s] = r
            rows[mode] = per_shape
            save()  # after every shape: a run cut short (a time limit, a slow compile) keeps what it measured
            del out
        if report is not None:
            graphs[mode] = {k: dict(v) for k, v in report.graph_stats().items()}
            caps = [c for comp in report.components.values() for g in comp.graphs.values() for c in g.capture_s]
            if caps:
                graphs[mode]["capture_s"] = caps
            kernels.restore(m)
        rows[mode] = per_shape
        save()
        m = report = None
        gc.collect()  # the mode's model and graphs, before the next mode's peak memory is measured
        if mode.startswith("compile"):
            torch._dynamo.reset()
        if is_gpu:
            torch.cuda.empty_cache()
    show(rows, graphs, shapes)


def show(rows: dict, graphs: dict, shapes: list[str]) -> None:
    modes = list(rows)
    for s in shapes:
        print(f"\n[{s}] {'mode':16s} {'ms/call':>9s} {'eager/mode':>10s} {'ro/mode':>8s} {'1st/change s':>12s} "
              f"{'peak GiB':>9s} {'rel L2':>9s}")
        for mode in modes:
            if s not in rows[mode]:
                continue
            r = rows[mode][s]
            f = lambda v, w, p: f"{v:{w}.{p}f}" if isinstance(v, float) else f"{'n/a':>{w}s}"  # noqa: E731
            fc = r.get("first_call_s", r.get("shape_change_s"))
            print(f"[{s}] {mode:16s} {r['us'] / 1e3:9.3f} {f(r['speedup_vs_eager'], 10, 2)} "
                  f"{f(r['speedup_vs_compile_ro'], 8, 2)} {fc:12.2f} {f(r.get('peak_mem_gib'), 9, 2)} "
                  f"{r['rel_l2_vs_eager']:9.2e}")
    for mode in modes:
        for s in shapes:
            r = rows[mode].get(s, {})
            if "calls" in r:
                print(f"{mode} [{s}] op calls:", json.dumps(r["calls"]))
            if "profile" in r:
                print(f"{mode} [{s}] GPU us by category:", json.dumps({k: round(v) for k, v in r["profile"]["by_category_us"].items()}))
    print("graphs:", json.dumps(graphs))


def isolated(a) -> None:
    """--isolate: run each mode as a child process of this script (the same arguments, that one mode),
    eager first (its outputs, the reference, saved for the others), and merge their JSON into one."""
    modes = [m for m in a.modes.split(",") if m]
    if modes[0] != "eager":
        raise SystemExit("bench_e2e: the first mode must be eager (the reference)")
    shapes = [s for s in a.shapes.split(",") if s]
    tmp = Path(tempfile.mkdtemp(prefix="shapetune-e2e-"))
    base = [sys.executable, __file__, "--device", a.device, "--shapes", a.shapes, "--iters", str(a.iters),
            "--warmup", str(a.warmup), "--refs", str(tmp / "refs.pt")]
    base += [x for db in a.db for x in ("--db", db)] + ["--tiny"] * a.tiny + ["--profile"] * a.profile
    rows: dict[str, dict] = {}
    graphs: dict[str, dict] = {}
    head = {}

    def save() -> None:
        ratios(rows, shapes)
        if a.json:
            Path(a.json).write_text(json.dumps({**head, "args": vars(a), "rows": rows, "graphs": graphs}, indent=1))
    def take(mode: str, d: dict) -> None:
        head.update({k: d[k] for k in ("date", "target", "device", "torch")})
        rows[mode] = d["rows"].get(mode, {})
        graphs.update(d.get("graphs", {}))
        save()
    run_children(base, modes, tmp, take)
    show(rows, graphs, shapes)


def run_children(base: list[str], modes: list[str], tmp: Path, take) -> None:
    """--isolate's loop (bench_e2e, bench_pipeline): `base` + `--modes M --json tmp/M.json` per mode, one
    child process after another, and take(M, its JSON) after each, also when a time limit interrupts the
    run (what that child wrote so far is kept)."""
    import subprocess

    for mode in modes:
        out = tmp / f"{mode}.json"
        try:
            subprocess.run([*base, "--modes", mode, "--json", str(out)], check=False)
        finally:
            if out.exists():
                take(mode, json.loads(out.read_text()))
            else:
                print(f"{Path(base[1]).stem}: mode {mode} wrote no result")


if __name__ == "__main__":
    main()
