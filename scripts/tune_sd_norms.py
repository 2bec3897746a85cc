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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch import nn  # noqa: E402

from kernels.defs_norm import group_norm_workload  # noqa: E402
from scheduler import jobs  # noqa: E402
from scheduler.extract import HANDLERS, ExtractedOp, extract_workloads, sd15_unet_inputs  # noqa: E402


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


def bandwidth(rep) -> dict:
    """Achieved bandwidth of the tuned kernel and of torch, as fractions of a copy of the same bytes."""
    w = rep.workload
    x_bytes = 2 * (w.dim["n"] * w.dim["hw"] * w.dim["c"] if w.op == "group_norm" else w.dim["m"] * w.dim["c"])
    moved, cp = 2 * x_bytes, copy_us(w)  # x read once + y written once: the minimum
    best_us = rep.best.latency.median_us if rep.best else None
    return {"copy_us": cp, "copy_gbps": moved / cp / 1e3,
            "best_gbps": moved / best_us / 1e3 if best_us else None,
            "vendor_gbps": moved / rep.vendor.latency.median_us / 1e3,
            "best_frac_of_copy": cp / best_us if best_us else None,
            "vendor_frac_of_copy": cp / rep.vendor.latency.median_us}


def main():
    ap = jobs.add_job_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), "sd_norms.db")
    ap.add_argument("--no-silu", action="store_true", help="do not fuse the SiLU that follows GroupNorms")
    a = ap.parse_args()
    ops = sd15_norm_workloads(fuse_silu=not a.no_silu)
    rows = jobs.run(jobs.select([op.workload for op in ops], a), a,
                    vendor="F.group_norm (+F.silu) on channels_last / F.layer_norm",
                    calls={op.workload: op.calls for op in ops}, extra=bandwidth)
    f = lambda v: f"{v:6.2f}" if v else "   n/a"  # noqa: E731
    print(f"\n{'workload':52s} {'tvm/copy':>8s} {'torch/copy':>10s}  (fraction of copy bandwidth)")
    for r in rows:
        print(f"{r['workload']:52s} {f(r['best_frac_of_copy']):>8s} {f(r['vendor_frac_of_copy']):>10s}")


if __name__ == "__main__":
    main()
