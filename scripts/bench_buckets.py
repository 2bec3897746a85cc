"""Bucket efficiency: how close one bucket kernel comes to a kernel tuned for the exact shape.

    python scripts/bench_buckets.py --trials 32 --db buckets.db --json out.json
    python scripts/bench_buckets.py --family group_norm --trials 16 --db buckets.db --json gn.json
    python scripts/bench_buckets.py --family group_norm,layer_norm --db b.db --json 'bench_buckets_{family}_h200.json'

--family: linear (default), geglu, group_norm, layer_norm, bias_add, gelu_gate, attention, conv2d; each
has SD 1.5 shapes off its buckets' representatives (other batches and resolutions: 768² and 512x768
latents, batches 1, 3 and 5).

For each off-representative shape s: tune s's bucket and s itself with the same trial budget (or
reuse what the DB has), then time both best kernels *on s* in this run, plus the vendor path.
efficiency(s) = time(exact kernel on s) / time(bucket kernel on s); goal (issue 12): geomean >= 0.97 per
family, minimum >= 0.90.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scheduler.builder import build_one  # noqa: E402
from scheduler.runner import VENDOR, RunOptions, measure_one  # noqa: E402
from scheduler.tuner import TuneOptions, tune  # noqa: E402
from shapetune.buckets import DEFAULT  # noqa: E402
from shapetune.db import TuningDB  # noqa: E402
from shapetune.target import detect  # noqa: E402
from shapetune.ops.attention import attention_workload  # noqa: E402
from shapetune.ops.conv import conv2d_workload  # noqa: E402
from shapetune.ops.elementwise import bias_add_workload, gelu_gate_workload  # noqa: E402
from shapetune.ops.geglu import geglu_workload  # noqa: E402
from shapetune.ops.linear import linear_workload  # noqa: E402
from shapetune.ops.norm import add_layer_norm_workload, group_norm_workload, layer_norm_workload  # noqa: E402

# family -> (SD 1.5 shapes at other batch sizes and resolutions than the buckets' representatives on
# the GPU, small odd ones on the CPU): each a function of the dtype giving the workloads
FAMILIES = {
    "linear": (lambda dt: [linear_workload(m, n, k, dt, b) for m, n, k, b in [
                   (12800, 320, 320, False), (3200, 640, 640, False), (800, 1280, 1280, False),
                   (200, 1280, 1280, True), (6000, 320, 1280, True), (77, 320, 768, False),
                   (1000, 5120, 640, True), (2, 1280, 320, True)]],
               lambda dt: [linear_workload(m, n, k, dt, b) for m, n, k, b in [
                   (37, 48, 40, True), (100, 64, 64, False), (13, 24, 40, True)]]),
    "group_norm": (lambda dt: [group_norm_workload(n, hw, c, 32, dt, silu=silu) for n, hw, c, silu in [
                       (3, 3072, 320, True), (1, 6144, 320, True), (3, 768, 640, False), (5, 1536, 640, True),
                       (3, 192, 1280, True), (1, 96, 1280, False)]],
                   lambda dt: [group_norm_workload(n, hw, c, 4, dt, silu=silu) for n, hw, c, silu in [
                       (3, 45, 16, True), (1, 100, 32, False)]]),
    "layer_norm": (lambda dt: [layer_norm_workload(m, c, dt) for m, c in [
                       (6144, 320), (12288, 320), (1536, 640), (384, 1280), (3072, 640)]],
                   lambda dt: [layer_norm_workload(m, c, dt) for m, c in [(37, 48), (100, 64)]]),
    "add_layer_norm": (lambda dt: [add_layer_norm_workload(m, c, dt) for m, c in [
                           (6144, 320), (12288, 320), (1536, 640), (384, 1280), (3072, 640)]],
                       lambda dt: [add_layer_norm_workload(m, c, dt) for m, c in [(37, 48), (100, 64)]]),
    "bias_add": (lambda dt: [bias_add_workload(n, hw, c, dt, e) for n, hw, c, e in [
                     (3, 3072, 320, ("residual",)), (1, 6144, 320, ("shift",)), (3, 768, 640, ()),
                     (5, 1536, 640, ("residual",)), (3, 192, 1280, ("shift",))]],
                 lambda dt: [bias_add_workload(n, hw, c, dt, e) for n, hw, c, e in [
                     (3, 45, 16, ("residual",)), (1, 100, 32, ("shift",))]]),
    "gelu_gate": (lambda dt: [gelu_gate_workload(m, f, dt) for m, f in [
                      (6144, 1280), (12288, 1280), (1536, 2560), (384, 5120)]],
                  lambda dt: [gelu_gate_workload(m, f, dt) for m, f in [(37, 24), (100, 64)]]),
    # rows = batch x latent positions: 768² at batch 1 (9216), 512x768 at batch 1 (6144 / 1536 / 384)
    "geglu": (lambda dt: [geglu_workload(m, f, k, dt) for m, f, k in [
                  (9216, 1280, 320), (6144, 1280, 320), (1536, 2560, 640), (384, 5120, 1280)]],
              lambda dt: [geglu_workload(m, f, k, dt) for m, f, k in [(37, 24, 16), (100, 16, 32)]]),
    # q[b, sq, 8, d]: self-attention at 768² (9216, 2304, 576, 144 tokens), cross-attention on 77 text tokens
    "attention": (lambda dt: [attention_workload(b, sq, skv, 8, d, dt) for b, sq, skv, d in [
                      (1, 9216, 9216, 40), (3, 2304, 2304, 80), (3, 576, 77, 160), (5, 144, 144, 160),
                      (1, 6144, 77, 40)]],
                  lambda dt: [attention_workload(b, sq, skv, 2, 8, dt) for b, sq, skv in [(3, 45, 45), (1, 100, 20)]]),
    # batch off the BATCH edges' bounds (3 in [3, 4], 5 in [5, 8]); h and w stay exact (SD 1.5's 512² levels)
    "conv2d": (lambda dt: [conv2d_workload(n, h, w, ci, co, k, k, 1, k // 2, dt) for n, h, w, ci, co, k in [
                   (3, 64, 64, 320, 320, 3), (5, 32, 32, 640, 640, 3), (3, 16, 16, 1280, 1280, 3),
                   (5, 64, 64, 320, 640, 1)]],
               lambda dt: [conv2d_workload(n, h, w, ci, co, 3, 3, 1, 1, dt) for n, h, w, ci, co in [
                   (3, 8, 8, 16, 16), (5, 6, 6, 8, 16)]]),
}


def family_command(argv: list[str], family: str, json_path: str) -> str:
    """The command that reruns one family of a run over several: --family and --json for it alone."""
    out, it = [], iter(argv)
    for arg in it:
        if arg in ("--family", "--json"):
            out += [arg, family if arg == "--family" else json_path]
            next(it, None)
        elif arg.startswith(("--family=", "--json=")):
            out.append(arg.split("=")[0] + "=" + (family if arg.startswith("--family") else json_path))
        else:
            out.append(arg)
    return "python scripts/bench_buckets.py " + " ".join(out)


def run_family(family: str, a: argparse.Namespace, target) -> dict:
    """Tune one family's off-representative shapes and their buckets, then time both on each shape."""
    dtype = "float16" if target.is_gpu else "float32"
    shapes = FAMILIES[family][0 if target.is_gpu else 1](dtype)
    buckets = [DEFAULT.bucket_of(s) for s in shapes]
    print(f"{family}: {len(shapes)} shapes, {a.trials} trials per exact shape and per bucket", flush=True)
    t0 = time.time()
    tune(list(dict.fromkeys(buckets)) + shapes, target, a.db, TuneOptions(trials=a.trials, batch=a.batch),
         on_workload=lambda r: print(f"  tuned {r.workload.name} {r.by_status} [{time.time() - t0:.0f} s]",
                                     flush=True))
    opts, rows = RunOptions.for_target(target), []
    with TuningDB(a.db) as db, tempfile.TemporaryDirectory() as tmp:
        for s, b in zip(shapes, buckets):
            times, cands = {}, {}
            for label, owner in (("exact", s), ("bucket", b)):
                rec = db.best(owner.key, target.key)
                path, _ = build_one(owner.to_json(), target.to_json(), rec.candidate.to_json(), tmp)
                r = measure_one(s.to_json(), target.to_json(), path, opts, random.randrange(2**31))
                assert r["status"] == "ok", (label, s.name, r)
                times[label], cands[label] = r["latency"]["median_us"], str(rec.candidate)
            v = measure_one(s.to_json(), target.to_json(), VENDOR, opts, 0)
            rows.append({"shape": s.name, "bucket": b.name, "exact_us": times["exact"],
                         "bucket_us": times["bucket"], "vendor_us": v["latency"]["median_us"],
                         "efficiency": times["exact"] / times["bucket"],
                         # which template (and knobs) won each search: why a bucket kernel is slower
                         "exact_candidate": cands["exact"], "bucket_candidate": cands["bucket"]})
    effs = [r["efficiency"] for r in rows]
    geo = math.exp(sum(math.log(e) for e in effs) / len(effs))
    json_path = a.json.format(family=family)
    summary = {"target": target.to_json(), "date": time.strftime("%Y-%m-%d"), "trials": a.trials,
               "command": family_command(sys.argv[1:], family, json_path) if len(a.families) > 1
               else "python scripts/bench_buckets.py " + " ".join(sys.argv[1:]),
               "op": family, "rows": rows, "geomean_efficiency": geo, "min_efficiency": min(effs),
               "seconds": time.time() - t0}
    if json_path:
        Path(json_path).write_text(json.dumps(summary, indent=1))
    print(f"\n{'shape':32s} {'bucket':34s} {'exact_us':>9s} {'bucket_us':>9s} {'vendor_us':>9s} {'eff':>6s}")
    for r in rows:
        print(f"{r['shape']:32s} {r['bucket']:34s} {r['exact_us']:9.2f} {r['bucket_us']:9.2f} "
              f"{r['vendor_us']:9.2f} {r['efficiency']:6.3f}")
    print(f"{family} bucket efficiency on {target.device_name}: geomean {geo:.3f}, min {min(effs):.3f}", flush=True)
    return summary


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--db", default="buckets.db")
    ap.add_argument("--json", default="", help="summary path; with several families it must contain {family}")
    ap.add_argument("--family", default="linear",
                    help=f"comma-separated, run in that order, each written when done: {', '.join(sorted(FAMILIES))}")
    a = ap.parse_args()
    a.families = [f for f in a.family.split(",") if f]
    bad = [f for f in a.families if f not in FAMILIES]
    if bad or not a.families:
        raise SystemExit(f"bench_buckets: unknown --family {', '.join(bad) or '(none)'}; "
                         f"choose from {', '.join(sorted(FAMILIES))}")
    if a.json and len(a.families) > 1 and "{family}" not in a.json:
        raise SystemExit("bench_buckets: with several families, --json must contain {family} (one file each)")
    target = detect()
    print(f"target: {target.describe()}", flush=True)
    for family in a.families:
        run_family(family, a, target)


if __name__ == "__main__":
    main()
