"""Runner: verify a built candidate against the reference, then time it (or the vendor path).

Verification, before any timing (`verify_trials` draws, and every checked member of a bucket):
fresh random inputs (a new seed per measurement), the float64 reference computed from them BEFORE
the call, a bitwise clone of every input kept, the output poisoned with NaN; after the call the
output is checked by scheduler.verify and every input must be bit-identical to its clone (compared
as raw integers of the element's width, so NaN == NaN and -0.0 != +0.0). A kernel that writes into
an input is `wrong_result` ("input 0 (x) modified by the kernel: N of M elements changed"), even if
its output matches what a reference of the clobbered inputs would say.

Timing. GPU: `warmup` calls, then `repeats` calls, each bracketed by CUDA events while the GPU is
held busy (torch.cuda._sleep), so host launch cost stays out (checked: if the GPU went idle between
calls, the host fell behind and the run is repeated with a 4x longer busy period, at most 3 runs).
The median of the per-call times is reported. CPU: perf_counter around each call, median.

Rotation (GPU). Each call gets the next of N input sets (inputs + output), cyclically over
warm-up, timed calls and repeated runs alike, with N = 1 + ceil(R / set_bytes), R = `rotate_bytes`,
by default 2x the device's L2 (torch's L2_cache_size; DEFAULT_L2_BYTES where torch reports none).
So between two uses of one set, the N - 1 other sets, >= 2x L2 of distinct data, were read and
written: no input is served from L2 however small the workload. We rotate rather than flush L2 between calls:
a flush kernel would sit inside the host-bound gap check, and a write flush would leave L2 full of
dirty lines the timed kernel must write back. Rotation keeps N x set_bytes ~= R + set_bytes
resident (~120 MB on an H200: 2 x its 60 MB L2) and costs N allocations per tensor once per
workload and worker.

Copy yardstick (COPY, memory-bound ops). `dst.copy_(src)` of fp16 buffers, each allocated on its
own (so it starts aligned) and sized up to a multiple of COPY_ALIGN bytes, the two together moving
copy_bytes(w) >= min_traffic_bytes(w) (every input read once + the output written once; exact
but for <= 2 x COPY_ALIGN of round-up); timed and rotated like a kernel. Aligned whole buffers keep
an odd-sized copy from running slower and inflating every "fraction of copy" figure (the old
odd-sized yardstick and this one timed side by side: see BENCHMARKS.md, "GroupNorm (+SiLU) and
LayerNorm"). `Runner.large_copy`
times a >= 1 GiB copy the same way: the device's copy bandwidth in the same run.

Vendor paths: artifact VENDOR is the op's default vendor path (`OpDef.vendor`), and
vendor_artifact(v) = f"{VENDOR}:{v}" its variant v (`OpDef.vendor_variants`, e.g. group_norm's
"nchw"). A variant's inputs are converted to its layout before the call (outside the timed region),
its output back to the op's layout after it, and it is verified like the default.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import dataclass

from shapetune.buckets import timing_members
from shapetune.records import LatencyStats, VendorBaseline
from shapetune.target import Target
from shapetune.ops import VendorPath
from shapetune.workload import Workload

from .isolation import ClosedOnExit, IsolatedPool, WorkerCrashed, WorkerTimeout

VENDOR = "vendor"  # pseudo artifact path: measure torch's own op (its default path)
COPY = "device_copy"  # pseudo artifact path: an aligned device copy moving the op's minimal bytes
COPY_ALIGN = 256  # bytes: each copy buffer is a multiple of this (16-byte vectors, whole 256 B sectors)
LARGE_COPY_BYTES = 1 << 30  # bytes copied (read, and written again) by Runner.large_copy
DEFAULT_L2_BYTES = 64 << 20  # where torch reports no L2 size: above an H200's 60 MB (H100: 50 MB)


def vendor_artifact(variant: str = "") -> str:
    """Pseudo artifact path of the vendor path: VENDOR for the default, "vendor:<variant>" else."""
    return f"{VENDOR}:{variant}" if variant else VENDOR


def vendor_variant(artifact: str) -> str | None:
    """The vendor variant an artifact path names ("" = the default), None for a built kernel."""
    if artifact == VENDOR:
        return ""
    return artifact[len(VENDOR) + 1:] if artifact.startswith(VENDOR + ":") else None


@dataclass(frozen=True)
class RunOptions:
    verify_trials: int = 2
    warmup: int = 10
    repeats: int = 50
    rotate_bytes: int | None = None  # None: 2x the device's L2; 0: no rotation (one set)

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


# -- bytes and rotation ----------------------------------------------------------------------------
def min_traffic_bytes(w: Workload) -> int:
    """Bytes the op must move at the least: every input read once + the output written once, at
    w's dims (a bucket at its nominal dims), in the dtypes the runner passes. The op's own input
    and output constructors run with every tensor factory on the meta device (`_on_meta`): shapes
    and dtypes without drawing values (tens of ms for a large conv's operands on the CPU)."""
    import torch

    from shapetune.ops import opdef

    od = opdef(w.op)
    meta = torch.device("meta")
    with _on_meta():
        ts = od.inputs(w, meta, torch.Generator().manual_seed(0)) + [od.output(w, meta)]
    return sum(t.numel() * t.element_size() for t in ts)


def _on_meta():
    """A torch function mode that puts the tensor factories' results on the meta device (their
    generator dropped: a meta tensor draws nothing). The ops' constructors take the CPU generator's
    device for their random draws, which torch.device("meta") as a context would not override."""
    import torch
    from torch.overrides import TorchFunctionMode

    factories = {torch.randn, torch.rand, torch.randint, torch.empty, torch.zeros, torch.ones, torch.full,
                 torch.arange, torch.linspace, torch.eye, torch.randperm}

    class OnMeta(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in factories:
                kwargs = {k: v for k, v in kwargs.items() if k != "generator"}
                kwargs["device"] = "meta"
            return func(*args, **kwargs)

    return OnMeta()


def aligned_copy_bytes(nbytes: int) -> int:
    """Read + write bytes of a copy of nbytes whose buffers are rounded up to COPY_ALIGN each."""
    return 2 * (math.ceil(nbytes / COPY_ALIGN) * COPY_ALIGN)


def copy_bytes(w: Workload) -> int:
    """Read + write bytes of w's copy yardstick: min_traffic_bytes(w) split into a source and a
    destination buffer, each rounded up to a multiple of COPY_ALIGN."""
    return aligned_copy_bytes(math.ceil(min_traffic_bytes(w) / 2))


def l2_bytes(dev) -> int:
    """The L2 cache size of a CUDA device in bytes (DEFAULT_L2_BYTES where torch reports none)."""
    import torch

    return getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or DEFAULT_L2_BYTES


def rotation_set_count(set_bytes: int, rotate_bytes: int) -> int:
    """Number of input sets N to rotate through so that the N - 1 sets used between two uses of
    one set hold >= rotate_bytes; 1 when rotate_bytes is 0 (no rotation)."""
    if set_bytes <= 0 or rotate_bytes < 0:
        raise ValueError(f"rotation: set of {set_bytes} bytes, rotate_bytes {rotate_bytes}: need > 0 and >= 0")
    return 1 + math.ceil(rotate_bytes / set_bytes) if rotate_bytes else 1


def _rotate_bytes(opts: RunOptions, dev) -> int:
    if opts.rotate_bytes is not None:
        return opts.rotate_bytes
    return 2 * l2_bytes(dev) if dev.type == "cuda" else 0


def _same(x):
    return x


def _calling(artifact: str, od, w: Workload, is_gpu: bool):
    """(prepare, call, restore): prepare(inputs) -> the inputs as the path takes them (untimed);
    call(prepared + [out]) -> its output; restore(output) -> in the op's layout (untimed)."""
    variant = vendor_variant(artifact)
    if variant is None:
        from scheduler.loader import call_on_current_stream, load_function

        fn = load_function(artifact, is_gpu)

        def call_kernel(args):
            call_on_current_stream(fn, args, is_gpu)
            return args[-1]

        return _same, call_kernel, _same
    if not variant:
        fn = od.vendor(w)
        if isinstance(fn, VendorPath):  # torch's own output layout differs (e.g. add_layer_norm's two tensors)
            return fn.prepare, lambda args: fn.run(*args[:-1]), fn.restore
        return _same, lambda args: fn(*args[:-1]), _same  # the vendor path allocates its own output
    if variant not in od.vendor_variants:
        raise ValueError(f"{od.vendor_name} has no vendor variant {variant!r}; known: {sorted(od.vendor_variants)}")
    path = od.vendor_variants[variant](w)
    return path.prepare, lambda args: path.run(*args[:-1]), path.restore


def measure_one(workload_json: dict, target_json: dict, artifact: str, opts: RunOptions, seed: int) -> dict:
    """Worker entry point. Returns a plain dict (pickled back to the tuner)."""
    import torch

    from shapetune.ops import opdef

    from .verify import verify

    w, tgt = Workload.from_json(workload_json), Target.from_json(target_json)
    od = opdef(w.op)
    dev = _device(tgt)
    if artifact == COPY:
        return _measure_copy(copy_bytes(w) // 2, dev, opts, tgt.is_gpu)
    prepare, call, restore = _calling(artifact, od, w, tgt.is_gpu)

    gen = torch.Generator(device=dev).manual_seed(seed)
    verdict = verify(od, w, prepare, call, restore, dev, gen, opts.verify_trials, random.Random(seed), tgt.is_gpu)
    if not verdict.ok:
        return {"status": "wrong_result", "rel_err": verdict.rel_err, "error": verdict.reason}

    # A bucket kernel is timed across its bucket (upper bound, middle, lower bound) and scored by
    # the geometric mean, so the tuner picks what is good for the whole bucket, not for one size.
    timed = timing_members(w) if w.dynamic else [w]
    rotate = _rotate_bytes(opts, dev)
    per_shape = []
    for tw in timed:
        sets = [prepare(s[:-1]) + [s[-1]] for s in _timing_sets(tw, dev, rotate)]
        per_shape.append(_time(call, sets, opts, tgt.is_gpu))
    samples = [math.exp(sum(math.log(max(x, 1e-3)) for x in col) / len(col)) for col in zip(*per_shape)]
    return {"status": "ok", "latency": LatencyStats.of(samples).to_json(), "rel_err": verdict.rel_err}


# -- copies ------------------------------------------------------------------------------------------
def _measure_copy(buf_bytes: int, dev, opts: RunOptions, is_gpu: bool) -> dict:
    """`dst.copy_(src)` of two fp16 buffers of buf_bytes (a multiple of COPY_ALIGN) each, timed like
    a kernel over rotated (src, dst) pairs."""
    import torch

    if buf_bytes <= 0 or buf_bytes % COPY_ALIGN:
        raise ValueError(f"copy buffers of {buf_bytes} bytes: need a positive multiple of {COPY_ALIGN}")
    n = rotation_set_count(2 * buf_bytes, _rotate_bytes(opts, dev))
    gen = torch.Generator(device=dev).manual_seed(7)
    sets = [(torch.randn(buf_bytes // 2, generator=gen, device=dev, dtype=torch.half),
             torch.empty(buf_bytes // 2, device=dev, dtype=torch.half)) for _ in range(n)]
    samples = _time(lambda s: s[1].copy_(s[0]), sets, opts, is_gpu)
    return {"status": "ok", "latency": LatencyStats.of(samples).to_json(), "rel_err": 0.0}


def measure_large_copy(target_json: dict, opts: RunOptions, nbytes: int) -> dict:
    """Worker entry point: a copy of nbytes (rounded up to COPY_ALIGN), timed like COPY; it moves
    aligned_copy_bytes(nbytes)."""
    tgt = Target.from_json(target_json)
    return _measure_copy(aligned_copy_bytes(nbytes) // 2, _device(tgt), opts, tgt.is_gpu)


# -- timing ------------------------------------------------------------------------------------------
def _time(call, sets: list, opts: RunOptions, is_gpu: bool) -> list[float]:
    """Per-call times in microseconds; every call (warm-up, timed, repeated) takes the next set."""
    next_set = itertools.cycle(sets).__next__
    for _ in range(opts.warmup):
        call(next_set())
    if not is_gpu:
        samples = []
        for _ in range(opts.repeats):
            s = next_set()
            t0 = time.perf_counter()
            call(s)
            samples.append((time.perf_counter() - t0) * 1e6)
        return samples
    sleep_cycles = int(2e7)  # ~10 ms at H100/H200 clocks
    for _ in range(3):
        samples, gaps = _time_gpu(call, next_set, opts.repeats, sleep_cycles)
        if not host_bound(gaps):
            return samples
        sleep_cycles *= 4  # the host fell behind the GPU: hold it busy longer and measure again
    return samples  # still host-bound at a 160 ms busy period: a host-heavy op, timed as it runs


#: Median idle time of the GPU between one timed call's end event and the next one's start event
#: above which the host did not keep the queue ahead of the GPU (a contended CPU, e.g. a tuning job
#: building in parallel, or an op whose launches cost more host time than its kernels take). Then
#: the calls' own intervals hold host gaps too (an op of several kernels waits for its next launch)
#: and the measurement is repeated with a longer busy period. Queued back to back, the gap stays
#: well below this. (What host-bound timing did to cuDNN's times in the H200 tuning runs of 2026-11-27: see
#: BENCHMARKS.md, "conv2d" and "Vendor timing noise".)
HOST_BOUND_GAP_US = 3.0


def host_bound(gaps_us: list[float]) -> bool:
    """Whether the median gap between consecutive timed calls shows a GPU waiting for the host."""
    if not gaps_us:
        return False
    g = sorted(gaps_us)
    return g[len(g) // 2] > HOST_BOUND_GAP_US


def _time_gpu(call, next_set, repeats: int, sleep_cycles: int) -> tuple[list[float], list[float]]:
    """(per-call µs, µs between each call's end and the next call's start) with the GPU held busy by
    a sleep kernel while the host enqueues every call between CUDA events."""
    import torch

    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    sets = [next_set() for _ in range(repeats)]
    torch.cuda._sleep(sleep_cycles)  # keep the GPU busy while the host enqueues everything below
    for r in range(repeats):
        starts[r].record()
        call(sets[r])
        ends[r].record()
    torch.cuda.synchronize()
    gaps = [ends[r].elapsed_time(starts[r + 1]) * 1e3 for r in range(repeats - 1)]
    return [a.elapsed_time(b) * 1e3 for a, b in zip(starts, ends)], gaps


_sets_cache: dict = {}


def _timing_sets(w: Workload, dev, rotate_bytes: int) -> list:
    """rotation_set_count input sets (inputs + output) to rotate through, so timed runs read from
    DRAM, not L2. Made once per workload in this worker (timing only: verification always draws
    fresh inputs)."""
    import torch

    from shapetune.ops import opdef

    key = (w.key, str(dev), rotate_bytes)
    if key not in _sets_cache:
        if len(_sets_cache) >= 4:  # a bucket's timing shapes stay resident together
            _sets_cache.pop(next(iter(_sets_cache)))
        od = opdef(w.op)
        gen = torch.Generator(device=dev).manual_seed(1234)
        first = od.inputs(w, dev, gen) + [od.output(w, dev)]
        n = rotation_set_count(sum(t.numel() * t.element_size() for t in first), rotate_bytes)
        _sets_cache[key] = [first] + [od.inputs(w, dev, gen) + [od.output(w, dev)] for _ in range(n - 1)]
    return _sets_cache[key]


class Runner(ClosedOnExit):
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

    def vendors(self, workload: Workload) -> dict[str, RunResult]:
        """{variant: result} for the op's default vendor path ("") and each of
        OpDef.vendor_variants, measured now, one after the other."""
        from shapetune.ops import opdef

        return {v: self.run(workload, vendor_artifact(v)) for v in ("", *opdef(workload.op).vendor_variants)}

    def large_copy(self, nbytes: int = LARGE_COPY_BYTES) -> RunResult:
        """The device's copy bandwidth in this run: a copy of nbytes (read, and nbytes written),
        timed like the COPY yardstick."""
        r = self.pool.run_all(measure_large_copy, [(self.target.to_json(), self.opts, nbytes)], self.timeout_s)[0]
        if isinstance(r, BaseException):
            return RunResult("runtime_error", error=str(r))
        return RunResult(r["status"], LatencyStats(**r["latency"]), r["rel_err"])

    def close(self, abort: bool = False):
        self.pool.close(abort)


def vendor_baselines(runner: Runner, workload: Workload, run_id: str) -> dict[str, VendorBaseline]:
    """Every vendor path of the op timed in run `run_id` ({variant: baseline}, the default under
    ""), each named OpDef.baseline_name(variant): what dispatch compares a record of that run with.
    Raises RuntimeError if one fails (a vendor path that does not verify is a broken setup)."""
    from shapetune.ops import opdef

    od, out = opdef(workload.op), {}
    for v, r in runner.vendors(workload).items():
        if r.status != "ok":
            raise RuntimeError(f"vendor path {od.baseline_name(v)} failed on {workload.name}: {r.error}")
        out[v] = VendorBaseline(workload, runner.target, od.baseline_name(v), r.latency, run_id=run_id,
                                created=time.time())
    return out
