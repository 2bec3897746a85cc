"""Synthetic GEMM measurements for the cost-model tests: an analytical latency model with noise, no mocks.

`simulate` times one candidate of the `test_gemm_tiled` template (knobs bm/bn/bk/unroll/vec over SPACE)
on a made-up H100 (padding, wave quantization, per-step overhead; some knob sets fail to build, launch
or verify); `measure(w, knobs_list, seed)` is a list of MeasureResult, `sample(n, seed)` n distinct
knob dicts. Importing this module registers the template's analytical features (x:waves, ...).
`_twins()` gives (linear twins, conv2d twins): workloads that differ only in epilogue, layout or range.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

import cost_model
from cost_model import gemm_tile_features, register_feature_fn
from shapetune.records import Candidate, LatencyStats, MeasureResult
from shapetune.target import Target
from shapetune.ops.linear import linear_workload


TEMPLATE = "test_gemm_tiled"
H100 = Target("cuda", "sm_90", "NVIDIA H100 80GB HBM3", 132, "0.27.0", "13.0", "2.11.0")
SPACE = [dict(bm=bm, bn=bn, bk=bk, unroll=u, vec=v)
         for bm, bn, bk, u, v in itertools.product((16, 32, 64, 128, 256), (16, 32, 64, 128, 256),
                                                   (16, 32, 64), (False, True), (1, 4, 8))]
TRAIN = [linear_workload(8192, 320, 320), linear_workload(2048, 1280, 1280), linear_workload(154, 768, 3072)]
HELD_OUT = linear_workload(4096, 640, 1920)


def _tile_features(w, t, kn):
    d = w.dim
    return gemm_tile_features(d["m"], d["n"], d["k"], kn["bm"], kn["bn"], kn["bk"], t.num_cores,
                              cost_model.dtype_bytes(w.dtype))


register_feature_fn(TEMPLATE, _tile_features)


def simulate(w, t, kn, rng) -> MeasureResult:
    """Measure one candidate on a made-up H100: padding, wave quantization, per-step overhead."""
    m, n, k = w.dim["m"], w.dim["n"], w.dim["k"]
    bm, bn, bk, unroll, vec = kn["bm"], kn["bn"], kn["bk"], kn["unroll"], kn["vec"]
    c = Candidate(TEMPLATE, tuple(kn.items()))
    if 3 * (bm + bn) * bk * 2 > 160 * 1024:
        return MeasureResult(w, t, c, "build_error", error="shared memory exceeds 160 KB")
    if bm * bn > 128 * 256:
        return MeasureResult(w, t, c, "runtime_error", error="too many resources requested for launch")
    if vec == 8 and bk == 16 and unroll:
        return MeasureResult(w, t, c, "wrong_result", max_rel_err=0.3)
    eff = {1: 0.5, 4: 0.85, 8: 1.0}[vec] * (0.7 if bm * bn < 64 * 64 else 1.0)
    eff *= (1.15 if bk >= 32 else 0.95) if unroll else 1.0
    step = max(2.0 * bm * bn * bk / (1e6 * eff), (bm + bn) * bk * 2 / 80e3) + (0.025 if unroll else 0.05)
    tile_us = math.ceil(k / bk) * step + bm * bn * 2 / 80e3
    waves = math.ceil(math.ceil(m / bm) * math.ceil(n / bn) / t.num_cores)
    lat = (waves * tile_us + 4.0) * float(np.exp(rng.normal(0.0, 0.03)))
    return MeasureResult(w, t, c, "ok", latency=LatencyStats.of([lat]))


def measure(w, knobs_list, seed=0):
    rng = np.random.default_rng(seed)
    return [simulate(w, H100, kn, rng) for kn in knobs_list]


def sample(n, seed):
    rng = np.random.default_rng(seed)
    return [SPACE[i] for i in rng.choice(len(SPACE), size=n, replace=False)]


# -- twins: workloads that differ only in epilogue, layout or dynamic ranges (issue 8 item 9) -------
PLAIN = Candidate("test_untiled", (("vec", 4),))  # a template without analytical features (any op)


def _twins():
    from shapetune.ops.conv import conv2d_workload

    lin = [linear_workload(256, 320, 320), linear_workload(256, 320, 320, bias=False),
           linear_workload(256, 320, 320, epilogue=("bias", "gelu")),
           linear_workload(256, 320, 320, epilogue=("bias", "residual")),
           linear_workload(256, 320, 320, m_range=(129, 256)),  # the bucket whose representative is m=256
           linear_workload(256, 320, 320, m_range=(1, 256))]
    conv = [conv2d_workload(2, 32, 32, 64, 64, stride=s, padding=p, residual=r)
            for s, p, r in ((1, 1, False), (2, 1, False), (1, 0, False), (1, 1, True))]
    return lin, conv
