"""Host cost of the patched eager path (no CUDA graphs): where a patched UNet step spends its Python time.

    python scripts/bench_host.py --db tuning_logs/sm90_h200_sd15_norms_rebench.jsonl.xz --json host.json

One run, SD 1.5 UNet fp16 batch 2 512² (or --tiny on the CPU): wall time per call of eager
channels_last and of kernels.optimize(unet, graphs=False), each call synchronized, median over
--iters; the op calls per step by outcome; then a cProfile of --profile calls of the patched UNet,
the top functions by own time printed and written to the JSON (per op call: the profile's total over
the number of op calls). Ratios are against eager channels_last from the same run.

    python scripts/bench_host.py --per-op --json per_op.json     # each patched module kind (--tiny: the CPU)

--per-op: us per call of one small module of each patched kind (Linear, Conv2d, GroupNorm, LayerNorm,
GEGLU, Attention, ResnetBlock2D, BasicTransformerBlock) and of the tiny UNet, eager (channels_last)
against patched on the counted torch fallback (empty DB) and on llvm kernels tuned with one candidate
for every workload they dispatch (served whatever their speed: that column adds TVM's kernel time),
the variants timed in turns, the fastest of --repeats; op calls and Python calls per module call.
One torch (and TVM) thread: host cost, not contention on a shared CPU.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


# -- per-op host cost (--per-op) -----------------------------------------------------------------------
def _cases(dtype, device="cpu"):
    """name -> (module, args, kwargs): one small instance per patched module kind (tiny tensors, so the
    host's work per call dominates) and the tiny UNet, on `device`."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D
    from torch import nn

    from scripts.bench_e2e import TINY

    g = torch.Generator().manual_seed(0)

    def rnd(*shape, cl=False):
        t = torch.randn(*shape, generator=g).to(device, dtype)
        return t.contiguous(memory_format=torch.channels_last) if cl else t

    torch.manual_seed(0)
    tokens, img = rnd(2, 16, 32), rnd(1, 16, 8, 8, cl=True)
    cases = {
        "Linear": (nn.Linear(32, 32), (tokens,), {}),
        "Conv2d": (nn.Conv2d(16, 16, 3, padding=1), (img,), {}),
        "GroupNorm": (nn.GroupNorm(4, 16), (img,), {}),
        "LayerNorm": (nn.LayerNorm(32), (tokens,), {}),
        "GEGLU": (GEGLU(32, 32), (tokens,), {}),
        "Attention": (Attention(32, heads=2, dim_head=16), (tokens,), {}),
        "ResnetBlock2D": (ResnetBlock2D(in_channels=16, out_channels=16, temb_channels=32, groups=4),
                          (img, rnd(1, 32)), {}),
        "BasicTransformerBlock": (BasicTransformerBlock(32, 2, 16, cross_attention_dim=24), (tokens,),
                                  {"encoder_hidden_states": rnd(2, 7, 24)}),
        "UNet (tiny)": (UNet2DConditionModel(**TINY), (rnd(2, 4, 8, 8, cl=True), torch.tensor(500, device=device)),
                        {"encoder_hidden_states": rnd(2, 7, 24)}),
    }
    return {k: (m.to(device, dtype).eval(), args, kw) for k, (m, args, kw) in cases.items()}


def _us_per_call(fn, calls: int, sync=None) -> float:
    """The mean wall time of `calls` back-to-back calls, in µs; `sync` (the GPU's) before and after
    them, whose tiny kernels queue faster than the host issues them. The caller keeps the fastest of
    its repeats (on a shared CPU the others measure the neighbours)."""
    if sync:
        sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if sync:
        sync()
    return (time.perf_counter() - t0) / calls * 1e6


def _python_calls(fn) -> int:
    """Python-level function calls one fn() makes (sys.setprofile's "call" events)."""
    n = [0]

    def hook(frame, event, arg):
        if event == "call":
            n[0] += 1

    sys.setprofile(hook)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return n[0]


def per_op(a) -> dict:
    """us per call of each module kind, unpatched vs patched, on an empty DB (every op on its counted
    torch fallback) and with llvm kernels tuned (1 candidate each) for every workload the modules
    dispatch, served whatever their speed (require_faster=False: this measures the host path). On a
    GPU (float16, CUDA target): eager against patched over the empty DB only."""
    import copy
    import tempfile

    import kernels
    from scheduler.tuner import TuneOptions, tune
    from shapetune.target import detect

    is_gpu = torch.cuda.is_available() and not a.tiny
    cpu = detect("cuda" if is_gpu else "llvm")
    dtype = torch.float16 if is_gpu else torch.float32
    sync = torch.cuda.synchronize if is_gpu else None
    torch.set_num_threads(1)  # host cost: torch's intra-op threads on a shared CPU measure contention
    os.environ.setdefault("TVM_NUM_THREADS", "1")  # the same for TVM's thread pool (read on its first launch)
    cases = _cases(dtype, "cuda" if is_gpu else "cpu")
    tmp = Path(tempfile.mkdtemp(prefix="shapetune-host-"))
    db = Path(a.per_op_db) if a.per_op_db else tmp / "tuned.db"
    rows = {k: {} for k in cases}

    def variants(reg_fallback, reg_tuned) -> dict:
        """label -> (registry, module) per case: eager (channels_last, as the patched model runs),
        patched over the empty DB, patched over the tuned one."""
        out = {}
        for name, (m, args, kw) in cases.items():
            row = {"eager": (None, copy.deepcopy(m))}
            for label, reg in (("patched_fallback", reg_fallback), ("patched_tuned", reg_tuned)):
                if reg is not None:
                    pm = copy.deepcopy(m)
                    kernels.patch(pm)
                    row[label] = (reg, pm)
            for _, mod in row.values():
                mod.to(memory_format=torch.channels_last)
            out[name] = row
        return out

    def measure(rows_in: dict):
        """Each case's variants timed in turns (repeat r of every variant, then r + 1), so a busy
        neighbour slows them alike; op calls and Python calls per module call after warm-up."""
        prev = kernels.get_registry()
        try:
            with torch.no_grad():
                for name, row in rows_in.items():
                    m, args, kw = cases[name]
                    times = {label: [] for label in row}
                    for label, (reg, mod) in row.items():
                        kernels.set_registry(reg or prev)
                        for _ in range(5):
                            mod(*args, **kw)
                        if reg is not None:
                            reg.calls.clear()
                        mod(*args, **kw)
                        ops = sum(reg.calls.values()) if reg is not None else 0
                        outcomes = sorted({why for (_, why), n in reg.calls.items() if n}) if reg is not None else []
                        rows[name][label] = {"op_calls": ops, "outcomes": outcomes,
                                             "py_calls": _python_calls(lambda: mod(*args, **kw))}
                    for _ in range(a.repeats):
                        for label, (reg, mod) in row.items():
                            kernels.set_registry(reg or prev)
                            times[label].append(_us_per_call(lambda: mod(*args, **kw), a.calls, sync))
                    for label in row:
                        rows[name][label]["us"] = min(times[label])
        finally:
            kernels.set_registry(prev)

    fallback = kernels.Registry(db_path=tmp / "empty.db", target=cpu)
    reg = None
    if not a.no_tuned and not is_gpu:
        seen = {}
        rec = kernels.Registry(db_path=tmp / "empty.db", target=cpu)
        lookup = rec.lookup

        def record(sig, make_workload):
            seen.setdefault(sig, make_workload())
            return lookup(sig, make_workload)

        rec.lookup = record
        prev = kernels.set_registry(rec)
        try:
            for name, (m, args, kw) in cases.items():
                pm = copy.deepcopy(m)
                kernels.patch(pm)
                with torch.no_grad():
                    pm(*args, **kw)
        finally:
            kernels.set_registry(prev)
        t0 = time.time()
        tune(list(dict.fromkeys(seen.values())), cpu, db, TuneOptions(trials=1, batch=4))
        reg = kernels.Registry(db_path=db, target=cpu, require_faster=False)
        built = reg.prebuild()
        print(f"tuned {len(set(seen.values()))} workloads (1 candidate each), kernels {built}, "
              f"{time.time() - t0:.0f} s")
    measure(variants(fallback, reg))
    print(f"{'module':22s} {'eager us':>9s} {'fallback us':>12s} {'tuned us':>9s} {'op calls':>8s} "
          f"{'fallback-eager us/op':>21s} {'py calls eager/fallback/tuned':>30s}")
    for name, r in rows.items():
        e, f, t = r["eager"], r["patched_fallback"], r.get("patched_tuned", {})
        print(f"{name:22s} {e['us']:9.1f} {f['us']:12.1f} {t.get('us', float('nan')):9.1f} {f['op_calls']:8d} "
              f"{(f['us'] - e['us']) / max(f['op_calls'], 1):21.1f} "
              f"{e['py_calls']:>14d}/{f['py_calls']}/{t.get('py_calls', '-')}")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", action="append", default=[])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--profile", type=int, default=3)
    ap.add_argument("--json", default="")
    ap.add_argument("--per-op", action="store_true", help="us per call of each patched module kind, eager vs "
                    "patched (fallback, and llvm-tuned on the CPU); on the GPU if there is one (fp16), "
                    "with --tiny on the CPU")
    ap.add_argument("--per-op-db", default="", help="--per-op: the tuned DB to use (or fill, once)")
    ap.add_argument("--no-tuned", action="store_true", help="--per-op: skip the llvm-tuned column")
    ap.add_argument("--calls", type=int, default=20, help="--per-op: calls per timed repeat")
    ap.add_argument("--repeats", type=int, default=60, help="--per-op: repeats (the fastest taken)")
    a = ap.parse_args()
    if a.per_op:
        rows = per_op(a)
        if a.json:
            Path(a.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                                                "device": torch.cuda.get_device_name() if torch.cuda.is_available()
                                                and not a.tiny else "cpu", "args": vars(a), "per_op": rows}, indent=1))
        return

    import kernels
    from scripts.bench_e2e import build, inputs, install_registry
    from shapetune.target import detect

    is_gpu = torch.cuda.is_available() and not a.tiny
    dev = torch.device("cuda" if is_gpu else "cpu")
    dtype = torch.float16 if is_gpu else torch.float32
    reg = install_registry(a.db, detect("cuda" if is_gpu else "llvm"))
    x = inputs(a.tiny, 2, 512, 512, dev, dtype)
    x = {**x, "sample": x["sample"].contiguous(memory_format=torch.channels_last)}

    def wall(m) -> float:
        out = []
        with torch.no_grad():
            for _ in range(3):
                m(**x)
            for _ in range(a.iters):
                if is_gpu:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                m(**x)
                if is_gpu:
                    torch.cuda.synchronize()
                out.append(time.perf_counter() - t0)
        return sorted(out)[len(out) // 2] * 1e3

    m = build(a.tiny, dev, dtype).to(memory_format=torch.channels_last)
    eager_ms = wall(m)
    kernels.optimize(m, graphs=False)
    reg.calls.clear()
    patched_ms = wall(m)
    calls = {op: {k: v // (a.iters + 3) for k, v in d.items()} for op, d in kernels.fallback_summary().items()}
    n_calls = sum(v for d in calls.values() for v in d.values())
    pr = cProfile.Profile()
    with torch.no_grad():
        pr.enable()
        for _ in range(a.profile):
            m(**x)
        pr.disable()
        if is_gpu:
            torch.cuda.synchronize()
    buf = io.StringIO()
    st = pstats.Stats(pr, stream=buf).sort_stats("tottime")
    st.print_stats(30)
    top = [{"function": f"{Path(k[0]).name}:{k[1]}({k[2]})", "calls_per_step": v[1] // a.profile,
            "own_us_per_step": v[2] / a.profile * 1e6}
           for k, v in sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:30]]
    print(buf.getvalue()[:6000])
    row = {"eager_cl_ms": eager_ms, "patched_eager_ms": patched_ms, "ratio_vs_eager_cl": patched_ms / eager_ms,
           "op_calls_per_step": calls, "op_calls": n_calls,
           "profiled_us_per_op_call": st.total_tt / a.profile / max(n_calls, 1) * 1e6, "top": top}
    print(f"eager_cl {eager_ms:.2f} ms, patched eager {patched_ms:.2f} ms ({patched_ms / eager_ms:.2f}x), "
          f"{n_calls} op calls per step")
    if a.json:
        Path(a.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                                            "device": torch.cuda.get_device_name() if is_gpu else "cpu",
                                            "args": vars(a), "row": row}, indent=1))


if __name__ == "__main__":
    main()
