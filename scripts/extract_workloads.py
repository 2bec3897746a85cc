"""Print the linear workloads of the SD 1.5 UNet and optionally write them as a workload file.

Usage: python scripts/extract_workloads.py --batch 2 --height 512 --width 512 --out sd15.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scheduler.extract import save_workload_file, sd15_linear_workloads  # noqa: E402


def format_table(ops) -> str:
    """Render extracted ops as a fixed-width table with a total row.

    Parameters
    ----------
    ops : list of ExtractedOp
        From ``sd15_linear_workloads``.

    Returns
    -------
    str
        The table; GFLOP is per call, total GFLOP is summed over all calls.
    """
    rows = [("name", "m", "n", "k", "bias", "calls", "GFLOP", "GFLOP*calls")]
    total = 0.0
    for op in ops:
        d = op.workload.dim
        g = op.workload.flops / 1e9
        total += g * op.calls
        bias = "yes" if "bias" in op.workload.epilogue else "no"
        rows.append((op.workload.name, d["m"], d["n"], d["k"], bias, op.calls, f"{g:.3f}", f"{g * op.calls:.3f}"))
    rows.append(("total", "", "", "", "", sum(op.calls for op in ops), "", f"{total:.3f}"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        cells = [str(c).ljust(widths[0]) if i == 0 else str(c).rjust(widths[i]) for i, c in enumerate(r)]
        lines.append("  ".join(cells))
        if j == 0 or j == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None) -> int:
    """CLI entry point; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one image with CFG)")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--seq", type=int, default=77, help="text tokens")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--modules", action="store_true", help="also list the modules using each workload")
    p.add_argument("--out", type=Path, help="write a workload file for `shapetune tune --workloads`")
    a = p.parse_args(argv)

    ops = sd15_linear_workloads(a.batch, a.height, a.width, a.seq, a.dtype)
    print(f"SD 1.5 UNet, batch {a.batch}, {a.height}x{a.width} (latent {a.height // 8}x{a.width // 8}), "
          f"{len(ops)} unique linear workloads")
    print(format_table(ops))
    if a.modules:
        for op in ops:
            print(f"\n{op.workload.name}:")
            for m in op.modules:
                print(f"  {m}")
    if a.out:
        meta = {"model": "sd15-unet", "batch": a.batch, "height": a.height, "width": a.width, "seq": a.seq}
        save_workload_file(a.out, ops, meta=meta)
        print(f"wrote {len(ops)} workloads to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
