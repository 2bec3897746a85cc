"""Schedule templates: every llvm template is correct on odd shapes; the CUDA space builds; candidates
are plain, replayable data."""

from __future__ import annotations

import json
import random

import pytest
import torch

from shapetune.ops import opdef
from scheduler import templates
from scheduler.verify import check_output
from shapetune.records import Candidate
from shapetune.target import cuda_target, detect
from shapetune.ops.linear import linear_workload

SHAPES = [(1, 7, 13), (37, 64, 96), (64, 64, 64)]  # m=1 / primes, ragged tiles, all-divisible
PER_TEMPLATE = 4  # sampled candidates per (template, shape)


@pytest.fixture(scope="module")
def cpu():
    return detect("llvm")


def cheap(c: Candidate) -> bool:
    """Candidates LLVM compiles in about a second. gemm_llvm's unroll_k fully unrolls tk x tm
    statements, each a tn-wide vector op: tm=32, tk=16 takes ~60 s to compile here, tk=64 minutes."""
    kn = c.knob
    return not kn.get("unroll_k") or kn["tm"] * kn["tk"] <= 32


def _sample(space, n, seed):
    # the first candidate (smallest tiles) and the last cheap one (largest) plus random ones between
    space = [c for c in space if cheap(c)]
    if len(space) <= n:
        return list(space)
    picked = [space[0], space[-1]]
    picked += random.Random(seed).sample(space[1:-1], n - 2)
    return picked


def _build_and_check(w, tgt, template, cand, seed=0):
    import tvm

    mod = template.apply(w, tgt, cand)
    assert "main" in [gv.name_hint for gv in mod.get_global_vars()]
    with tgt.tvm_target():
        lib = tvm.compile(mod, target=tgt.tvm_target())
    od = opdef(w.op)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(2):  # two draws: a kernel must not depend on what the output held before
        ins = od.inputs(w, torch.device("cpu"), gen)
        out = od.output(w, torch.device("cpu")).fill_(float("nan"))
        lib["main"](*ins, out)  # torch CPU tensors go straight into the TVM function
        chk = check_output(out, od.reference(w, ins), w.dtype)
        assert chk.ok, f"{cand} on {w.name}: {chk.reason}"


LLVM_TEMPLATES = ["dlight", "gemm_llvm"]


def test_llvm_templates_cover_linear(cpu):
    w = linear_workload(37, 64, 96, "float32")
    names = {t.name for t in templates.for_workload(w, cpu)}
    assert set(LLVM_TEMPLATES) <= names
    assert "gemm_cuda_wmma" not in names  # a CUDA template never applies to llvm
    assert {t.name for t in templates.all_templates()
            if "llvm" in t.kinds and (not t.ops or "linear" in t.ops)} == set(LLVM_TEMPLATES)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("m,n,k", SHAPES, ids=[f"m{m}n{n}k{k}" for m, n, k in SHAPES])
@pytest.mark.parametrize("name", LLVM_TEMPLATES)
def test_llvm_template_correct_on_odd_shapes(cpu, name, m, n, k, bias):
    w = linear_workload(m, n, k, "float32", bias=bias)
    t = templates.get(name)
    assert t.applies(w, cpu)
    space = t.space(w, cpu)
    assert space, f"{name} has no candidate for {w.name}"
    for i, c in enumerate(_sample(space, PER_TEMPLATE, seed=m * 1000 + n + k)):
        _build_and_check(w, cpu, t, c, seed=i)


def test_gemm_llvm_space_respects_problem_size(cpu):
    t = templates.get("gemm_llvm")
    w = linear_workload(1, 7, 13, "float32")
    for c in t.space(w, cpu):
        kn = c.knob
        assert kn["tm"] <= 2 and kn["tn"] <= 7 and kn["tk"] <= 13
    big = t.space(linear_workload(4096, 4096, 4096, "float32"), cpu)
    assert all(c.knob["tm"] * c.knob["tn"] <= 1024 for c in big)
    assert len(big) == len({c.key for c in big})


@pytest.mark.parametrize("wl", [linear_workload(37, 64, 96, "float32"), linear_workload(4096, 320, 320)],
                         ids=["cpu-f32", "sd-f16"])
def test_candidates_frozen_serializable_and_space_deterministic(cpu, wl):
    tgt = cpu if wl.dtype == "float32" else cuda_target()
    for t in templates.for_workload(wl, tgt):
        s1, s2 = t.space(wl, tgt), t.space(wl, tgt)
        assert s1 == s2 and [c.key for c in s1] == [c.key for c in s2]
        assert len(set(s1)) == len(s1)  # hashable, no duplicates
        for c in s1:
            assert c.template == t.name
            assert Candidate.from_json(c.to_json()) == c
            assert Candidate.from_json(json.dumps(c.to_json())) == c  # through real JSON text
            assert Candidate.from_json(c.to_json()).key == c.key
            with pytest.raises(AttributeError):
                c.template = "other"  # frozen
        # knob order does not matter
        c = s1[-1]
        assert Candidate(c.template, tuple(reversed(c.knobs))) == c


@pytest.fixture(scope="module")
def sd_workloads():
    return [linear_workload(4096, 320, 320), linear_workload(1024, 1280, 320, bias=False),
            linear_workload(77, 768, 320), linear_workload(2, 1280, 320)]


def test_cuda_wmma_space_nonempty_for_sd_shapes(sd_workloads):
    tgt = cuda_target()
    t = templates.get("gemm_cuda_wmma")
    for w in sd_workloads:
        assert t.applies(w, tgt)
        assert len(t.space(w, tgt)) > 0, w.name
    assert not t.applies(linear_workload(64, 64, 64, "float32"), tgt)  # fp16 only


@pytest.mark.slow
def test_cuda_wmma_and_dlight_build_for_cuda_target(sd_workloads):
    """CUDA codegen needs no GPU: the module is compiled to CUDA source (no nvcc without a runtime).
    Slow: dlight's Matmul rule imports TVM's tensor intrinsics (25-97 s)."""
    import tvm

    tgt = cuda_target()
    w = sd_workloads[0]
    wmma = templates.get("gemm_cuda_wmma")
    for c in random.Random(0).sample(wmma.space(w, tgt), 3) + [Candidate("dlight")]:
        mod = templates.get(c.template).apply(w, tgt, c)
        with tgt.tvm_target():
            lib = tvm.compile(mod, target=tgt.tvm_target())
        cuda = [m for m in lib.mod.imports if m.kind == "cuda"]
        assert cuda, f"{c}: no CUDA module"
        src = cuda[0].inspect_source()
        assert "__global__" in src and "wmma" in src, c
