"""Tune every GroupNorm / LayerNorm workload of the SD 1.5 UNet (batch 2, 512x512) on this GPU.

    python scripts/tune_sd_norms.py --trials 32 --db sd_norms.db --json sd_norms.json \
        --export tuning_logs/sm90_norms.jsonl.xz

GroupNorms followed by SiLU in the model (ResnetBlock2D norm1/norm2, conv_norm_out) are tuned with
the SiLU fused. Prints, per workload, the best verified TVM kernel, TVM's dlight default and torch
(F.group_norm (+ F.silu) on a channels_last NCHW tensor / F.layer_norm), all measured in this run,
and the achieved bandwidth: bytes of x read + y written over the time, as a fraction of a
device-to-device copy of the same bytes (torch.empty_like(x).copy_(x)) timed the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch import nn  # noqa: E402

from kernels.defs_norm import group_norm_workload  # noqa: E402
from scheduler.extract import HANDLERS, ExtractedOp, extract_workloads, sd15_unet_inputs  # noqa: E402
from scheduler.tuner import TuneOptions, tune  # noqa: E402
from shapetune.buckets import DEFAULT  # noqa: E402
from shapetune.db import TuningDB  # noqa: E402
from shapetune.target import detect  # noqa: E402


def _silu_follows(module_name: str) -> bool:
    """diffusers applies SiLU right after these GroupNorms (ResnetBlock2D, UNet output)."""
    return ".resnets." in module_name and module_name.rsplit(".", 1)[-1] in ("norm1", "norm2") \
        or module_name == "conv_norm_out"


def sd15_norm_workloads(batch: int = 2, height: int = 512, width: int = 512, dtype: str = "float16",
                        fuse_silu: bool = True) -> list[ExtractedOp]:
    """The distinct group_norm / layer_norm workloads of one SD 1.5 UNet forward pass."""
    from scheduler.sd_configs import build_sd15_unet

    unet = build_sd15_unet(device="meta")
    ops = extract_workloads(unet, sd15_unet_inputs(batch, height, width, device="meta"), dtype,
                            handlers={k: HANDLERS[k] for k in (nn.GroupNorm, nn.LayerNorm)})
    out: dict = {}
    for op in ops:
        w = op.workload
        groups = {False: list(op.modules)}
        if w.op == "group_norm" and fuse_silu:
            groups = {s: [m for m in op.modules if _silu_follows(m) == s] for s in (False, True)}
        for silu, mods in groups.items():
            if not mods:
                continue
            d = w.dim
            ww = group_norm_workload(d["n"], d["hw"], d["c"], d["g"], dtype, float(w.layout.split("eps=")[1]),
                                     silu) if w.op == "group_norm" else w
            calls = round(op.calls * len(mods) / len(op.modules))
            prev = out.get(ww)
            out[ww] = ExtractedOp(ww, (prev.modules if prev else ()) + tuple(mods), (prev.calls if prev else 0) + calls)
    return list(out.values())


def copy_us(w, repeats: int = 50) -> float:
    """Median time of a device-to-device copy of x (CUDA events, GPU kept busy, rotated buffers)."""
    import math

    import torch

    from kernels.defs import opdef
    from scheduler.runner import RunOptions, _time

    opts = RunOptions(repeats=repeats)
    dev = torch.device("cuda")
    x = opdef(w.op).inputs(w, dev, torch.Generator(device=dev).manual_seed(0))[0]
    n = max(1, min(opts.max_sets, math.ceil(opts.rotate_bytes / (2 * x.numel() * x.element_size()))))
    sets = [(x.clone(), torch.empty_like(x)) for _ in range(n)]
    samples = _time(lambda s: s[1].copy_(s[0]), sets, opts, True)
    return sorted(samples)[len(samples) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--db", default="sd_norms.db")
    ap.add_argument("--only", default="", help="comma-separated substrings of workload names")
    ap.add_argument("--limit", type=int, default=0, help="tune only the first N workloads")
    ap.add_argument("--no-silu", action="store_true", help="do not fuse the SiLU that follows GroupNorms")
    ap.add_argument("--buckets", action="store_true", help="tune each workload's shape bucket instead")
    ap.add_argument("--export", default="", help="write this target's records as JSONL(.xz)")
    ap.add_argument("--json", default="sd_norms.json", help="write the summary here")
    a = ap.parse_args()

    target = detect()
    ops = sd15_norm_workloads(fuse_silu=not a.no_silu)
    workloads = [op.workload for op in ops]
    if a.only:
        keys = a.only.split(",")
        workloads = [w for w in workloads if any(k in w.name for k in keys)]
    if a.limit:
        workloads = workloads[: a.limit]
    if a.buckets:
        workloads = list(dict.fromkeys(DEFAULT.bucket_of(w) for w in workloads))
    print(f"target: {target.describe()}  [{target.key}]")
    print(f"{len(workloads)} workloads, {a.trials} trials each, db {a.db}", flush=True)
    calls = {op.workload: op.calls for op in ops}

    t0 = time.time()

    def on_workload(rep):
        best = rep.best.latency.median_us if rep.best else float("nan")
        print(f"  {rep.workload.name:48s} measured {rep.measured:3d} {rep.by_status} best {best:8.2f} us "
              f"vendor {rep.vendor.latency.median_us:8.2f} us  [{time.time() - t0:6.0f} s]", flush=True)

    reports = tune(workloads, target, a.db, TuneOptions(trials=a.trials, batch=a.batch), on_workload=on_workload)

    rows = []
    for rep in reports:
        w = rep.workload
        x_bytes = 2 * (w.dim["n"] * w.dim["hw"] * w.dim["c"] if w.op == "group_norm" else w.dim["m"] * w.dim["c"])
        moved = 2 * x_bytes  # x read once + y written once: the minimum
        cp = copy_us(w)
        best_us = rep.best.latency.median_us if rep.best else None
        rows.append({
            "workload": w.name, "key": w.key, "calls_per_step": calls.get(w),
            "best_us": best_us, "best": str(rep.best.candidate) if rep.best else None,
            "dlight_us": rep.dlight.latency.median_us if rep.dlight else None,
            "vendor_us": rep.vendor.latency.median_us, "copy_us": cp,
            "ratio_vs_vendor": rep.vendor.latency.median_us / best_us if best_us else None,
            "best_gbps": moved / best_us / 1e3 if best_us else None,
            "vendor_gbps": moved / rep.vendor.latency.median_us / 1e3,
            "copy_gbps": moved / cp / 1e3,
            "best_frac_of_copy": cp / best_us if best_us else None,
            "vendor_frac_of_copy": cp / rep.vendor.latency.median_us,
            "by_status": rep.by_status,
        })
    summary = {"target": target.to_json(), "target_key": target.key, "date": time.strftime("%Y-%m-%d"),
               "trials": a.trials, "rows": rows, "seconds": time.time() - t0}
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=1))
    if a.export:
        with TuningDB(a.db) as db:
            n = db.export_jsonl(a.export, target_key=target.key)
        print(f"exported {n} lines to {a.export}")
    f = lambda v: f"{v:8.2f}" if v else "     n/a"  # noqa: E731
    print(f"\n{'workload':48s} {'tvm_us':>8s} {'dlight':>8s} {'torch_us':>8s} {'copy_us':>8s} {'torch/tvm':>9s} "
          f"{'tvm/copy':>8s} {'torch/copy':>10s}  best")
    for r in rows:
        print(f"{r['workload']:48s} {f(r['best_us'])} {f(r['dlight_us'])} {f(r['vendor_us'])} {f(r['copy_us'])} "
              f"{f(r['ratio_vs_vendor']):>9s} {f(r['best_frac_of_copy'])} {f(r['vendor_frac_of_copy']):>10s}  {r['best']}")


if __name__ == "__main__":
    main()
