"""Targets: CUDA arch strings are compared as versions, not as text (issue 8 item 8)."""

from __future__ import annotations

import pytest

from shapetune.target import cuda_arch_version, cuda_target


@pytest.mark.parametrize("arch, version", [("sm_90", (9, 0)), ("sm_90a", (9, 0)), ("sm_86", (8, 6)),
                                           ("sm_100", (10, 0)), ("sm_100a", (10, 0)), ("sm_103f", (10, 3)),
                                           ("sm_120", (12, 0)), ("sm_70", (7, 0))])
def test_cuda_arch_version(arch, version):
    assert cuda_arch_version(arch) == version


@pytest.mark.parametrize("bad", ["znver3", "sm_9", "sm_", "compute_90", "sm_90x1", ""])
def test_cuda_arch_version_rejects(bad):
    with pytest.raises(ValueError, match="arch"):
        cuda_arch_version(bad)


@pytest.mark.parametrize("arch, smem", [("sm_80", 49152), ("sm_89", 49152), ("sm_90", 232448),
                                        ("sm_90a", 232448), ("sm_100", 232448), ("sm_103", 232448),
                                        ("sm_120", 49152)])
def test_tvm_target_shared_memory_by_arch(arch, smem):
    """Hopper and datacenter Blackwell get 227 KB per block; "sm_100" < "sm_90" as text got 48 KB."""
    t = cuda_target(arch).tvm_target()
    assert int(t.attrs["max_shared_memory_per_block"]) == smem and str(t.attrs["arch"]) == arch


# -- the key: what can change a kernel's speed class ---------------------------------------------------
_SERVE_HERE = """
import sys
from kernels.registry import Registry
from shapetune.ops.linear import linear_workload
from shapetune.target import detect
t = detect("llvm")
res = Registry(db_path=sys.argv[1], target=t).resolve(linear_workload(16, 8, 16, "float32", bias=False))
print(t.num_cores, res.kind, res.cause)
"""


def test_a_record_made_with_two_threads_is_served_with_one(tmp_path):
    """OMP_NUM_THREADS=1 (or taskset) changes the CPU thread count, not the kernel: a record tuned with
    2 threads is still served (issue 11 item 7: every record read as stale). The count it was made
    with stays in the stored target, as provenance."""
    import dataclasses
    import os
    import subprocess
    import sys

    from scheduler.tuner import search_space
    from shapetune.db import TuningDB
    from shapetune.ops.linear import linear_workload
    from shapetune.records import LatencyStats, MeasureResult, VendorBaseline
    from shapetune.target import detect

    made = dataclasses.replace(detect("llvm"), num_cores=2)
    w = linear_workload(16, 8, 16, "float32", bias=False)
    cand = search_space(w, made, ("gemm_llvm",))[0]
    db = tmp_path / "t.db"
    with TuningDB(db) as d:
        d.add_result(MeasureResult(w, made, cand, "ok", LatencyStats.of([5.0]), max_rel_err=0.0, run_id="r1",
                                   created=1e9))
        d.add_baseline(VendorBaseline(w, made, "torch.nn.functional.linear", LatencyStats.of([20.0] * 3),
                                      run_id="r1", created=1e9))
        assert d.targets()[0].num_cores == 2
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SHAPETUNE_TARGET": "llvm"}
    out = subprocess.run([sys.executable, "-c", _SERVE_HERE, str(db)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[:2] == ["1", "exact"], out.stdout


def test_the_key_holds_what_changes_speed():
    """On a GPU the SM count is part of the device (and the key); a CPU's thread count is per process,
    not in the key; every version still is."""
    import dataclasses

    from shapetune.target import cuda_target, detect

    gpu = cuda_target()
    assert dataclasses.replace(gpu, num_cores=114).key != gpu.key
    cpu = detect("llvm")
    assert dataclasses.replace(cpu, num_cores=cpu.num_cores + 3).key == cpu.key
    assert dataclasses.replace(cpu, torch_version="0.0").key != cpu.key
    assert dataclasses.replace(cpu, num_cores=cpu.num_cores + 3).differences(cpu) == []
