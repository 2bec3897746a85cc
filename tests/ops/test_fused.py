"""Fused linear ops: linear epilogues (bias, gelu, residual) and geglu — compute definitions, llvm
templates on odd shapes, the shapetune::linear_gelu / linear_residual / geglu custom ops, GEGLU
extraction; slow: sampled CUDA candidates build for the SD 1.5 geglu shape.

Tolerances: fp32 on the CPU, tuned TVM kernel vs torch fp32: 1e-4 (accumulation order; TVM's erf is
a float32 polynomial, within a few ulp of torch's). Template outputs are checked by scheduler.verify
against the float64 reference (its fp32 tolerances, 1e-4 elementwise / 1e-5 relative L2).
"""

from __future__ import annotations

import random
import re

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import kernels
from shapetune.ops import opdef
from scheduler import templates
from scheduler.tuner import TuneOptions, tune
from scheduler.verify import check_output
from shapetune.buckets import DEFAULT, verification_members
from shapetune.target import cuda_target, detect
from shapetune.ops.linear import linear_workload
from shapetune.ops.geglu import geglu_workload

EPILOGUES = [("bias", "gelu"), ("bias", "residual"), ("gelu",), ("residual",), ("bias", "gelu", "residual")]
ODD = [(1, 7, 13), (37, 24, 40)]  # m=1 and primes: ragged tiles everywhere


def _reference_torch(epi, x, w, *extra):
    """The fused op as a model writes it, in float64."""
    extra = list(extra)
    y = x.double() @ w.double().T
    for step in epi:
        y = F.gelu(y) if step == "gelu" else y + extra.pop(0).double()
    return y


def _build_and_check(w, cand, seed=0):
    import tvm

    cpu = detect("llvm")
    mod = templates.get(cand.template).apply(w, cpu, cand)
    with cpu.tvm_target():
        lib = tvm.compile(mod, target=cpu.tvm_target())
    od = opdef(w.op)
    gen = torch.Generator().manual_seed(seed)
    members = verification_members(w, random.Random(seed)) if w.dynamic else [w]
    for mw in members:
        ins = od.inputs(mw, torch.device("cpu"), gen)
        out = od.output(mw, torch.device("cpu")).fill_(float("nan"))
        lib["main"](*ins, out)
        chk = check_output(out, od.reference(mw, ins), w.dtype)
        assert chk.ok, f"{cand} on {mw.name}: {chk.reason}"


# -- compute definitions --------------------------------------------------------------------------
def test_existing_linear_keys_unchanged():
    assert linear_workload(8, 16, 32, "float32", True) == linear_workload(8, 16, 32, "float32", epilogue=("bias",))
    assert linear_workload(8, 16, 32, "float32", True).epilogue == ("bias",)
    assert linear_workload(8, 16, 32, "float32", False).epilogue == ()
    assert linear_workload(8, 16, 32, epilogue=("bias", "gelu")).key != linear_workload(8, 16, 32).key


@pytest.mark.parametrize("epi", EPILOGUES, ids="+".join)
def test_linear_reference_and_vendor_follow_the_epilogue(epi):
    w = linear_workload(5, 6, 7, "float32", epilogue=epi)
    od = opdef("linear")
    ins = od.inputs(w, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert len(ins) == 2 + sum(s in ("bias", "residual") for s in epi)
    ref = od.reference(w, ins)
    torch.testing.assert_close(ref, _reference_torch(epi, *ins))
    torch.testing.assert_close(od.vendor(w)(*ins).double(), ref, atol=1e-5, rtol=1e-5)


def test_bad_epilogue_is_refused():
    with pytest.raises(ValueError, match="epilogue"):
        opdef("linear").prim_func(linear_workload(4, 4, 4, "float32", epilogue=("bias", "relu")))


def test_geglu_reference_is_diffusers_geglu():
    from diffusers.models.activations import GEGLU

    mod = GEGLU(12, 8).double()
    w = geglu_workload(5, 8, 12, "float32")
    x = torch.randn(5, 12, dtype=torch.float64)
    ins = [x, mod.proj.weight.detach().view(2, 8, 12), mod.proj.bias.detach().view(2, 8)]
    with torch.no_grad():
        torch.testing.assert_close(opdef("geglu").reference(w, ins), mod(x))
        torch.testing.assert_close(opdef("geglu").vendor(w)(*ins), mod(x))
    assert w.flops == 2 * 5 * 16 * 12


# -- llvm templates ---------------------------------------------------------------------------------
@pytest.mark.parametrize("epi", EPILOGUES, ids="+".join)
@pytest.mark.parametrize("m,n,k", ODD, ids=[f"m{m}n{n}k{k}" for m, n, k in ODD])
def test_gemm_llvm_inlines_every_epilogue(m, n, k, epi):
    w = linear_workload(m, n, k, "float32", epilogue=epi)
    space = [c for c in templates.get("gemm_llvm").space(w, detect("llvm")) if not c.knob["unroll_k"]]
    for i, c in enumerate(random.Random(m + n).sample(space, min(2, len(space)))):
        _build_and_check(w, c, seed=i)
        mod = templates.get("gemm_llvm").apply(w, detect("llvm"), c)
        names = {b for b in ("bias_add", "gelu", "residual_add", "y") if f'sblock("{b}")' in mod.script()}
        assert len(names) == 1, f"epilogue not collapsed into one block: {names}"


@pytest.mark.parametrize("m,f,k,m_range", [(1, 7, 13, None), (37, 24, 40, None), (64, 32, 64, None),
                                           (40, 24, 40, (33, 64))])
@pytest.mark.parametrize("name", ["geglu_llvm", "dlight"])
def test_geglu_llvm_templates_correct(name, m, f, k, m_range):
    w = geglu_workload(m, f, k, "float32", m_range=m_range)
    if m_range:
        w = DEFAULT.bucket_of(w)
    t = templates.get(name)
    assert t.applies(w, detect("llvm"))
    space = [c for c in t.space(w, detect("llvm")) if not c.knob.get("unroll_k")]
    for i, c in enumerate(random.Random(m * f).sample(space, min(3, len(space)))):
        _build_and_check(w, c, seed=i)


def test_geglu_bucket():
    b = DEFAULT.bucket_of(geglu_workload(300, 1280, 320))
    assert b.ranges == {"m": (257, 512)} and b.dim["f"] == 1280


# -- custom ops -------------------------------------------------------------------------------------
OP_SHAPES = [(37, 24, 40), (16, 8, 16)]


@pytest.fixture(scope="module")
def tuned_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("db") / "tuning.db"
    ws = [linear_workload(m, n, k, "float32", epilogue=e) for m, n, k in OP_SHAPES
          for e in (("bias", "gelu"), ("bias", "residual"))]
    ws += [geglu_workload(m, n, k, "float32") for m, n, k in OP_SHAPES]
    tune(ws, detect("llvm"), path, TuneOptions(trials=3, batch=3, templates=("gemm_llvm", "geglu_llvm")))
    return path


@pytest.mark.parametrize("m,n,k", OP_SHAPES)
def test_fused_ops_use_tuned_kernels_and_match_torch(registry, m, n, k):
    g = torch.Generator().manual_seed(m + n + k)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    r = torch.randn(m, n, generator=g)
    tol = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kernels.linear_gelu(x, w, b), F.gelu(F.linear(x, w, b)), **tol)
    torch.testing.assert_close(kernels.linear_residual(x, w, b, r), F.linear(x, w, b) + r, **tol)
    w2, b2 = torch.randn(2 * n, k, generator=g), torch.randn(2 * n, generator=g)
    h, gate = F.linear(x, w2, b2).chunk(2, dim=-1)
    torch.testing.assert_close(kernels.geglu(x, w2, b2), h * F.gelu(gate), **tol)
    for op in ("linear_gelu", "linear_residual", "geglu"):
        assert registry.calls[(op, "tuned")] == 1, (op, dict(registry.calls))


def test_leading_dims_and_untuned_fallback(registry):
    x = torch.randn(1, 37, 40)
    w2, b2 = torch.randn(48, 40), torch.randn(48)
    h, gate = F.linear(x, w2, b2).chunk(2, dim=-1)
    torch.testing.assert_close(kernels.geglu(x, w2, b2), h * F.gelu(gate), atol=1e-4, rtol=1e-4)
    assert registry.calls[("geglu", "tuned")] == 1
    # untuned shapes (and a bias-less linear_gelu, another workload) fall back, counted
    x, w, b = torch.randn(3, 5), torch.randn(6, 5), torch.randn(6)
    torch.testing.assert_close(kernels.geglu(x, w, b), F.linear(x, w, b)[:, :3] * F.gelu(F.linear(x, w, b)[:, 3:]))
    torch.testing.assert_close(kernels.linear_gelu(torch.randn(37, 40), torch.randn(24, 40)).shape, (37, 24))
    assert registry.calls[("geglu", "not_tuned")] == 1
    assert registry.calls[("linear_gelu", "not_tuned")] == 1
    assert kernels.fallback_summary()["geglu"] == {"tuned": 1, "not_tuned": 1}


def test_bad_inputs(registry):
    x, w, b = torch.randn(4, 6), torch.randn(5, 6), torch.randn(5)
    with pytest.raises(ValueError, match="even"):
        kernels.geglu(x, w, b)
    with pytest.raises(ValueError, match="residual must be"):
        kernels.linear_residual(x, w, b, torch.randn(5))
    with pytest.raises(ValueError, match="in_features"):
        kernels.linear_gelu(x, torch.randn(5, 7), None)
    x64 = x.double()
    torch.testing.assert_close(kernels.linear_gelu(x64, w.double(), b.double()),
                               F.gelu(F.linear(x64, w.double(), b.double())))
    assert registry.calls[("linear_gelu", "unsupported_dtype")] == 1


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("op", ["linear_gelu", "linear_residual", "geglu"])
def test_opcheck(registry, op, grad):
    x, w, b = torch.randn(2, 37, 40), torch.randn(24, 40), torch.randn(24)
    args = {"linear_gelu": (x, w, b), "linear_residual": (x, w, None, torch.randn(2, 37, 24)),
            "geglu": (x, torch.randn(48, 40), torch.randn(48))}[op]
    args = tuple(a.requires_grad_(grad) if a is not None else None for a in args)
    opcheck(getattr(torch.ops.shapetune, op).default, args)


def test_backward_matches_torch(registry):
    """The fused ops differentiate like torch's unfused ops (backward recomputes those)."""
    x, w, b = torch.randn(2, 37, 40), torch.randn(48, 40), torch.randn(48)
    for fused, ref in ((kernels.geglu, lambda x, w, b: (lambda h, g: h * F.gelu(g))(*F.linear(x, w, b).chunk(2, -1))),
                       (kernels.linear_gelu, lambda x, w, b: F.gelu(F.linear(x, w, b)))):
        a = [t.clone().requires_grad_(True) for t in (x, w, b)]
        r = [t.clone().requires_grad_(True) for t in (x, w, b)]
        g = torch.randn(fused(*a).shape)
        fused(*a).backward(g)
        ref(*r).backward(g)
        for p, q in zip(a, r):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 9, 16)
        assert torch.ops.shapetune.geglu(x, torch.empty(64, 16), torch.empty(64)).shape == (2, 9, 32)
        assert torch.ops.shapetune.linear_gelu(x, torch.empty(8, 16), None).shape == (2, 9, 8)
        assert torch.ops.shapetune.linear_residual(x, torch.empty(8, 16), torch.empty(8),
                                                   torch.empty(2, 9, 8)).shape == (2, 9, 8)


# -- extraction -------------------------------------------------------------------------------------
def test_geglu_extraction_from_diffusers_feedforward():
    from diffusers.models.attention import FeedForward

    from scheduler.extract import HANDLERS, extract_workloads

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ff = FeedForward(32, activation_fn="geglu")

        def forward(self, x):
            return self.ff(x)

    ops = extract_workloads(Net(), {"x": torch.zeros(2, 9, 32)}, dtype="float16")
    geglu = [o.workload for o in ops if o.workload.op == "geglu"]
    assert geglu == [geglu_workload(18, 128, 32, "float16")]  # FeedForward: inner dim 4C, proj Linear(C, 8C)
    assert any(o.workload.op == "linear" for o in ops)  # proj and out linears still extracted
    assert any(getattr(c, "__name__", "") == "GEGLU" for c in HANDLERS)


def test_sd15_geglu_workloads():
    from scheduler.extract import sd15_geglu_workloads

    got = {(o.workload.dim["m"], o.workload.dim["f"], o.workload.dim["k"]): o.calls for o in sd15_geglu_workloads()}
    assert got == {(8192, 1280, 320): 5, (2048, 2560, 640): 5, (512, 5120, 1280): 5, (128, 5120, 1280): 1}


# -- CUDA (codegen only, no GPU needed) -------------------------------------------------------------
def test_cuda_templates_build_fused_epilogues_and_sd_geglu():
    """Sampled candidates compile to one CUDA kernel with WMMA (the epilogue is fused, not a second
    kernel)."""
    import tvm

    tgt = cuda_target()

    def cuda_source(w, c):
        mod = templates.get(c.template).apply(w, tgt, c)
        with tgt.tvm_target():
            lib = tvm.compile(mod, target=tgt.tvm_target())
        return [m for m in lib.mod.imports if m.kind == "cuda"][0].inspect_source()

    def n_kernels(src):  # kernel definitions (the source also declares each one first)
        return len(re.findall(r"__global__[^;{]*\{", src))

    for epi in (("bias", "gelu"), ("bias", "residual")):
        w = linear_workload(4096, 320, 320, epilogue=epi)
        for c in random.Random(0).sample(templates.get("gemm_cuda_wmma").space(w, tgt), 2):
            src = cuda_source(w, c)
            assert n_kernels(src) == 1 and "wmma" in src, (epi, c)
            assert ("erff" in src) == ("gelu" in epi)
    t = templates.get("geglu_cuda_wmma")
    assert not t.applies(DEFAULT.bucket_of(geglu_workload(300, 1280, 320)), tgt)  # exact shapes only
    assert not t.space(geglu_workload(77, 40, 24), tgt)  # ragged shapes: no candidate (see valid())
    for w in (geglu_workload(8192, 1280, 320), geglu_workload(128, 64, 96)):
        assert t.applies(w, tgt)
        for c in random.Random(1).sample(t.space(w, tgt), 3):
            src = cuda_source(w, c)
            assert n_kernels(src) == 1 and "wmma" in src and "erff" in src, c


def test_geglu_without_bias_on_a_tuned_shape_runs_torch_counted(registry):
    """The tuned geglu kernel's epilogue adds a bias: a bias-less call on a tuned shape raised
    AttributeError ('NoneType' has no 'contiguous'); it runs torch's unfused ops, counted no_bias."""
    m, n, k = OP_SHAPES[0]
    g = torch.Generator().manual_seed(3)
    x, w2 = torch.randn(m, k, generator=g), torch.randn(2 * n, k, generator=g)
    h, gate = F.linear(x, w2).chunk(2, dim=-1)
    torch.testing.assert_close(kernels.geglu(x, w2, None), h * F.gelu(gate))
    torch.testing.assert_close(kernels.geglu(x, w2), h * F.gelu(gate))
    assert registry.calls[("geglu", "no_bias")] == 2


@pytest.mark.parametrize("op", ["linear", "linear_gelu", "linear_residual", "geglu"])
def test_zero_output_features_return_torchs_empty_result(registry, op):
    """A zero-row weight: torch returns an empty [..., 0] tensor; the op raised ValueError from the
    workload constructor ('dim n=0 must be positive'). Now counted as empty."""
    x = torch.randn(4, 8)
    w, b = torch.randn(0, 8), torch.randn(0)
    args = {"linear": (x, w, b), "linear_gelu": (x, w, b), "linear_residual": (x, w, b, torch.randn(4, 0)),
            "geglu": (x, w, b)}[op]
    y = getattr(kernels, op)(*args)
    assert y.shape == (4, 0)
    assert registry.calls[(op, "empty")] == 1
