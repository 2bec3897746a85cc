"""On an NVIDIA GPU: tune -> DB -> registry -> shapetune::linear, fp16, on torch's current stream."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs an NVIDIA GPU", allow_module_level=True)

import kernels  # noqa: E402
from kernels.registry import Registry, set_registry  # noqa: E402
from scheduler.tuner import TuneOptions, tune  # noqa: E402
from shapetune.target import detect  # noqa: E402
from shapetune.ops.linear import linear_workload  # noqa: E402

SHAPES = [(154, 320, 768, False), (300, 200, 96, True)]  # odd m and n: padding paths


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu") / "tuning.db"
    ws = [linear_workload(m, n, k, "float16", b) for m, n, k, b in SHAPES]
    reps = tune(ws, detect("cuda"), path, TuneOptions(trials=6, batch=6))
    assert all(r.best is not None for r in reps), [r.by_status for r in reps]
    reg = Registry(db_path=path, target=detect("cuda"), require_faster=False)
    prev = set_registry(reg)
    yield reg
    set_registry(prev)


@pytest.mark.parametrize("m,n,k,bias", SHAPES)
def test_tuned_fp16_linear_matches_reference(registry, m, n, k, bias):
    dev = "cuda"
    for seed in (0, 1):
        g = torch.Generator(device=dev).manual_seed(seed)
        x = torch.randn(m, k, device=dev, generator=g).half()
        w = (torch.randn(n, k, device=dev, generator=g) / k**0.5).half()
        b = torch.randn(n, device=dev, generator=g).half() if bias else None
        y = kernels.linear(x, w, b)
        ref = torch.nn.functional.linear(x.float(), w.float(), b.float() if bias else None)
        torch.testing.assert_close(y.float(), ref, atol=1e-2, rtol=1e-2)
    assert registry.calls[("linear", "tuned")] >= 2


def test_runs_on_current_stream(registry):
    m, n, k, bias = SHAPES[0]
    x = torch.randn(m, k, device="cuda").half()
    w = (torch.randn(n, k, device="cuda") / k**0.5).half()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y = kernels.linear(x, w)
        ref = x.float() @ w.float().T
    s.synchronize()
    torch.testing.assert_close(y.float(), ref, atol=1e-2, rtol=1e-2)


def test_opcheck_cuda(registry):
    x = torch.randn(154, 768, device="cuda").half()
    w = torch.randn(320, 768, device="cuda").half()
    torch.library.opcheck(torch.ops.shapetune.linear.default, (x, w, None))


# -- shape buckets on the GPU: one fp16 kernel per bucket, checked on edges, primes, odd sizes -------
BUCKET_MEMBERS = [1, 7, 16, 131, 154, 256, 11970]  # 11970: 504x760 pixels, batch 2, first level


@pytest.fixture(scope="module")
def bucket_registry(tmp_path_factory):
    from shapetune.buckets import DEFAULT

    path = tmp_path_factory.mktemp("gpu-buckets") / "tuning.db"
    ws = list(dict.fromkeys(DEFAULT.bucket_of(linear_workload(m, 320, 320, "float16", True))
                            for m in BUCKET_MEMBERS))
    reps = tune(ws, detect("cuda"), path, TuneOptions(trials=6, batch=6, templates=("gemm_cuda_wmma",)))
    assert all(r.best is not None for r in reps), [r.by_status for r in reps]
    return Registry(db_path=path, target=detect("cuda"), require_faster=False)


@pytest.mark.parametrize("m", BUCKET_MEMBERS)
def test_bucket_kernels_fp16(bucket_registry, m):
    prev = set_registry(bucket_registry)
    try:
        x = torch.randn(m, 320, device="cuda").half()
        w = (torch.randn(320, 320, device="cuda") / 320**0.5).half()
        b = torch.randn(320, device="cuda").half()
        y = kernels.linear(x, w, b)
        ref = torch.nn.functional.linear(x.float(), w.float(), b.float())
        torch.testing.assert_close(y.float(), ref, atol=1e-2, rtol=1e-2)
        res = bucket_registry._cache[("linear", m, 320, 320, torch.float16, True, "cuda")]
        assert res.kind == "bucket" and res.fn is not None
    finally:
        set_registry(prev)
