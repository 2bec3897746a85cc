"""Shape buckets: one tuned kernel serves every shape whose dynamic dims fall in its ranges.

Design (policy "pow2-v1"): each dynamic dim is cut at powers of two, buckets (2^(i-1), 2^i], the
smallest [1, 16] (no tensor-core tile is smaller than 16 rows, so below 16 every m costs the same
tile). A bucket's kernel keeps the dim symbolic in TIR and pads to its tile multiple inside the
kernel (pad_einsum / predication), so it is correct for every value in the bucket. It is verified
at the bounds and at an odd value in between, and scored by the geometric mean of its times at
the bucket's upper bound, middle and lower bound (`timing_members`); the workload's own dims hold
the upper bound as its representative. Tuned at the upper bound alone, kernels lost speed in the
lower half of a bucket. Why powers of two: the work per call at most doubles across a bucket, so one
tile/wave choice can stay close to best across it; scripts/bench_buckets.py measures how close
(bucket efficiency).

Symbolic dims vs padding. The alternative, padding inputs on the host up to the bucket's upper
bound and running a fixed-shape kernel, costs up to 2x the arithmetic in a pow2 bucket plus a copy
of the padded operands per call. Keeping m symbolic costs only the last partial tile: the kernel pads
in shared memory (pad_einsum: out-of-range rows read as zero, their results never stored) and the
CPU schedules predicate the tail. The price is a kernel that cannot constant-fold m (a few integer
ops per tile) and, on the CPU, tails that stay scalar.

Dynamic dims per op family: linear: m (batch x tokens; n and k come from the weights); group_norm:
n (batch, on the BATCH edges 1, 2, 4, 8, ...: each batch size a pipeline runs at) and hw (spatial
size); layer_norm, add_layer_norm: m (rows).
geglu: m (batch x tokens, as linear). attention: b (batch, the BATCH edges), sq and skv (query and
key/value tokens), each on the pow2 edges; heads and head dim stay exact.
conv2d: n (batch, the BATCH edges; h and w exact: `shapetune/ops/conv.py`'s note says why).
gelu_gate: m (rows, as geglu). bias_add: n (batch, its own edges 1, 2, 4, 8, ...: the batch sizes a
pipeline runs at) and hw (positions, the pow2 edges); channels stay exact.
Shapes beyond the last bucket (2^20 on the pow2 edges, 64 on the batch edges) get no bucket: the op
falls back, counted as "outside_buckets". A bucket's kernel is verified at its upper bound like any
member, so one whose indices would overflow there never enters the DB.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .workload import Workload


@dataclass(frozen=True)
class DimBuckets:
    dim: str
    edges: tuple[int, ...]  # inclusive upper bounds, ascending: [1, e0], [e0+1, e1], ...

    def find(self, v: int) -> tuple[int, int] | None:
        lo = 1
        for hi in self.edges:
            if v <= hi:
                return lo, hi
            lo = hi + 1
        return None

    def ranges(self) -> list[tuple[int, int]]:
        out, lo = [], 1
        for hi in self.edges:
            out.append((lo, hi))
            lo = hi + 1
        return out


@dataclass(frozen=True)
class BucketPolicy:
    name: str
    dims: tuple[tuple[str, tuple[DimBuckets, ...]], ...]  # (op, per-dim buckets)

    def for_op(self, op: str) -> tuple[DimBuckets, ...]:
        return dict(self.dims).get(op, ())

    def bucket_of(self, w: Workload) -> Workload | None:
        """The bucket workload serving w (dims at the bucket's representative), or None when a
        dynamic dim is beyond every bucket. Ops without dynamic dims bucket to themselves."""
        specs = self.for_op(w.op)
        if not specs:
            return w
        dims, dynamic = dict(w.dims), []
        for spec in specs:
            rng = spec.find(dims[spec.dim])
            if rng is None:
                return None
            dims[spec.dim] = rng[1]  # representative: the upper bound
            dynamic.append((spec.dim, *rng))
        return Workload(w.op, tuple(dims.items()), w.dtype, w.acc_dtype, w.layout, w.epilogue, tuple(dynamic))

    def rows(self, op: str | None = None) -> list[dict]:
        """Every bucket as a plain row (what the DB stores and `shapetune db buckets` shows)."""
        return [{"policy": self.name, "op": o, "dim": spec.dim, "lo": lo, "hi": hi, "representative": hi}
                for o, specs in self.dims if op in (None, o) for spec in specs for lo, hi in spec.ranges()]


def concrete(bucket: Workload, **values: int) -> Workload:
    """A concrete member of a bucket workload (dims replaced, nothing dynamic)."""
    dims = dict(bucket.dims)
    for n, v in values.items():
        lo, hi = bucket.ranges[n]
        if not lo <= v <= hi:
            raise ValueError(f"{n}={v} is outside the bucket [{lo}, {hi}]")
        dims[n] = v
    return Workload(bucket.op, tuple(dims.items()), bucket.dtype, bucket.acc_dtype, bucket.layout, bucket.epilogue)


def verification_members(bucket: Workload, rng: random.Random) -> list[Workload]:
    """Shapes a bucket kernel is checked on: the representative, each bound, and an odd value."""
    out = [concrete(bucket)]
    for n, lo, hi in bucket.dynamic:
        odd = [v for v in range(lo, hi + 1) if v % 2] or [lo]
        for v in dict.fromkeys((lo, hi, rng.choice(odd))):
            w = concrete(bucket, **{n: v})
            if w not in out:
                out.append(w)
    return out


def timing_members(bucket: Workload) -> list[Workload]:
    """Shapes a bucket kernel is timed on: upper bound, middle, lower bound (its score is the
    geometric mean, so each size counts alike whatever its absolute time)."""
    out: list[Workload] = []
    for n, lo, hi in bucket.dynamic:
        for v in dict.fromkeys((hi, (lo + hi + 1) // 2, lo)):
            out.append(concrete(bucket, **{n: v}))
    return out or [bucket]


# [1,16], [17,32], ..., [524289,1048576]: 2^20 positions is the SD VAE decoder's full resolution at 1024²
# (and 8 x 128² = 2^17 rows the UNet's largest GEMM on the grid 1-8 x 256-1024 px); the edges ended at 65536
# before 2026-12-03, so those calls had no bucket (the buckets below it are unchanged)
POW2 = DimBuckets("m", tuple([16] + [2**i for i in range(5, 21)]))
BATCH = DimBuckets("n", (1, 2, 4, 8, 16, 32, 64))  # [1], [2], [3,4], [5,8], ...: each batch size alike
DEFAULT = BucketPolicy("pow2-v1", (("linear", (POW2,)), ("group_norm", (BATCH, DimBuckets("hw", POW2.edges))),
                                   ("layer_norm", (POW2,)), ("add_layer_norm", (POW2,)), ("geglu", (POW2,)),
                                   ("conv2d", (DimBuckets("n", BATCH.edges),)),
                                   ("attention", (DimBuckets("b", BATCH.edges), DimBuckets("sq", POW2.edges),
                                                  DimBuckets("skv", POW2.edges))),
                                   ("gelu_gate", (POW2,)), ("bias_add", (BATCH, DimBuckets("hw", POW2.edges)))))
