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
