"""On an NVIDIA GPU: tune one fp16 shape per fused op -> DB -> registry -> shapetune::linear_gelu,
linear_residual, geglu; compared with an fp32 torch reference on the same fp16 inputs.

Tolerance 2e-2: fp16 output rounding (~5e-4 relative) on O(1) outputs, plus the unfused reference
path's own fp16-free fp32 math; the kernels accumulate and apply the epilogue in fp32.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs an NVIDIA GPU", allow_module_level=True)

import kernels  # noqa: E402
from kernels.registry import Registry, set_registry  # noqa: E402
from scheduler.tuner import TuneOptions, tune  # noqa: E402
from shapetune.target import detect  # noqa: E402
from shapetune.ops.linear import linear_workload  # noqa: E402
from shapetune.ops.geglu import geglu_workload  # noqa: E402

M, N, K = 300, 200, 96  # odd m and n: padding paths (linear epilogues)
GM, GF = 256, 320  # geglu_cuda_wmma takes whole tiles only
TOL = dict(atol=2e-2, rtol=2e-2)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu") / "tuning.db"
    ws = [linear_workload(M, N, K, "float16", epilogue=("bias", "gelu")),
          linear_workload(M, N, K, "float16", epilogue=("bias", "residual")),
          geglu_workload(GM, GF, K, "float16")]
    reps = tune(ws, detect("cuda"), path, TuneOptions(trials=6, batch=6))
    assert all(r.best is not None for r in reps), [(r.workload.name, r.by_status) for r in reps]
    reg = Registry(db_path=path, target=detect("cuda"), require_faster=False)
    prev = set_registry(reg)
    yield reg
    set_registry(prev)


def _inputs(n_out, seed, m=M):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, K, device="cuda", generator=g).half()
    w = (torch.randn(n_out, K, device="cuda", generator=g) / K**0.5).half()
    b = torch.randn(n_out, device="cuda", generator=g).half()
    return x, w, b


@pytest.mark.parametrize("seed", [0, 1])
def test_linear_gelu_and_residual(registry, seed):
    x, w, b = _inputs(N, seed)
    r = torch.randn(M, N, device="cuda").half()
    ref = F.linear(x.float(), w.float(), b.float())
    torch.testing.assert_close(kernels.linear_gelu(x, w, b).float(), F.gelu(ref), **TOL)
    torch.testing.assert_close(kernels.linear_residual(x, w, b, r).float(), ref + r.float(), **TOL)
    assert registry.calls[("linear_gelu", "tuned")] >= 1
    assert registry.calls[("linear_residual", "tuned")] >= 1


@pytest.mark.parametrize("seed", [0, 1])
def test_geglu(registry, seed):
    x, w, b = _inputs(2 * GF, seed, GM)
    h, g = F.linear(x.float(), w.float(), b.float()).chunk(2, dim=-1)
    torch.testing.assert_close(kernels.geglu(x, w, b).float(), h * F.gelu(g), **TOL)
    assert registry.calls[("geglu", "tuned")] >= 1


def test_geglu_matches_diffusers_module(registry):
    from diffusers.models.activations import GEGLU

    mod = GEGLU(K, GF).cuda().half()
    x = torch.randn(2, 128, K, device="cuda").half()  # m = 256 after flattening
    with torch.no_grad():
        y = kernels.geglu(x, mod.proj.weight, mod.proj.bias)
        ref = mod.float()(x.float())
    torch.testing.assert_close(y.float(), ref, **TOL)


def test_opcheck_cuda(registry):
    from torch.library import opcheck

    x, w, b = _inputs(2 * GF, 2, GM)
    opcheck(torch.ops.shapetune.geglu.default, (x, w, b))
    x, w, b = _inputs(N, 3)
    opcheck(torch.ops.shapetune.linear_gelu.default, (x, w, b))
