"""End-to-end: one SD 1.5 UNet step, eager vs torch.compile vs shapetune, in one run.

    python scripts/bench_e2e.py --db tuning_logs/sm90_h200_sd15_norms.jsonl.xz --db tuning_logs/... \
        --json e2e.json                       # GPU: fp16, batch 2, 512x512 (64x64 latents)
    python scripts/bench_e2e.py --tiny --device cpu     # a smoke run of the same code on a tiny UNet

Modes, all on the same random weights and inputs (no model hub: the UNet is built from its config):
  eager            diffusers as users run it (NCHW)
  eager_cl         the same with the model and input in channels_last memory
  compile          torch.compile(unet) (default mode), channels_last
  compile_ro       torch.compile(unet, mode="reduce-overhead"): inductor plus CUDA graphs
  shapetune_eager  kernels.optimize(unet, graphs=False): patched, channels_last, no graphs (the host path)
  shapetune        kernels.optimize(unet): the same, with a CUDA graph per call signature
Per mode: the first call's wall time (torch.compile's compile, shapetune's warm-up and capture), the
median time per UNet call over `--iters` calls after warm-up (CUDA events around each call: what a
pipeline step costs, host launch overhead included), a first call at a second shape (`--shape2`,
e.g. 1x512: batch 1, 512²: the cost of a shape change), peak memory allocated during the mode's calls
(weights included; the model is built per mode and freed after it), and the output's relative L2 error
against eager NCHW. The UNet's weights (1.7 GB in fp16) and activations are far over the H200's L2,
so inputs are not rotated. shapetune rows also print the op calls by outcome. Ratios are against eager
and against compile_ro from this same run. Writes JSON with --json.
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


def install_registry(dbs: list[str], target):
    """One temporary DB over every given export / DB, a registry over it for `target` installed for
    the process, and every kernel it dispatches compiled up front, in parallel (not on first call)."""
    from kernels.registry import Registry, set_registry
    from shapetune.db import TuningDB

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
        report = kernels.optimize(m, graphs=mode != "shapetune_eager")
        return m, report
    if mode == "compile":
        return torch.compile(m), None
    if mode == "compile_ro":  # inductor + CUDA graphs (cudagraph trees)
        return torch.compile(m, mode="reduce-overhead"), None
    return m, None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", action="append", default=[], help="tuning DB or JSONL(.xz) export (repeatable)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a tiny UNet config (smoke test)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--shape2", default="1x512", help="BATCHxRES of the shape-change call ('' to skip)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--modes", default="eager,eager_cl,compile_ro,shapetune_eager,shapetune")
    ap.add_argument("--json", default="")
    a = ap.parse_args()

    import kernels
    from shapetune.target import detect

    dev = torch.device(a.device)
    is_gpu = dev.type == "cuda"
    dtype = torch.float16 if is_gpu else torch.float32
    target = detect("cuda" if is_gpu else "llvm")
    install_registry(a.db, target)

    x = inputs(a.tiny, a.batch, a.res, dev, dtype)
    x_cl = {**x, "sample": x["sample"].contiguous(memory_format=torch.channels_last)}
    x2 = None
    if a.shape2:
        b2, r2 = (int(v) for v in a.shape2.split("x"))
        x2 = inputs(a.tiny, b2, r2, dev, dtype)
    ref_model = build(a.tiny, dev, dtype)
    with torch.no_grad():
        ref = ref_model(**x).sample.float()
    del ref_model
    print(f"device: {torch.cuda.get_device_name() if is_gpu else 'cpu'}  torch {torch.__version__}  "
          f"{'tiny' if a.tiny else 'SD 1.5'} UNet, batch {a.batch}, {a.res}², {dtype}")
    rows = {}
    for mode in a.modes.split(","):
        m, report = make(mode, a.tiny, dev, dtype)
        inp = x if mode == "eager" else x_cl
        if is_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        first = first_call_s(lambda: m(**inp), is_gpu)
        t = time_calls(lambda: m(**inp), a.iters, a.warmup, is_gpu)
        with torch.no_grad():
            err = rel_l2(m(**inp).sample.float(), ref)
        row = {"us": t, "first_call_s": first, "rel_l2_vs_eager": err}
        if x2 is not None:
            row["shape2"] = a.shape2
            row["shape2_first_call_s"] = first_call_s(lambda: m(**x2), is_gpu)
        if is_gpu:
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        if report is not None:
            row["calls"] = kernels.fallback_summary()
            row["graphs"] = {k: dict(v) for k, v in report.graph_stats().items()}
            caps = [s for c in report.components.values() for g in c.graphs.values() for s in g.capture_s]
            if caps:
                row["capture_s"] = caps
            kernels.get_registry().calls.clear()
            kernels.restore(m)
        rows[mode] = row
        del m
        if mode.startswith("compile"):
            torch._dynamo.reset()
        if is_gpu:
            torch.cuda.empty_cache()
    base = rows.get("eager", {}).get("us")
    ro = rows.get("compile_ro", {}).get("us")
    print(f"\n{'mode':16s} {'ms/call':>9s} {'eager/mode':>10s} {'ro/mode':>8s} {'1st call s':>10s} "
          f"{'shape2 s':>9s} {'peak GiB':>9s} {'rel L2':>9s}")
    for mode, r in rows.items():
        r["speedup_vs_eager"] = base / r["us"] if base else None
        r["speedup_vs_compile_ro"] = ro / r["us"] if ro else None
        f = lambda v, w, p: f"{v:{w}.{p}f}" if isinstance(v, float) else f"{'n/a':>{w}s}"  # noqa: E731
        print(f"{mode:16s} {r['us'] / 1e3:9.3f} {f(r['speedup_vs_eager'], 10, 2)} {f(r['speedup_vs_compile_ro'], 8, 2)} "
              f"{r['first_call_s']:10.2f} {f(r.get('shape2_first_call_s'), 9, 2)} {f(r.get('peak_mem_gib'), 9, 2)} "
              f"{r['rel_l2_vs_eager']:9.2e}")
    for mode, r in rows.items():
        if "calls" in r:
            print(f"\n{mode} op calls:", json.dumps(r["calls"]))
            print(f"{mode} graphs:", json.dumps(r.get("graphs")), "capture s:", r.get("capture_s"))
    if a.json:
        Path(a.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "target": target.to_json(),
                                            "device": torch.cuda.get_device_name() if is_gpu else "cpu",
                                            "torch": torch.__version__, "args": vars(a), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
