"""On an NVIDIA GPU: a pack (kernels.pack) served by TVM's runtime only (issue 12 item 6).

Self-contained, in two fresh processes:
  1. with the compiler: tune one fp16 bucket of a conv's bias + residual pass on this GPU
     (elementwise_cuda, a few trials, records verified here; it beats torch's two adds by ~2x on an
     H200, so the registry serves it on its measured merit) and `shapetune pack --target cuda` it;
  2. without it: TVM_USE_RUNTIME_LIB=1 (TVM's runtime library only, no compiler library), no nvcc
     (SHAPETUNE_NVCC points nowhere and PATH holds none), tvm.compile/tvm.build raising where they
     exist, an empty kernel cache: SHAPETUNE_PACK serves the pass inside kernels.conv2d (cuDNN's conv
     without its bias, then the packed kernel) from the pack's fatbin.
Tolerance: relative L2 <= 1e-2 against torch's fp16 conv + residual (fp16 rounding).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs an NVIDIA GPU", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]

TUNE = r"""
import sys
from scheduler.tuner import TuneOptions, tune
from shapetune.buckets import DEFAULT
from shapetune.ops.elementwise import bias_add_workload
from shapetune.target import detect

w = DEFAULT.bucket_of(bias_add_workload(2, 4096, 320, "float16", ("residual",)))
(rep,) = tune([w], detect("cuda"), sys.argv[1], TuneOptions(trials=4, batch=4, templates=("elementwise_cuda",)))
assert rep.best is not None, rep.by_status
"""

SERVE = r"""
import json, os
from pathlib import Path
import tvm

def _no_compiler(*a, **k):
    raise RuntimeError("the compiler was called while serving a pack")

for name in ("compile", "build"):
    if hasattr(tvm, name):
        setattr(tvm, name, _no_compiler)
import torch, kernels
g = torch.Generator().manual_seed(0)
cl = dict(device="cuda", dtype=torch.float16, memory_format=torch.channels_last)
x = torch.randn(2, 320, 64, 64, generator=g).to(**cl)
r = torch.randn(2, 320, 64, 64, generator=g).to(**cl)
w = (torch.randn(320, 320, 3, 3, generator=g) / 54).to(**cl)
b = torch.randn(320, generator=g).to("cuda", torch.float16)
y = kernels.conv2d(x, w, b, 1, 1, residual=r)
ref = torch.nn.functional.conv2d(x, w, b, 1, 1) + r
cache = Path(os.environ["SHAPETUNE_CACHE_DIR"])
print(json.dumps({"summary": kernels.fallback_summary(),
                  "rel_l2": float((y.float() - ref.float()).norm() / ref.float().norm()),
                  "cache": sorted(str(p) for p in cache.rglob("*")) if cache.exists() else []}))
"""


def _run(args: list[str], env: dict, timeout: float = 1200) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-4000:])
    return p


def _without_nvcc(path: str) -> str:
    return os.pathsep.join(d for d in path.split(os.pathsep) if d and not (Path(d) / "nvcc").exists())


def test_pack_serves_on_tvm_runtime_only(tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith("SHAPETUNE_")}
    build = {**base, "SHAPETUNE_CACHE_DIR": str(tmp_path / "cache"), "SHAPETUNE_TARGET": "cuda"}
    _run(["-c", TUNE, str(tmp_path / "t.db")], build)
    _run(["-m", "shapetune.cli", "pack", str(tmp_path / "pack"), "--db", str(tmp_path / "t.db"), "--target",
          "cuda"], build)
    for so in (tmp_path / "pack" / "kernels").iterdir():
        assert b'extern "C" __global__' not in so.read_bytes(), f"{so} carries CUDA source"

    serve = {**base, "SHAPETUNE_PACK": str(tmp_path / "pack"), "SHAPETUNE_CACHE_DIR": str(tmp_path / "empty"),
             "SHAPETUNE_DB": str(tmp_path / "no.db"), "SHAPETUNE_TARGET": "cuda", "TVM_USE_RUNTIME_LIB": "1",
             "SHAPETUNE_NVCC": str(tmp_path / "no-nvcc"), "PATH": _without_nvcc(os.environ.get("PATH", ""))}
    got = json.loads(_run(["-c", SERVE], serve, timeout=300).stdout.strip().splitlines()[-1])
    assert got["summary"]["bias_add"] == {"tuned": 1}, got
    assert got["rel_l2"] <= 1e-2 and got["cache"] == [], got
