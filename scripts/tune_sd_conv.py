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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch import nn  # noqa: E402

from kernels.defs_conv import conv2d_flops, conv2d_workload, stride_padding  # noqa: E402
from scheduler import jobs  # noqa: E402
from scheduler.extract import HANDLERS, ExtractedOp, extract_workloads, sd15_unet_inputs  # noqa: E402


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
    ap = jobs.add_job_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), "sd_conv.db")
    ap.add_argument("--list", action="store_true", help="print the workloads and exit")
    a = ap.parse_args()
    ops = sd15_conv_workloads(batch=2, height=512, width=512)
    workloads = jobs.select([op.workload for op in ops], a)
    if a.list:
        calls = {op.workload: (op.calls, op.modules[0]) for op in ops}
        for w in workloads:
            n, first = calls.get(w, (0, ""))
            print(f"{w.name:60s} {w.layout:18s} calls {n:2d}  {conv2d_flops(w) / 1e9:7.2f} GFLOP  {first}")
        return
    jobs.run(workloads, a, vendor="F.conv2d on channels_last (cuDNN)",
             calls={op.workload: op.calls for op in ops}, flops=conv2d_flops)


if __name__ == "__main__":
    main()
