"""Elementwise passes (gelu_gate, bias_add): compute definitions against torch, llvm templates on odd
shapes and buckets, dispatch inside shapetune::geglu and shapetune::conv2d (the conv without its
bias + one bias (+ residual | + shift) pass), extraction from the SD 1.5 UNet; CUDA candidates build
with 128-bit accesses.

Tolerances: fp32 on the CPU; the tuned pass sums in fp32 like torch, so 1e-5 (GELU's erf: 1e-4).
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import kernels
from scheduler import templates
from scheduler.tuner import TuneOptions, tune
from scheduler.verify import check_output
from shapetune.buckets import DEFAULT, verification_members
from shapetune.ops import opdef
from shapetune.ops.elementwise import BIAS_ADD_EPILOGUES, bias_add_workload, gelu_gate_workload
from shapetune.target import cuda_target, detect

EPIS = [e for e in BIAS_ADD_EPILOGUES]
EPI_IDS = ["+".join(e) or "bias" for e in EPIS]


def _check_candidates(w, name, n=3, seed=0):
    import tvm

    cpu = detect("llvm")
    t = templates.get(name)
    space = t.space(w, cpu)
    assert space, f"{name}: empty space for {w.name}"
    od = opdef(w.op)
    for c in [space[0], space[-1]] + random.Random(seed).sample(space, min(n, len(space))):
        lib = tvm.compile(t.apply(w, cpu, c), target=cpu.tvm_target())
        members = verification_members(w, random.Random(seed)) if w.dynamic else [w]
        for mw in members:
            ins = od.inputs(mw, torch.device("cpu"), torch.Generator().manual_seed(seed))
            before = [i.clone() for i in ins]
            out = od.output(mw, torch.device("cpu")).fill_(float("nan"))
            lib["main"](*ins, out)
            assert check_output(out, od.reference(mw, ins), w.dtype).ok, (c, mw.name)
            assert all(torch.equal(a, b) for a, b in zip(ins, before))


# -- definitions -------------------------------------------------------------------------------------
def test_gelu_gate_is_diffusers_geglu_after_its_projection():
    from diffusers.models.activations import GEGLU

    mod = GEGLU(12, 8).double()
    x = torch.randn(5, 12, dtype=torch.float64)
    w = gelu_gate_workload(5, 8, "float32")
    with torch.no_grad():
        p = mod.proj(x)
        p3 = p.view(5, 2, 8)
        torch.testing.assert_close(opdef("gelu_gate").reference(w, [p3]), mod(x))
        torch.testing.assert_close(opdef("gelu_gate").vendor(w)(p3), mod(x))


@pytest.mark.parametrize("epi", EPIS, ids=EPI_IDS)
def test_bias_add_reference_is_the_conv_and_the_add_diffusers_writes(epi):
    conv = torch.nn.Conv2d(6, 8, 3, padding=1).double()
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    r, t = torch.randn(2, 8, 5, 7, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    with torch.no_grad():
        want = conv(x) + (r if epi == ("residual",) else t[:, :, None, None] if epi else 0)
        y = F.conv2d(x, conv.weight, None, padding=1)
    nhwc = lambda v: v.permute(0, 2, 3, 1).reshape(2, 35, 8)  # noqa: E731
    ins = [nhwc(y), conv.bias.detach()] + ([nhwc(r)] if epi == ("residual",) else [t] if epi else [])
    w = bias_add_workload(2, 35, 8, "float32", epi)
    od = opdef("bias_add")
    torch.testing.assert_close(od.reference(w, ins), nhwc(want))
    torch.testing.assert_close(od.vendor(w)(*ins), nhwc(want))


def test_bad_epilogue_and_buckets():
    with pytest.raises(ValueError, match="epilogue"):
        bias_add_workload(1, 4, 4, epilogue=("gelu",))
    b = DEFAULT.bucket_of(bias_add_workload(3, 1000, 320, epilogue=("shift",)))
    assert b.ranges == {"n": (3, 4), "hw": (513, 1024)} and b.dim["c"] == 320
    assert DEFAULT.bucket_of(gelu_gate_workload(77, 640)).ranges == {"m": (65, 128)}


# -- llvm templates ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["elementwise_llvm", "dlight"])
@pytest.mark.parametrize("bucket", [False, True], ids=["exact", "bucket"])
def test_llvm_templates_correct_on_odd_shapes(name, bucket):
    ws = [gelu_gate_workload(37, 24, "float32")] + [bias_add_workload(3, 7, 16, "float32", e) for e in EPIS]
    for w in ws:
        _check_candidates(DEFAULT.bucket_of(w) if bucket else w, name)


def test_cuda_candidates_build_with_128_bit_accesses():
    import tvm

    gpu = cuda_target()
    t = templates.get("elementwise_cuda")
    for w in (gelu_gate_workload(8192, 1280), bias_add_workload(2, 4096, 320, epilogue=("residual",)),
              bias_add_workload(2, 64, 1280, epilogue=("shift",)), bias_add_workload(2, 4096, 4)):
        w = DEFAULT.bucket_of(w)
        space = t.space(w, gpu)
        widest = max(c.knob["vec"] for c in space)
        assert widest == (8 if w.dim.get("c", w.dim.get("f")) % 8 == 0 else 4)
        c = next(c for c in space if c.knob["vec"] == widest)
        src = tvm.compile(t.apply(w, gpu, c), target=gpu.tvm_target()).mod.imports[0].inspect_source()
        if widest == 8:
            assert "uint4" in src, w.name  # one 128-bit load / store per thread and step


# -- dispatch --------------------------------------------------------------------------------------------
SHAPES = [(2, 5, 7, 6, 8), (1, 4, 4, 4, 16)]  # n, h, w, ci, co


@pytest.fixture(scope="module")
def tuned_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("db") / "tuning.db"
    ws = [DEFAULT.bucket_of(bias_add_workload(n, h * w, co, "float32", e)) for n, h, w, _, co in SHAPES for e in EPIS]
    ws += [DEFAULT.bucket_of(gelu_gate_workload(37, 24, "float32"))]
    tune(ws, detect("llvm"), path, TuneOptions(trials=2, batch=2, templates=("elementwise_llvm",)))
    return path


@pytest.mark.parametrize("n,h,w,ci,co", SHAPES)
def test_conv_without_a_tuned_conv_runs_cudnn_and_one_bias_pass(registry, n, h, w, ci, co):
    g = torch.Generator().manual_seed(n + co)
    conv = torch.nn.Conv2d(ci, co, 3, padding=1)
    x = torch.randn(n, ci, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    r = torch.randn(n, co, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    t = torch.randn(n, co, generator=g)
    wt, b = conv.weight.detach(), conv.bias.detach()
    tol = dict(atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(kernels.conv2d(x, wt, b, 1, 1), F.conv2d(x, wt, b, 1, 1), **tol)
        torch.testing.assert_close(kernels.conv2d(x, wt, b, 1, 1, residual=r), F.conv2d(x, wt, b, 1, 1) + r, **tol)
        y = kernels.conv2d(x, wt, b, 1, 1, shift=t)
        torch.testing.assert_close(y, F.conv2d(x, wt, b, 1, 1) + t[:, :, None, None], **tol)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert registry.calls[("bias_add", "tuned")] == 3, dict(registry.calls)
    assert registry.calls[("conv2d", "not_tuned")] == 3


def test_untuned_bias_pass_keeps_eager_conv_counted(registry):
    x = torch.randn(2, 6, 9, 9).contiguous(memory_format=torch.channels_last)  # hw 81: no bucket tuned
    conv = torch.nn.Conv2d(6, 8, 3, padding=1)
    t = torch.randn(2, 8)
    with torch.no_grad():
        y = kernels.conv2d(x, conv.weight, conv.bias, 1, 1, shift=t)
        torch.testing.assert_close(y, conv(x) + t[:, :, None, None], atol=1e-5, rtol=1e-5)
    assert registry.calls[("bias_add", "not_tuned")] == 1 and registry.calls[("bias_add", "tuned")] == 0


def test_geglu_without_a_tuned_geglu_runs_torchs_gemm_and_one_gate_pass(registry):
    g = torch.Generator().manual_seed(3)
    x, w2, b2 = torch.randn(37, 40, generator=g), torch.randn(48, 40, generator=g), torch.randn(48, generator=g)
    h, gate = F.linear(x, w2, b2).chunk(2, dim=-1)
    torch.testing.assert_close(kernels.geglu(x, w2, b2), h * F.gelu(gate), atol=1e-4, rtol=1e-4)
    assert registry.calls[("geglu", "not_tuned")] == 1
    assert registry.calls[("gelu_gate", "tuned")] == 1, dict(registry.calls)


def test_bad_shift_is_one_line_error(registry):
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(8, 6, 3, 3), torch.randn(8)
    with pytest.raises(ValueError, match="shift must be"):
        kernels.conv2d(x, w, b, 1, 1, shift=torch.randn(2, 7))
    with pytest.raises(ValueError, match="without a residual"):
        kernels.conv2d(x, w, b, 1, 1, residual=torch.randn(2, 8, 5, 7), shift=torch.randn(2, 8))


def test_shift_backward_matches_torch():
    x = torch.randn(2, 6, 5, 7, requires_grad=True)
    w = torch.randn(8, 6, 3, 3, requires_grad=True)
    t = torch.randn(2, 8, requires_grad=True)
    kernels.conv2d(x, w, None, 1, 1, shift=t).square().sum().backward()
    gx, gw, gt = x.grad, w.grad, t.grad
    x.grad = w.grad = t.grad = None
    (F.conv2d(x, w, None, 1, 1) + t[:, :, None, None]).square().sum().backward()
    for a, b in ((gx, x.grad), (gw, w.grad), (gt, t.grad)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# -- extraction --------------------------------------------------------------------------------------------
def test_sd15_elementwise_workloads_follow_the_fusion_sites():
    from scheduler.extract import sd15_elementwise_workloads

    ops = {op.workload: op.calls for op in sd15_elementwise_workloads(batch=2, height=512, width=512)}
    # every transformer block's GEGLU (16) and every biased conv: 22 ResnetBlocks' conv1 (+temb) and
    # conv2 (+shortcut), 16 proj_out (+input), the rest bias only
    assert sum(c for w, c in ops.items() if w.op == "gelu_gate") == 16
    assert sum(c for w, c in ops.items() if w.epilogue == ("shift",)) == 22
    assert sum(c for w, c in ops.items() if w.epilogue == ("residual",)) == 22 + 16
    assert gelu_gate_workload(8192, 1280) in ops and bias_add_workload(2, 4096, 320, epilogue=("shift",)) in ops
