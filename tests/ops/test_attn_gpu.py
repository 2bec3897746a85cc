"""On an NVIDIA GPU: tune attn_cuda_wmma (few trials) -> DB -> the best kernel against torch SDPA.

Tolerance fp16: the runner's verification (scheduler/verify.py: 1e-2 elementwise, 5e-3 relative L2
against the float64 reference); P is rounded to fp16 before P·V, as FlashAttention does.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs an NVIDIA GPU", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402

from shapetune.ops.attention import attention_workload, scale_of  # noqa: E402
from scheduler.loader import call_on_current_stream, load_function  # noqa: E402
from scheduler.builder import build_one  # noqa: E402
from scheduler.tuner import TuneOptions, tune  # noqa: E402
from shapetune.target import detect  # noqa: E402

CROSS = attention_workload(2, 64, 77, 8, 160)  # ragged key tile, d = 160
BUCKET = attention_workload(2, 256, 128, 8, 80, skv_range=(65, 128))  # symbolic skv


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu-attn") / "tuning.db"
    reps = tune([CROSS, BUCKET], detect("cuda"), path,
                TuneOptions(trials=4, batch=4, templates=("attn_cuda_wmma",)))
    assert all(r.best is not None for r in reps), [r.by_status for r in reps]
    return {r.workload.key: r for r in reps}


@pytest.mark.parametrize("w", [CROSS, BUCKET], ids=["cross", "bucket"])
def test_tuned_attention_verified(tuned, w):
    rep = tuned[w.key]
    assert rep.by_status.get("wrong_result", 0) == 0, rep.by_status
    assert rep.best.candidate.template == "attn_cuda_wmma"
    assert rep.best.max_rel_err < 5e-3


def test_best_bucket_kernel_matches_sdpa_at_odd_sizes(tuned, tmp_path):
    tgt = detect("cuda")
    best = tuned[BUCKET.key].best
    path, _ = build_one(BUCKET.to_json(), tgt.to_json(), best.candidate.to_json(), str(tmp_path))
    fn = load_function(path, True)
    d = BUCKET.dim
    gen = torch.Generator(device="cuda").manual_seed(0)
    for skv in (65, 77, 128):
        q = torch.randn(d["b"], d["sq"], d["h"], d["d"], device="cuda", generator=gen).half()
        k = torch.randn(d["b"], skv, d["h"], d["d"], device="cuda", generator=gen).half()
        v = torch.randn(d["b"], skv, d["h"], d["d"], device="cuda", generator=gen).half()
        o = torch.full_like(q, float("nan"))
        call_on_current_stream(fn, [q, k, v, o], True)
        ref = F.scaled_dot_product_attention(q.transpose(1, 2).double(), k.transpose(1, 2).double(),
                                             v.transpose(1, 2).double(), scale=scale_of(BUCKET)).transpose(1, 2)
        torch.testing.assert_close(o.double(), ref, atol=1e-2, rtol=1e-2)
