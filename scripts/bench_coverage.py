"""Coverage: at random shapes of the grid, the share of op calls and of GPU time served by tuned kernels, and
the end-to-end speed of the SD 1.5 or SDXL UNet step and VAE decode against the same model patched with no
tuned records (vendor-only), measured in one run.

    python scripts/bench_coverage.py --db tuning_logs/sm90_h200_sd15_grid.jsonl.xz --db ... \
        --grid 1-8x256-1024 --samples 8 --seed 0 --json tuning_logs/bench/bench_coverage_h200.json   # GPU, fp16
    python scripts/bench_coverage.py --models sdxl --db tuning_logs/sm90_h200_sdxl_grid.jsonl.xz \
        --json tuning_logs/bench/bench_coverage_sdxl_h200.json                                       # SDXL, 1-2 x 1024²
    python scripts/bench_coverage.py --tiny --device cpu --samples 2 --json /tmp/coverage.json       # smoke run

`--samples` (batch, height, width; default 8, at most the grid's shapes) are drawn from `--grid`
(scheduler.extract.parse_grid; default per model set, scheduler.extract.DEFAULT_GRIDS) with `--seed`.
Per model (`--models`, scheduler.extract.parse_models: "sd15" = unet,vae; "sdxl" = sdxl_unet,sdxl_vae: a
UNet's forward at that batch with 77 text tokens, SDXL's with its added conditions; a VAE's decode of that
many latents; SDXL's VAE is SD 1.5's architecture, decoded here in the run's dtype as with an fp16-safe VAE:
StableDiffusionXLPipeline upcasts a VAE whose config has force_upcast to float32) two copies with the same random weights are `kernels.optimize`d (channels_last, patched, a CUDA
graph per call signature): one with a registry over the `--db` files (DBs or JSONL(.xz) exports, merged;
every kernel it serves built up front, imported records re-verified first, as scripts/bench_e2e.py does),
one with a registry over an empty DB (every op on its vendor path: the same patched module tree, cuDNN's
convs with the bias pass, cuBLAS, SDPA, torch's norms). Per shape and model:
  - op calls of one eager forward by outcome (the registry's counts: tuned, vendor_faster, not_tuned,
    outside_buckets, ...), the share tuned;
  - GPU time of one eager forward by kernel category (torch.profiler, scripts/bench_e2e.py's categories):
    the share in TVM kernels (GPU only);
  - median time per call with graphs on (CUDA events around each call after warm-up; host launch
    included) of both copies, their ratio, and the relative L2 of the tuned output against the vendor one.
Totals per model: geometric mean of the speedups, means of the shares, the outcome counts summed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import bench_e2e  # noqa: E402  (install_registry, time_calls, kernel_profile, rel_l2: one copy of each)

TINY_GRID = "1-2x64-128"


def build(model: str, tiny: bool, dev, dtype) -> torch.nn.Module:
    from scheduler.extract import VAES
    from scheduler.sd_configs import build_sd15_vae, build_sdxl_unet

    if model == "unet":
        return bench_e2e.build(tiny, dev, dtype)  # seeded
    torch.manual_seed(0)
    # SDXL's UNet is initialized where it runs (2.6e9 random weights: minutes of CPU time in float32)
    m = build_sd15_vae(tiny=tiny) if model in VAES else build_sdxl_unet(tiny=tiny, device=dev)
    return m.to(device=dev, dtype=dtype).eval()


def make_inputs(model: str, m, b: int, h: int, w: int, dev, dtype, tiny: bool) -> dict:
    """Random inputs (seeded): a UNet's latents, timestep and text states (SDXL's: its added conditions too,
    time ids as the pipeline passes them), or a VAE's latents."""
    from scheduler.extract import SEQ, TINY_SEQ, VAES, sdxl_text_embeds_dim

    g = torch.Generator().manual_seed(b * 1_000_003 + h * 1009 + w)
    lat = torch.randn(b, 4, h // 8, w // 8, generator=g).to(dev, dtype).contiguous(memory_format=torch.channels_last)
    if model in VAES:
        return {"z": lat}
    ctx = torch.randn(b, TINY_SEQ if tiny else SEQ, m.config.cross_attention_dim, generator=g).to(dev, dtype)
    x = {"sample": lat, "timestep": torch.tensor(500, device=dev), "encoder_hidden_states": ctx}
    if model == "sdxl_unet":
        x["added_cond_kwargs"] = {
            "text_embeds": torch.randn(b, sdxl_text_embeds_dim(m.config), generator=g).to(dev, dtype),
            "time_ids": torch.tensor([[h, w, 0, 0, h, w]] * b, device=dev, dtype=dtype)}
    return x


def output(model: str, out) -> torch.Tensor:
    return (out.sample if hasattr(out, "sample") else out[0]).float()


def called_keys(models, shapes, dtype: str, tiny: bool) -> set[str]:
    """Keys of every workload the models call at `shapes` (scheduler.extract, meta device) and of its bucket:
    the records a call there can resolve to (exact record, then bucket record)."""
    from scheduler.extract import model_workloads
    from shapetune.buckets import DEFAULT

    keys = set()
    for model in models:
        for b, h, w in shapes:
            for op in model_workloads(model, batch=b, height=h, width=w, dtype=dtype, tiny=tiny):
                bw = DEFAULT.bucket_of(op.workload)
                keys |= {op.workload.key} | ({bw.key} if bw is not None else set())
    return keys


def install_registry(dbs: list[str], target, keys: set[str] | None):
    """scripts/bench_e2e.py's install_registry over the `dbs`, the lines of JSONL exports cut to records
    and baselines of workloads in `keys` (None: all): an import is re-verified here before it is served
    (one build and run per workload), so re-verify only what the sampled shapes can call. Lines are
    copied verbatim (their sha256 stays valid)."""
    import lzma

    from shapetune.workload import Workload

    if keys is None:
        return bench_e2e.install_registry(dbs, target)
    tmp = Path(tempfile.mkdtemp(prefix="shapetune-coverage-"))
    cut = []
    for i, p in enumerate(dbs):
        if not str(p).endswith((".jsonl", ".jsonl.xz")):
            cut.append(p)
            continue
        kept, n, k = [], 0, 0
        with (lzma.open(p, "rt") if str(p).endswith(".xz") else open(p)) as f:
            for line in f:
                d = json.loads(line) if line.strip() else {}
                entry = d.get("type") in ("record", "baseline")
                hit = entry and Workload.from_json(d["workload"]).key in keys
                n, k = n + entry, k + hit
                if hit or not entry:
                    kept.append(line)
        out = tmp / f"{i}_{Path(p).name.split('.')[0]}.jsonl"
        out.write_text("".join(kept))
        print(f"{p}: {k} of {n} records and baselines are of workloads the sampled shapes call")
        cut.append(str(out))
    return bench_e2e.install_registry(cut, target)


def geomean(xs) -> float | None:
    xs = [x for x in xs if x and x > 0 and math.isfinite(x)]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def measure(model: str, pair: dict, x: dict, a, is_gpu: bool) -> dict:
    """One shape: outcome counts, GPU time shares, latency of both copies (see the module docstring)."""
    import kernels
    from kernels.registry import set_registry

    from scheduler.extract import VAES

    method = "decode" if model in VAES else "forward"
    row: dict = {}
    outs = {}
    for variant, (m, report, reg) in pair.items():
        set_registry(reg)
        fn = lambda: getattr(m, method)(**x)  # noqa: E731  (the graphed call)
        g = report.components["model"].graphs.get(method)
        eager = lambda: (g.inner if g else getattr(m, method))(**x)  # noqa: E731
        r = {"first_call_s": bench_e2e.first_call_s(fn, is_gpu),
             "us": bench_e2e.time_calls(fn, a.iters, a.warmup, is_gpu)}
        with torch.no_grad():
            outs[variant] = output(model, fn()).cpu()
            reg.calls.clear()
            eager()
        calls = kernels.fallback_summary()
        total = sum(n for d in calls.values() for n in d.values())
        tuned = sum(d.get("tuned", 0) for d in calls.values())
        r.update(calls=calls, op_calls=total, tuned_calls=tuned, tuned_call_share=tuned / total if total else None)
        if is_gpu:
            prof = bench_e2e.kernel_profile(eager)
            cats = prof["by_category_us"]
            r.update(gpu_us=prof["total_us"], by_category_us=cats,
                     tvm_time_share=cats.get("tvm", 0.0) / prof["total_us"] if prof["total_us"] else None)
        row[variant] = r
    row["speedup_vs_vendor"] = row["vendor"]["us"] / row["tuned"]["us"]
    row["rel_l2_vs_vendor"] = bench_e2e.rel_l2(outs["tuned"], outs["vendor"])
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", action="append", default=[], help="tuning DB or JSONL(.xz) export (repeatable)")
    ap.add_argument("--grid", default="", help="shapes to sample (default per model set: "
                                               f"scheduler.extract.DEFAULT_GRIDS; --tiny: {TINY_GRID})")
    ap.add_argument("--samples", type=int, default=0, help="shapes to draw (default: 8, or the grid's if fewer)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default="sd15",
                    help="comma-separated unet, vae, sdxl_unet, sdxl_vae; sd15 = unet,vae; sdxl = sdxl_unet,sdxl_vae")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="the tiny UNet / VAE configs (smoke run)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--all-records", action="store_true",
                    help="import every record of the exports (default: those of workloads the sampled shapes call)")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)

    import kernels
    from kernels.registry import Registry, set_registry
    from scheduler.extract import default_grid, parse_grid, parse_models
    from shapetune.db import TuningDB
    from shapetune.target import detect

    try:
        models = parse_models(a.models)
        grid = parse_grid(a.grid or (TINY_GRID if a.tiny else default_grid(models)))
    except ValueError as e:
        raise SystemExit(f"bench_coverage: {e}") from None
    missing = [p for p in a.db if not Path(p).is_file()]
    if missing:
        raise SystemExit(f"bench_coverage: --db {missing[0]}: no such file")
    a.samples = a.samples or min(8, len(grid))
    if not 1 <= a.samples <= len(grid):
        raise SystemExit(f"bench_coverage: --samples {a.samples}: between 1 and the grid's {len(grid)} shapes")
    shapes = sorted(random.Random(a.seed).sample(grid, a.samples), key=lambda s: (s[0] * s[1] * s[2], s))
    dev = torch.device(a.device)
    is_gpu = dev.type == "cuda"
    dtype = torch.float16 if is_gpu else torch.float32
    target = detect("cuda" if is_gpu else "llvm")
    tuned_reg = install_registry(a.db, target, None if a.all_records else
                                 called_keys(models, shapes, "float16" if is_gpu else "float32", a.tiny))
    empty = Path(tempfile.mkdtemp(prefix="shapetune-vendor-")) / "empty.db"
    TuningDB(empty).close()
    vendor_reg = Registry(db_path=empty, target=target)
    print(f"device: {torch.cuda.get_device_name() if is_gpu else 'cpu'}  torch {torch.__version__}  "
          f"{'tiny ' if a.tiny else ''}{'+'.join(models)}, {dtype}, shapes {shapes}", flush=True)

    rows: dict[str, dict] = {}
    doc = {"date": time.strftime("%Y-%m-%d"), "target": target.to_json(),
           "device": torch.cuda.get_device_name() if is_gpu else "cpu", "torch": torch.__version__,
           "command": "python scripts/bench_coverage.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "args": vars(a), "shapes": [f"{b}x{h}x{w}" for b, h, w in shapes], "rows": rows, "totals": {}}

    def dump():  # after every shape: a run cut off by a time limit keeps what it measured
        doc["totals"] = {model: totals(per) for model, per in rows.items() if per}
        if a.json:
            Path(a.json).write_text(json.dumps(doc, indent=1))

    for model in models:
        base = build(model, a.tiny, dev, dtype)
        pair = {}
        for variant, reg in (("tuned", tuned_reg), ("vendor", vendor_reg)):
            m = base if variant == "vendor" else copy.deepcopy(base)
            set_registry(reg)
            pair[variant] = (m, kernels.optimize(m, max_graphs=2), reg)
        rows[model] = per = {}
        for b, h, w in shapes:
            s = f"{b}x{h}x{w}"
            per[s] = r = measure(model, pair, make_inputs(model, base, b, h, w, dev, dtype, a.tiny), a, is_gpu)
            t = r["tuned"]
            share = f"{t['tvm_time_share']:.1%}" if t.get("tvm_time_share") is not None else "n/a"
            print(f"[{model} {s}] {t['us'] / 1e3:9.3f} ms vs vendor-only {r['vendor']['us'] / 1e3:9.3f} ms "
                  f"({r['speedup_vs_vendor']:.3f}x); op calls tuned {t['tuned_calls']}/{t['op_calls']}; "
                  f"GPU time in TVM kernels {share}; rel L2 {r['rel_l2_vs_vendor']:.1e}; "
                  f"calls {json.dumps(t['calls'])}", flush=True)
            dump()
            if is_gpu:
                torch.cuda.empty_cache()
        for m, report, _ in pair.values():
            kernels.restore(m)
        del base, pair
        if is_gpu:
            torch.cuda.empty_cache()
    set_registry(tuned_reg)
    dump()
    f = lambda v, fmt: format(v, fmt) if v is not None else "n/a"  # noqa: E731
    for model, t in doc["totals"].items():
        print(f"{model}: {t['shapes']} shapes, speedup vs vendor-only geomean {f(t['speedup_vs_vendor_geomean'], '.3f')}x "
              f"({t['speedup_min']:.3f}-{t['speedup_max']:.3f}), op calls tuned {f(t['tuned_call_share_mean'], '.1%')} "
              f"(mean), GPU time in TVM kernels {f(t['tvm_time_share_mean'], '.1%')} (mean); "
              f"outcomes {json.dumps(t['outcomes'])}")
    return doc


def totals(per: dict) -> dict:
    """One model's totals over its shapes: speedups' geomean and range, the shares' means, outcomes summed."""
    outcomes: dict[str, int] = {}
    for r in per.values():
        for d in r["tuned"]["calls"].values():
            for k, n in d.items():
                outcomes[k] = outcomes.get(k, 0) + n
    sp = [r["speedup_vs_vendor"] for r in per.values()]
    return {"shapes": len(per), "speedup_vs_vendor_geomean": geomean(sp), "speedup_min": min(sp), "speedup_max": max(sp),
            "tuned_call_share_mean": mean(r["tuned"]["tuned_call_share"] for r in per.values()),
            "tvm_time_share_mean": mean(r["tuned"].get("tvm_time_share") for r in per.values()),
            "outcomes": dict(sorted(outcomes.items(), key=lambda kv: -kv[1]))}


if __name__ == "__main__":
    main()
