"""Tune the shape buckets that serve a whole grid of SD 1.5 or SDXL shapes (UNet and VAE decoder) for a time budget.

    python scripts/tune_sd_grid.py --grid 1-8x256-1024 --budget 4m --db grid.db \
        --export tuning_logs/sm90_h200_sd15_grid.jsonl.xz --json tuning_logs/sm90_h200_sd15_grid_summary.json
    python scripts/tune_sd_grid.py --models sdxl --budget 4m --db sdxl.db \
        --export tuning_logs/sm90_h200_sdxl_grid.jsonl.xz --json tuning_logs/sm90_h200_sdxl_grid_summary.json
    python scripts/tune_sd_grid.py --tiny --grid 1-2x64 --families norms --budget 20s   # llvm smoke run

`--models sdxl` (= sdxl_unet,sdxl_vae: SDXL base's UNet, with its added conditions and 2048-wide context,
and its VAE, SD 1.5's architecture) tunes SDXL's grid, by default batch 1-2 at 1024² (`--grid` for more:
its shapes share SD 1.5's shape classes, tests/scheduler/test_grid_sdxl.py checks them); the SDXL VAE's
buckets at 1024² are also SD 1.5's grid's.

The grid is every (batch, height, width) of `--grid` (batches 1-8, pixel sizes 256-1024 step 64, square
and not: 1352 shapes). Per shape, each model's calls (`--models`: the UNet's forward, weighted by
`--unet-steps` denoising steps per image, and one VAE decode) are extracted on the meta device and mapped
to their shape buckets (shapetune/buckets.py); calls are summed per bucket over the grid. One extraction
per shape class serves all its shapes (scheduler.extract.shape_class says why they agree;
tests/scheduler/test_grid.py checks it against one extraction per shape). The buckets are then tuned by
the task scheduler (scheduler.task_scheduler: rounds where calls x time x headroom per second is largest)
for `--budget`; the JSON summary and the JSONL(.xz) export are rewritten after every round, so a job cut
off by its time limit keeps what it measured. It ends with the allocation and the scheduler's estimate:
ms per grid shape on the vendor path and as served, and the ms saved per shape per GPU-minute.

conv2d is left out by default: it buckets n only (h and w exact), so the grid has one conv workload set
per resolution (169 here), and tuned convs mostly lose to cuDNN (BENCHMARKS.md); `--families` adds it.
`--skip-tuned FILE` (repeatable) leaves out buckets that a shipped export already holds verified records
for (this GPU's kernels): `shapetune db import` + `db verify` serve those.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scheduler import jobs  # noqa: E402
from scheduler.extract import DEFAULT_GRIDS, FAMILY_RULES, UNETS, default_grid, parse_grid, parse_models  # noqa: E402
from scheduler.task_scheduler import parse_budget  # noqa: E402

DEFAULT_FAMILIES = "linear,geglu,norms,attention,elementwise"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="",
                    help="BATCHESxSIZES or BATCHESxHEIGHTSxWIDTHS, each axis A-B or A,B,... (pixel sizes: multiples "
                         f"of 64, step 64); default per model set: {DEFAULT_GRIDS}")
    ap.add_argument("--models", default="sd15",
                    help="comma-separated unet, vae, sdxl_unet, sdxl_vae; sd15 = unet,vae; sdxl = sdxl_unet,sdxl_vae")
    ap.add_argument("--unet-steps", type=float, default=20,
                    help="UNet calls per VAE decode (a pipeline's denoising steps): the UNets' weight per shape")
    ap.add_argument("--families", default=DEFAULT_FAMILIES, help=f"of {', '.join(FAMILY_RULES)}")
    ap.add_argument("--budget", default="4m", help="wall-clock tuning time: 90s, 4m, 1h")
    ap.add_argument("--trials", type=int, default=0, help="at most this many trials per bucket (0: no cap)")
    ap.add_argument("--batch", type=int, default=8, help="candidates per round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--template", action="append", default=[], help="only these templates (repeatable)")
    ap.add_argument("--skip-tuned", action="append", default=[], metavar="FILE",
                    help="leave out buckets this DB / export holds verified records for (repeatable)")
    ap.add_argument("--tiny", action="store_true", help="the tiny UNet / VAE configs (CPU smoke runs)")
    ap.add_argument("--dry-run", action="store_true", help="list the buckets and their calls, tune nothing")
    ap.add_argument("--db", default="sd_grid.db")
    ap.add_argument("--export", default="", help="write this target's records as JSONL(.xz) after every round")
    ap.add_argument("--json", default="", help="write the summary here after every round")
    a = ap.parse_args(argv)
    try:
        a.budget_s = parse_budget(a.budget)
        models = parse_models(a.models)
        a.grid = a.grid or default_grid(models)
        shapes = parse_grid(a.grid)
    except ValueError as e:
        raise SystemExit(f"tune_sd_grid: {e}") from None
    families = [f for f in a.families.split(",") if f]
    bad = [f for f in families if f not in FAMILY_RULES]
    if bad or not families:
        raise SystemExit(f"tune_sd_grid: unknown or no --families: {', '.join(bad) or '(none)'}")

    from shapetune.target import detect

    target = detect()
    dtype = "float16" if target.is_gpu else "float32"
    t0 = time.time()
    weights = {m: (a.unet_steps if m in UNETS else 1.0) for m in models}
    grid = jobs.grid_bucket_calls(shapes, families, weights, dtype, tiny=a.tiny)
    total = sum(grid.calls.values()) + sum(grid.outside.values())
    outside = ", ".join(f"{op} {n:g}" for op, n in sorted(grid.outside.items())) or "none"
    print(f"grid {a.grid}: {grid.shapes} shapes x {'+'.join(f'{m} x{w:g}' for m, w in weights.items())}, "
          f"{grid.passes} extractions ({time.time() - t0:.0f} s): {len(grid.calls)} buckets serve "
          f"{sum(grid.calls.values()):g} of {total:g} op calls; outside every bucket: {outside}", flush=True)
    calls = grid.calls
    skip = jobs.tuned_keys(a.skip_tuned, target)
    if skip:
        kept = {w: n for w, n in calls.items() if w.key not in skip}
        print(f"--skip-tuned: {len(calls) - len(kept)} buckets already tuned ({sum(calls.values()) - sum(kept.values()):g} "
              f"calls) left out")
        calls = kept
    if a.dry_run or not calls:
        for w, n in calls.items():
            print(f"  {w.name:60s} {n:10g}")
        return None
    meta = {"grid": a.grid, "shapes": grid.shapes, "models": weights, "families": families,
            "buckets": len(grid.calls), "skipped_tuned": len(grid.calls) - len(calls),
            "calls_in_buckets": sum(grid.calls.values()), "calls_outside": grid.outside}
    sched = jobs.run_budget(calls, a, per=grid.shapes, per_name="grid shape", meta=meta)
    served = sum(t.weight for t in sched.tasks if t.served_us is not None)
    skipped = sum(grid.calls.values()) - sum(calls.values())
    print(f"grid op calls in buckets this DB serves a tuned kernel for: {served:g} of {total:g} ({served / total:.1%})"
          + (f"; in buckets the --skip-tuned records cover: {skipped:g} ({skipped / total:.1%})" if skipped else ""))
    return sched


if __name__ == "__main__":
    main()
