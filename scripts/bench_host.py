"""Host cost of the patched eager path (no CUDA graphs): where a patched UNet step spends its Python time.

    python scripts/bench_host.py --db tuning_logs/sm90_h200_sd15_norms_rebench.jsonl.xz --json host.json

One run, SD 1.5 UNet fp16 batch 2 512² (or --tiny on the CPU): wall time per call of eager
channels_last and of kernels.optimize(unet, graphs=False), each call synchronized, median over
--iters; the op calls per step by outcome; then a cProfile of --profile calls of the patched UNet,
the top functions by own time printed and written to the JSON (per op call: the profile's total over
the number of op calls). Ratios are against eager channels_last from the same run.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", action="append", default=[])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--profile", type=int, default=3)
    ap.add_argument("--json", default="")
    a = ap.parse_args()

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
