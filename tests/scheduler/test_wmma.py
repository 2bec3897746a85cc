"""The WMMA templates' own five tensor intrinsics (scheduler/templates/wmma.py).

They replace TVM's `tvm.s_tir.tensor_intrin.cuda`, whose import registers about a hundred
intrinsics (25-97 s per process): a candidate must tensorize without that import, and the CUDA it
generates must be exactly what TVM's intrinsics of the same configuration give.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys

import pytest

from shapetune.buckets import DEFAULT
from shapetune.ops.conv import conv2d_workload
from shapetune.ops.geglu import geglu_workload
from shapetune.ops.linear import linear_workload

CASES = [("gemm_cuda_wmma", linear_workload(8192, 320, 320)),
         ("gemm_cuda_wmma", DEFAULT.bucket_of(linear_workload(4096, 640, 2560))),
         ("geglu_cuda_wmma", geglu_workload(8192, 1280, 320)),
         ("conv_cuda_wmma", conv2d_workload(2, 64, 64, 320, 320, 3, 3, 1, 1, "float16", True, True))]


def _sources(per_case: int = 2) -> list[str]:
    import tvm

    from scheduler.templates import get
    from shapetune.target import cuda_target

    target, rng, out = cuda_target(), random.Random(0), []
    for name, w in CASES:
        t = get(name)
        for c in rng.sample(t.space(w, target), per_case):
            with target.tvm_target():
                lib = tvm.compile(t.apply(w, target, c), target=target.tvm_target())
            out.append("".join(m.inspect_source() for m in lib.mod.imports if m.kind == "cuda"))
    return out


def test_wmma_candidates_build_without_tvms_intrinsic_module():
    """A fresh process builds a tensorized GEMM for sm_90 without importing tvm.s_tir.tensor_intrin."""
    code = (
        "import sys\n"
        "from tests.scheduler.test_wmma import _sources\n"
        "src = _sources(1)\n"
        "assert all('wmma::mma_sync' in s and 'wmma::load_matrix_sync' in s for s in src)\n"
        "assert not any(m.startswith('tvm.s_tir.tensor_intrin') for m in sys.modules), 'imported'\n"
        "from scheduler.templates import wmma\n"
        "assert wmma.intrinsics() is wmma.intrinsics()\n"
        "print('ok', len(src))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok 4" in r.stdout, r.stderr[-2000:]


@pytest.mark.slow
def test_generated_cuda_equals_tvms_intrinsics():
    """Same CUDA source, byte for byte, as with TVM's wmma intrinsic group of the same configuration
    (its import costs 25-97 s, hence slow)."""
    from tvm.s_tir.tensor_intrin.cuda import get_wmma_intrin_group

    from scheduler.templates import wmma

    ours = [hashlib.sha256(s.encode()).hexdigest() for s in _sources()]
    group = get_wmma_intrin_group(load_scope="shared.dyn", store_scope="shared", in_dtype="float16",
                                  out_dtype="float32", trans_b=True)
    saved = wmma.intrinsics
    wmma.intrinsics = lambda: group
    try:
        theirs = [hashlib.sha256(s.encode()).hexdigest() for s in _sources()]
    finally:
        wmma.intrinsics = saved
    assert ours == theirs
