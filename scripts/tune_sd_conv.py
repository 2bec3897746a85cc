"""Tune every conv2d workload of the SD 1.5 UNet (batch 2, 512x512) on this machine's GPU.

    python scripts/tune_sd_conv.py --trials 32 --db sd_conv.db --json sd_conv.json \
        --export tuning_logs/sm90_conv.jsonl.xz

Convs are channels-last implicit GEMMs (kernels/defs_conv.py). ResnetBlock2D's conv2 and
Transformer2DModel's proj_out are tuned with the residual add fused (diffusers adds it right
after). Prints, per workload, the best verified TVM kernel, TVM's dlight default and the vendor
path (cuDNN through F.conv2d on channels_last tensors), all measured in this run, and writes the
summary as JSON.
`--list` prints the workloads and exits (no GPU needed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch import nn  # noqa: E402

from kernels.defs_conv import conv2d_flops, conv2d_workload, stride_padding  # noqa: E402
from scheduler.extract import HANDLERS, ExtractedOp, extract_workloads, sd15_unet_inputs  # noqa: E402
from shapetune.db import TuningDB  # noqa: E402


def _residual_follows(module_name: str) -> bool:
    """diffusers adds a residual right after these convs: ResnetBlock2D's conv2 (output =
    shortcut(input) + conv2(h), output_scale_factor 1 in SD) and Transformer2DModel's 1x1 proj_out
    (output = proj_out(h) + input, use_linear_projection False in SD 1.5)."""
    return (".resnets." in module_name and module_name.endswith(".conv2")
            or ".attentions." in module_name and module_name.endswith(".proj_out"))


def sd15_conv_workloads(batch: int = 2, height: int = 512, width: int = 512, dtype: str = "float16",
                        fuse_residual: bool = True) -> list[ExtractedOp]:
    """The distinct conv2d workloads of one SD 1.5 UNet forward pass."""
    from scheduler.sd_configs import build_sd15_unet

    unet = build_sd15_unet(device="meta")
    ops = extract_workloads(unet, sd15_unet_inputs(batch, height, width, device="meta"), dtype,
                            handlers={nn.Conv2d: HANDLERS[nn.Conv2d]})
    out: dict = {}
    for op in ops:
        w = op.workload
        groups = {False: list(op.modules)}
        if fuse_residual:
            groups = {r: [m for m in op.modules if _residual_follows(m) == r] for r in (False, True)}
        for res, mods in groups.items():
            if not mods:
                continue
            d, (s, p) = w.dim, stride_padding(w)
            ww = conv2d_workload(d["n"], d["h"], d["w"], d["ci"], d["co"], d["kh"], d["kw"], s, p, dtype,
                                 "bias" in w.epilogue, res)
            calls = round(op.calls * len(mods) / len(op.modules))
            prev = out.get(ww)
            out[ww] = ExtractedOp(ww, (prev.modules if prev else ()) + tuple(mods),
                                  (prev.calls if prev else 0) + calls)
    return list(out.values())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--db", default="sd_conv.db")
    ap.add_argument("--only", default="", help="comma-separated substrings of workload names")
    ap.add_argument("--limit", type=int, default=0, help="tune only the first N workloads")
    ap.add_argument("--export", default="", help="write this target's records as JSONL(.xz)")
    ap.add_argument("--json", default="", help="write the summary here")
    ap.add_argument("--list", action="store_true", help="print the workloads and exit")
    a = ap.parse_args()

    ops = sd15_conv_workloads(batch=2, height=512, width=512)
    if a.only:
        keys = a.only.split(",")
        ops = [op for op in ops if any(k in op.workload.name for k in keys)]
    if a.limit:
        ops = ops[: a.limit]
    if a.list:
        for op in ops:
            w = op.workload
            print(f"{w.name:60s} {w.layout:18s} calls {op.calls:2d}  {conv2d_flops(w) / 1e9:7.2f} GFLOP  "
                  f"{op.modules[0]}")
        return
    workloads = [op.workload for op in ops]

    from scheduler.tuner import TuneOptions, tune
    from shapetune.target import detect

    target = detect()
    print(f"target: {target.describe()}  [{target.key}]")
    print(f"{len(workloads)} workloads, {a.trials} trials each, db {a.db}", flush=True)
    t0 = time.time()

    def on_workload(rep):
        best = rep.best.latency.median_us if rep.best else float("nan")
        print(f"  {rep.workload.name:60s} measured {rep.measured:3d} {rep.by_status} best {best:9.2f} us "
              f"cudnn {rep.vendor.latency.median_us:9.2f} us  [{time.time() - t0:6.0f} s]", flush=True)

    reports = tune(workloads, target, a.db, TuneOptions(trials=a.trials, batch=a.batch), on_workload=on_workload)

    calls = {op.workload: op.calls for op in ops}
    rows = []
    for rep in reports:
        w = rep.workload
        best_us = rep.best.latency.median_us if rep.best else None
        flops = conv2d_flops(w)
        rows.append({
            "workload": w.name, "key": w.key, "layout": w.layout, "calls": calls.get(w, 1), "flops": flops,
            "best_us": best_us, "best": str(rep.best.candidate) if rep.best else None,
            "dlight_us": rep.dlight.latency.median_us if rep.dlight else None,
            "vendor_us": rep.vendor.latency.median_us,
            "best_tflops": flops / best_us / 1e6 if best_us else None,
            "ratio_vs_vendor": rep.vendor.latency.median_us / best_us if best_us else None,
            "by_status": rep.by_status,
        })
    summary = {"target": target.to_json(), "target_key": target.key, "date": time.strftime("%Y-%m-%d"),
               "trials": a.trials, "vendor": "F.conv2d channels_last (cuDNN)", "rows": rows,
               "seconds": time.time() - t0}
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=1))
    if a.export:
        with TuningDB(a.db) as db:
            n = db.export_jsonl(a.export, target_key=target.key)
        print(f"exported {n} lines to {a.export}")
    print(f"\n{'workload':60s} {'layout':16s} {'tvm_us':>9s} {'dlight_us':>9s} {'cudnn_us':>9s} {'cudnn/tvm':>9s}  best")
    for r in rows:
        f = lambda v: f"{v:9.2f}" if v else "      n/a"  # noqa: E731
        ratio = f"{r['ratio_vs_vendor']:9.3f}" if r["ratio_vs_vendor"] else "      n/a"
        print(f"{r['workload']:60s} {r['layout']:16s} {f(r['best_us'])} {f(r['dlight_us'])} {f(r['vendor_us'])} "
              f"{ratio}  {r['best']}")


if __name__ == "__main__":
    main()
