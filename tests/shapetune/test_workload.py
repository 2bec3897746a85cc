"""Workload names: one name per key (issue 8 item 5), readable and unchanged for the common case."""

from __future__ import annotations

from collections import defaultdict

import pytest

from shapetune.ops.attention import attention_workload
from shapetune.ops.conv import conv2d_workload
from shapetune.ops.norm import group_norm_workload, layer_norm_workload
from shapetune.buckets import DEFAULT
from shapetune.workload import Workload
from shapetune.ops.linear import linear_workload


def _clashes(workloads) -> dict[str, set[str]]:
    """name -> keys, for the names that more than one distinct key shares."""
    keys = defaultdict(set)
    for w in workloads:
        keys[w.name].add(w.key)
    return {n: ks for n, ks in keys.items() if len(ks) > 1}


def test_conv_stride_and_padding_in_name():
    s1 = conv2d_workload(2, 64, 64, 320, 320, 3, 3, stride=1, padding=1)
    s2 = conv2d_workload(2, 64, 64, 320, 320, 3, 3, stride=2, padding=1)
    p0 = conv2d_workload(2, 64, 64, 320, 320, 3, 3, stride=1, padding=0)
    assert len({s1.name, s2.name, p0.name}) == 3
    assert s1.name == "conv2d_n2_h64_w64_ci320_co320_kh3_kw3_f16+bias"  # the common case keeps its name
    assert s2.name == "conv2d_n2_h64_w64_ci320_co320_kh3_kw3_s2p1_f16+bias"
    assert p0.name == "conv2d_n2_h64_w64_ci320_co320_kh3_kw3_s1p0_f16+bias"
    one = conv2d_workload(2, 64, 64, 320, 640, 1, 1, stride=1, padding=0)  # 1x1, "same" padding 0
    assert one.name == "conv2d_n2_h64_w64_ci320_co640_kh1_kw1_f16+bias"


def test_norm_eps_attention_scale_and_acc_dtype_in_name():
    a, b = group_norm_workload(2, 4096, 320, eps=1e-5), group_norm_workload(2, 4096, 320, eps=1e-6)
    assert a.name == "group_norm_n2_hw4096_c320_g32_f16+affine" and b.name == "group_norm_n2_hw4096_c320_g32_eps1e-06_f16+affine"
    assert layer_norm_workload(154, 768).name != layer_norm_workload(154, 768, eps=1e-6).name
    sd, other = attention_workload(2, 4096, 4096, 8, 40), attention_workload(2, 4096, 4096, 8, 40, scale=0.1)
    assert sd.name == "attention_b2_sq4096_skv4096_h8_d40_f16" and other.name.endswith("_scale0.1_f16")
    lin = linear_workload(64, 320, 320)
    acc16 = Workload(lin.op, lin.dims, lin.dtype, "float16", lin.layout, lin.epilogue)
    assert lin.name == "linear_m64_n320_k320_f16+bias" and acc16.name == "linear_m64_n320_k320_f16_accf16+bias"
    unknown = Workload("myop", (("m", 8),), "float32", "float32", "x[m] t3")
    assert unknown.name == "myop_m8_t3_f32"  # an op with no stated defaults shows every layout parameter


@pytest.fixture(scope="module")
def sd15_all():
    """Every SD 1.5 UNet workload of every family (`shapetune tune --preset sd15`) and their buckets."""
    from scheduler.extract import SD15_FAMILIES, sd15_workloads

    exact = [o.workload for o in sd15_workloads(tuple(SD15_FAMILIES))]
    buckets = [b for b in map(DEFAULT.bucket_of, exact) if b is not None]
    return exact + buckets


def test_sd15_names_unique_per_key(sd15_all):
    """Distinct keys <=> distinct names over every SD workload of every family (conv had 3 clashes)."""
    ops = {w.op for w in sd15_all}
    assert {"linear", "geglu", "group_norm", "layer_norm", "conv2d", "attention"} <= ops
    assert any(w.dynamic for w in sd15_all) and any(w.layout.endswith("s2 p1") for w in sd15_all)
    assert _clashes(sd15_all) == {}
    by_key = {w.key: w.name for w in sd15_all}
    assert len(set(by_key.values())) == len(by_key)
