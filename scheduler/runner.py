"""Runner: verify a built candidate against the reference, then time it (or the vendor path).

Every measurement: fresh random inputs (new seed per trial), output poisoned with NaN, checked by
scheduler.verify; only then timed. GPU timing: warm-up, then each call bracketed by CUDA events
while the GPU is held busy (torch.cuda._sleep) so host launch cost stays out (verified: if the GPU
went idle between calls, the host fell behind and the run is repeated with a longer busy period),
inputs rotated over
more than twice the L2 size so no run is served from cache; the median is reported.
CPU timing: perf_counter around each call, median.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

from shapetune.buckets import timing_members, verification_members
from shapetune.records import LatencyStats
from shapetune.target import Target
from shapetune.workload import Workload

from .isolation import IsolatedPool, WorkerCrashed, WorkerTimeout

VENDOR = "vendor"  # pseudo artifact path: measure torch's own op
COPY = "device_copy"  # pseudo artifact path: a device-to-device copy moving the op's minimal bytes


@dataclass(frozen=True)
class RunOptions:
    verify_trials: int = 2
    warmup: int = 10
    repeats: int = 50
    rotate_bytes: int = 256 << 20  # GPU: > 2x the L2 of an H100/H200 (50/60 MB)
    max_sets: int = 64

    @classmethod
    def for_target(cls, target: Target) -> RunOptions:
        return cls() if target.is_gpu else cls(warmup=2, repeats=10, rotate_bytes=0)


@dataclass(frozen=True)
class RunResult:
    status: str  # ok | wrong_result | runtime_error | timeout
    latency: LatencyStats | None = None
    rel_err: float | None = None
    error: str = ""


def _device(target: Target):
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if target.is_gpu else torch.device("cpu")


def measure_one(workload_json: dict, target_json: dict, artifact: str, opts: RunOptions, seed: int) -> dict:
    """Worker entry point. Returns a plain dict (pickled back to the tuner)."""
    import torch

    from kernels.defs import opdef
    from kernels.runtime import call_on_current_stream, load_function

    from .verify import check_output

    w, tgt = Workload.from_json(workload_json), Target.from_json(target_json)
    od = opdef(w.op)
    dev = _device(tgt)
    if artifact == COPY:
        return _measure_copy(w, od, dev, opts, tgt.is_gpu)
    fn = od.vendor(w) if artifact == VENDOR else load_function(artifact, tgt.is_gpu)

    def call(args):
        """Run on inputs + [out]; returns the output tensor (the vendor path allocates its own)."""
        if artifact == VENDOR:
            return fn(*args[:-1])
        call_on_current_stream(fn, args, tgt.is_gpu)
        return args[-1]

    gen = torch.Generator(device=dev).manual_seed(seed)
    worst = 0.0
    # A bucket kernel must be right for every member: check the bounds and an odd size too.
    members = verification_members(w, random.Random(seed)) if w.dynamic else [w]
    for trial in range(max(opts.verify_trials, len(members))):
        mw = members[trial % len(members)]
        ins = od.inputs(mw, dev, gen)
        out = od.output(mw, dev).fill_(float("nan"))
        out = call(ins + [out])
        if tgt.is_gpu:
            torch.cuda.synchronize()
        chk = check_output(out, od.reference(mw, ins), w.dtype)
        if not chk.ok:
            where = f" at {mw.name}" if w.dynamic else ""
            return {"status": "wrong_result", "rel_err": chk.rel_err, "error": chk.reason + where}
        worst = max(worst, chk.rel_err)

    # A bucket kernel is timed across its bucket (upper bound, middle, lower bound) and scored by
    # the geometric mean, so the tuner picks what is good for the whole bucket, not for one size.
    timed = timing_members(w) if w.dynamic else [w]
    per_shape = [_time(call, _timing_sets(tw, dev, opts) if opts.rotate_bytes else
                       [od.inputs(tw, dev, gen) + [od.output(tw, dev)]], opts, tgt.is_gpu) for tw in timed]
    samples = [math.exp(sum(math.log(max(x, 1e-3)) for x in col) / len(col)) for col in zip(*per_shape)]
    return {"status": "ok", "latency": LatencyStats.of(samples).to_json(), "rel_err": worst}


def _measure_copy(w: Workload, od, dev, opts: RunOptions, is_gpu: bool) -> dict:
    """The bandwidth yardstick of a memory-bound op: `dst.copy_(src)` with src as large as half the
    op's minimal traffic (every input read once + the output written once), so the copy moves the
    same bytes; timed like a kernel, rotating buffers."""
    import torch

    ins = od.inputs(w, dev, torch.Generator(device=dev).manual_seed(7)) + [od.output(w, dev)]
    half = sum(t.numel() * t.element_size() for t in ins) // 2 // 2  # in fp16 elements
    n = max(1, min(opts.max_sets, math.ceil(opts.rotate_bytes / (4 * half)))) if opts.rotate_bytes else 1
    sets = [(torch.randn(half, device=dev).half(), torch.empty(half, device=dev, dtype=torch.half))
            for _ in range(n)]
    samples = _time(lambda s: s[1].copy_(s[0]), sets, opts, is_gpu)
    return {"status": "ok", "latency": LatencyStats.of(samples).to_json(), "rel_err": 0.0}


def _time(call, sets: list, opts: RunOptions, is_gpu: bool) -> list[float]:
    """Per-call times in microseconds, rotating through the input sets."""
    n_sets = len(sets)
    for r in range(opts.warmup):
        call(sets[r % n_sets])
    if not is_gpu:
        samples = []
        for r in range(opts.repeats):
            t0 = time.perf_counter()
            call(sets[r % n_sets])
            samples.append((time.perf_counter() - t0) * 1e6)
        return samples
    sleep_cycles = int(2e7)  # ~10 ms at H100/H200 clocks
    for _ in range(3):
        samples, gaps = _time_gpu(call, sets, opts.repeats, sleep_cycles)
        if not host_bound(gaps):
            return samples
        sleep_cycles *= 4  # the host fell behind the GPU: hold it busy longer and measure again
    return samples  # still host-bound at a 160 ms busy period: a host-heavy op, timed as it runs


#: Median idle time of the GPU between one timed call's end event and the next one's start event
#: above which the host did not keep the queue ahead of the GPU (a contended CPU, e.g. a tuning job
#: building in parallel, or an op whose launches cost more host time than its kernels take). Then
#: the calls' own intervals hold host gaps too (an op of several kernels waits for its next launch)
#: and the measurement is repeated with a longer busy period. Queued back to back, the gap is ~1 µs.
#: (H200, 2026-11-27: a 4-process tuning job measured F.conv2d 1x1 at 52-66 µs that took 12-19 µs
#: on a quieter host.)
HOST_BOUND_GAP_US = 3.0


def host_bound(gaps_us: list[float]) -> bool:
    """Whether the median gap between consecutive timed calls shows a GPU waiting for the host."""
    if not gaps_us:
        return False
    g = sorted(gaps_us)
    return g[len(g) // 2] > HOST_BOUND_GAP_US


def _time_gpu(call, sets: list, repeats: int, sleep_cycles: int) -> tuple[list[float], list[float]]:
    """(per-call µs, µs between each call's end and the next call's start) with the GPU held busy by
    a sleep kernel while the host enqueues every call between CUDA events."""
    import torch

    n_sets = len(sets)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    torch.cuda._sleep(sleep_cycles)  # keep the GPU busy while the host enqueues everything below
    for r in range(repeats):
        starts[r].record()
        call(sets[r % n_sets])
        ends[r].record()
    torch.cuda.synchronize()
    gaps = [ends[r].elapsed_time(starts[r + 1]) * 1e3 for r in range(repeats - 1)]
    return [a.elapsed_time(b) * 1e3 for a, b in zip(starts, ends)], gaps


_sets_cache: dict = {}


def _timing_sets(w: Workload, dev, opts: RunOptions) -> list:
    """Input sets to rotate through, so timed runs read from DRAM, not cache. Made once per
    workload in this worker (timing only: verification always draws fresh inputs)."""
    import torch

    from kernels.defs import opdef

    key = (w.key, str(dev))
    if key not in _sets_cache:
        if len(_sets_cache) >= 4:  # a bucket's timing shapes stay resident together
            _sets_cache.pop(next(iter(_sets_cache)))
        od = opdef(w.op)
        gen = torch.Generator(device=dev).manual_seed(1234)
        first = od.inputs(w, dev, gen) + [od.output(w, dev)]
        set_bytes = sum(t.numel() * t.element_size() for t in first)
        n = max(1, min(opts.max_sets, math.ceil(opts.rotate_bytes / set_bytes)))
        _sets_cache[key] = [first] + [od.inputs(w, dev, gen) + [od.output(w, dev)] for _ in range(n - 1)]
    return _sets_cache[key]


class Runner:
    """Measures one artifact at a time in an isolated process (a crash there is a result here)."""

    def __init__(self, target: Target, opts: RunOptions | None = None, timeout_s: float = 60, seed: int = 0):
        self.target = target
        self.opts = opts or RunOptions.for_target(target)
        self.timeout_s = timeout_s
        self.rng = random.Random(seed)
        self.pool = IsolatedPool(1, method="spawn" if target.is_gpu else "forkserver")

    def run(self, workload: Workload, artifact: str) -> RunResult:
        seed = self.rng.randrange(2**31)  # fresh inputs for every measurement
        r = self.pool.run_all(measure_one, [(workload.to_json(), self.target.to_json(), artifact,
                                             self.opts, seed)], self.timeout_s)[0]
        if isinstance(r, WorkerTimeout):
            return RunResult("timeout", error=str(r))
        if isinstance(r, WorkerCrashed):
            return RunResult("runtime_error", error=f"runner crashed: {r}")
        if isinstance(r, BaseException):
            from .builder import _short_error

            return RunResult("runtime_error", error=_short_error(r))
        lat = LatencyStats(**r["latency"]) if r.get("latency") else None
        return RunResult(r["status"], lat, r.get("rel_err"), r.get("error", ""))

    def close(self):
        self.pool.close()
