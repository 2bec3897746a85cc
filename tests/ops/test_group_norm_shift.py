"""group_norm's "shift" step: GroupNorm (+ SiLU) of xs = x + b0[c] + t[n, c] (a ResnetBlock2D's bias-free conv1
output, conv1's bias and the projected time embedding), xs summed in fp32 and never written. The op's
definition, float64 reference and vendor paths; every template's variant (llvm run against float64 at
exact and bucket sizes, odd ones included; CUDA built for sm_90); the serving op's tuned and unfused paths.

Tolerances: scheduler.verify's, float32 on the CPU (1e-4 elementwise): the statistics are fp32 sums in
another order than torch's (tests/ops/test_norm.py); the kernel adds b0 and t to x in fp32 where torch's
vendor path rounds after each add (exact in fp32 up to 2 roundings of O(1) values: ~1e-7).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import kernels
from scheduler import templates
from scheduler.tuner import TuneOptions, tune
from scheduler.verify import check_output
from shapetune.buckets import DEFAULT, concrete
from shapetune.ops import opdef
from shapetune.ops.norm import group_norm_workload
from shapetune.target import cuda_target, detect

# n, hw = 7 x 11 (odd), c, g (C/G = 6), silu; the bucket n [3, 4], hw [65, 128] serves n = 3 and hw 77 too
N, HW, C, G = 2, 77, 48, 8
EXACT = group_norm_workload(N, HW, C, G, "float32", silu=True, shift=True)
BUCKET = DEFAULT.bucket_of(group_norm_workload(3, HW, C, G, "float32", shift=True))


@pytest.fixture(scope="module")
def tuned_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("gn-shift") / "tuning.db"
    reps = tune([EXACT, BUCKET], detect("llvm"), path, TuneOptions(trials=2, batch=2, templates=("norm_llvm",)))
    assert all(r.best is not None for r in reps), [r.by_status for r in reps]
    return path


def _operands(n, hw, seed):
    """x [n, C, 7, hw / 7] channels_last (the conv's output), b0 [C], t [n, C], w, b [C]."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, C, 7, hw // 7, generator=g) + 0.5).contiguous(memory_format=torch.channels_last)
    return (x, 0.25 * torch.randn(C, generator=g), torch.randn(n, C, generator=g),
            1 + 0.25 * torch.randn(C, generator=g), 0.25 * torch.randn(C, generator=g))


def _ref(x, b0, t, w, b, silu):
    """float64: GroupNorm (+ SiLU) of x + b0 + t, as diffusers' conv1(h) + temb, then norm2."""
    y = F.group_norm((x.double() + b0.double()[:, None, None] + t.double()[:, :, None, None]), G, w.double(),
                     b.double(), 1e-5)
    return (F.silu(y) if silu else y).float()


# -- the workload and the definition ----------------------------------------------------------------
def test_shift_is_a_leading_step_and_plain_workloads_keep_their_keys():
    plain = group_norm_workload(2, 4096, 320, 32, silu=True)
    assert plain.to_json() == {  # a shipped record's workload (tuning_logs/sm90_h200_sd15_norms.jsonl.xz)
        "op": "group_norm", "dims": [["n", 2], ["hw", 4096], ["c", 320], ["g", 32]], "dtype": "float16",
        "acc_dtype": "float32", "layout": "x[n,hw,c] nhwc eps=1e-05", "epilogue": ["affine", "silu"]}
    shifted = group_norm_workload(2, 4096, 320, 32, silu=True, shift=True)
    assert shifted.epilogue == ("shift", "affine", "silu") and shifted.key != plain.key
    assert shifted.name == "group_norm_n2_hw4096_c320_g32_f16+shift+affine+silu"
    assert BUCKET.ranges == {"n": (3, 4), "hw": (65, 128)} and BUCKET.epilogue == ("shift", "affine")
    assert BUCKET.covers(group_norm_workload(3, HW, C, G, "float32", shift=True))
    assert not BUCKET.covers(group_norm_workload(3, HW, C, G, "float32"))


@pytest.mark.parametrize("w", [EXACT, concrete(BUCKET, n=3, hw=65), concrete(BUCKET, hw=HW)], ids=lambda w: w.name)
def test_definition_and_vendor_paths_match_float64_on_llvm(w):
    import tvm

    od = opdef("group_norm")
    fn = tvm.compile(tvm.IRModule({"main": od.prim_func(w)}), target="llvm")["main"]
    ins = od.inputs(w, "cpu", torch.Generator().manual_seed(w.dim["hw"]))
    assert [tuple(t.shape) for t in ins] == [(w.dim["n"], w.dim["hw"], C), (C,), (w.dim["n"], C), (C,), (C,)]
    assert all(bool((t != 0).all()) for t in ins) and ins[2].std() > 0.5  # t shifts each image's groups apart
    before = [t.clone() for t in ins]
    out = od.output(w, "cpu").fill_(float("nan"))
    fn(*ins, out)
    ref = od.reference(w, ins)
    x, b0, t, wt, b = ins
    torch.testing.assert_close(ref, _ref(x.permute(0, 2, 1)[..., None], b0, t, wt, b, "silu" in w.epilogue)
                               .squeeze(-1).permute(0, 2, 1).double(), atol=1e-6, rtol=1e-6)
    for got in (out, od.vendor(w)(*ins), od.vendor_variants["nchw"](w)(*ins)):
        chk = check_output(got, ref, w.dtype)
        assert chk.ok, chk.reason
    assert all(torch.equal(a, c) for a, c in zip(ins, before))
    # the shift matters: the same x normalized without it is far from the reference
    assert not check_output(od.reference(group_norm_workload(*w.dim.values(), "float32", silu="silu" in w.epilogue),
                                         [x, wt, b]), ref, w.dtype).ok


def test_the_tuners_verify_rejects_a_kernel_that_ignores_the_shift():
    """scheduler.verify (what every measured kernel passes before it enters the DB) on the shift workload:
    the definition's kernel passes; the plain GroupNorm's kernel, handed the same operands and ignoring
    b0 and t, fails against the float64 reference."""
    import random

    import tvm

    from scheduler.verify import verify

    od = opdef("group_norm")

    def kernel(w):
        return tvm.compile(tvm.IRModule({"main": od.prim_func(w)}), target="llvm")["main"]

    shifted, plain = kernel(BUCKET), kernel(DEFAULT.bucket_of(group_norm_workload(3, HW, C, G, "float32")))

    def run(fn, args):
        fn(*args)
        return args[-1]

    def check(call):
        return verify(od, BUCKET, list, call, lambda y: y, "cpu", torch.Generator().manual_seed(0), 2,
                      random.Random(0), False)

    assert check(lambda args: run(shifted, args)).ok
    bad = check(lambda args: run(plain, [args[0], *args[3:]]))
    assert not bad.ok and "at group_norm_n" in bad.reason, bad.reason


def _run_llvm(prim_func, w, members) -> None:
    import tvm

    od = opdef("group_norm")
    fn = tvm.compile(tvm.IRModule({"main": prim_func}), target="llvm")["main"]
    for m in members:
        ins = od.inputs(m, "cpu", torch.Generator().manual_seed(m.dim["n"] * m.dim["hw"]))
        out = od.output(m, "cpu").fill_(float("nan"))
        fn(*ins, out)
        chk = check_output(out, od.reference(m, ins), m.dtype)
        assert chk.ok, (m.name, chk.reason)


@pytest.mark.parametrize("variant", ["stacked", "predicated", "rows"])
def test_cuda_templates_own_definitions_match_float64_on_llvm(variant):
    """norm_cuda_split (stacked sums), _split_bucket (predicated partials) and _rows (row partials) build
    their own definitions: each with the shift, compiled unscheduled for the CPU at hw not a multiple of
    its split / chunk (bucket members included where it serves buckets)."""
    from scheduler.templates.norm_cuda_rows import row_stats_group_norm
    from scheduler.templates.norm_cuda_split import predicated_group_norm, stacked_group_norm

    bucket = group_norm_workload(4, 128, C, G, "float32", silu=True, n_range=(3, 4), hw_range=(65, 128), shift=True)
    members = [concrete(bucket, n=3, hw=HW), concrete(bucket, hw=65)]
    if variant == "stacked":
        _run_llvm(stacked_group_norm(EXACT), EXACT, [EXACT])
    elif variant == "predicated":
        _run_llvm(predicated_group_norm(bucket, 8), bucket, members)
    else:
        _run_llvm(row_stats_group_norm(bucket, 16), bucket, members)


@pytest.mark.parametrize("w", [EXACT, BUCKET], ids=lambda w: w.name)
def test_llvm_templates_match_float64_at_exact_and_bucket_sizes(w):
    import tvm

    tgt, od = detect("llvm"), opdef("group_norm")
    members = [concrete(w, n=3, hw=65), concrete(w, n=4, hw=HW), concrete(w, n=3, hw=128)] if w.dynamic else [w]
    ran = 0
    for name in ("norm_llvm", "dlight"):  # dlight with the prologue inlined first (else no bucket builds)
        t = templates.get(name)
        assert t.applies(w, tgt)
        space = t.space(w, tgt)
        for cand in space[:: max(1, len(space) // 2)]:
            with tgt.tvm_target():
                fn = tvm.compile(t.apply(w, tgt, cand), target=tgt.tvm_target())["main"]
            for m in members:
                ins = od.inputs(m, "cpu", torch.Generator().manual_seed(m.dim["hw"]))
                out = od.output(m, "cpu").fill_(float("nan"))
                fn(*ins, out)
                chk = check_output(out, od.reference(m, ins), m.dtype)
                assert chk.ok, (str(cand), m.name, chk.reason)
                ran += 1
    assert ran >= 2 * len(members)


# -- sm_90 builds of every CUDA template's variant ---------------------------------------------------
CUDA_CASES = [
    ("norm_cuda", group_norm_workload(2, 1024, 640, 32, silu=True, shift=True), 1),  # cache_x candidates too
    ("norm_cuda", DEFAULT.bucket_of(group_norm_workload(3, 4000, 320, 32, silu=True, shift=True)), 1),
    ("norm_cuda_split", group_norm_workload(2, 4096, 320, 32, silu=True, shift=True), 2),
    ("norm_cuda_split_bucket", DEFAULT.bucket_of(group_norm_workload(1, 1000, 640, 32, shift=True)), 2),
    ("norm_cuda_rows", group_norm_workload(2, 256, 1280, 32, silu=True, shift=True), 3),
    ("norm_cuda_rows", DEFAULT.bucket_of(group_norm_workload(2, 77, 320, 32, shift=True)), 3),
]


@pytest.mark.parametrize("name, w, kernels_", CUDA_CASES, ids=[f"{n}-{w.name}" for n, w, _ in CUDA_CASES])
def test_cuda_templates_build_the_shift_for_sm90(name, w, kernels_):
    """Sampled candidates lower and generate code, as many kernels as the template's plain variant, every
    kernel that reads x reads b0 and t too (the sums of x + b0 + t, and y of it), and x + b0 + t is never a
    buffer (not inlined, it would be computed on the host into one and the kernels would read that)."""
    import tvm

    tgt, t = cuda_target(), templates.get(name)
    space = t.space(w, tgt)
    assert space and t.applies(w, tgt)
    picks = space[:: max(1, len(space) // 3)]
    if name == "norm_cuda" and not w.dynamic:
        picks += [c for c in space if c.knob["cache_x"]][-1:]
    for cand in picks:
        with tgt.tvm_target():
            src = tvm.compile(t.apply(w, tgt, cand), target=tgt.tvm_target()).mod.imports[0].inspect_source()
        heads = re.findall(r"__global__ void[^;{]*\{", src)
        assert len(heads) == kernels_ and "xs_ptr" not in src, str(cand)
        reads_x = [h for h in heads if " x_ptr" in h]
        assert reads_x and all("b0_ptr" in h and " t_ptr" in h for h in reads_x), (str(cand), heads)
        # the group's pivot x + b0 + t at its first element, loaded into registers
        assert re.search(r"pivot_local_ptr\[\w+\] = \(\(\(\(float\)x_ptr\[.*\+ \(\(float\)b0_ptr\[.*\+ \(\(float\)t_ptr\[", src), str(cand)


# -- the serving op ------------------------------------------------------------------------------
@pytest.mark.parametrize("n, hw, silu", [(N, HW, True), (3, HW, False), (4, 126, False), (3, 70, False)])
def test_tuned_kernel_serves_exact_and_bucket_sizes(registry, n, hw, silu):
    x, b0, t, w, b = _operands(n, hw, n * hw)
    ins = [a.clone() for a in (x, b0, t, w, b)]
    y = kernels.group_norm(x, G, w, b, silu=silu, shift_bias=b0, shift=t)
    torch.testing.assert_close(y, _ref(x, b0, t, w, b, silu), atol=1e-4, rtol=1e-4)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert registry.calls[("group_norm+shift", "tuned")] == 1 and not registry.calls[("group_norm", "tuned")]
    assert all(torch.equal(a, c) for a, c in zip((x, b0, t, w, b), ins))


def test_without_a_kernel_torchs_path_runs_counted(registry):
    x, b0, t, w, b = _operands(2, 7 * 20, 5)  # hw 140: past the bucket, and no exact record
    y = kernels.group_norm(x, G, w, b, shift_bias=b0, shift=t)
    torch.testing.assert_close(y, _ref(x, b0, t, w, b, False), atol=1e-5, rtol=1e-5)
    assert registry.calls[("group_norm+shift", "not_tuned")] == 1
    # the shape served without the shift is another workload: its kernel is not this one
    x, b0, t, w, b = _operands(N, HW, 6)
    torch.testing.assert_close(kernels.group_norm(x, G, w, b, silu=True), _ref(x, 0 * b0, 0 * t, w, b, True),
                               atol=1e-5, rtol=1e-5)
    assert registry.calls[("group_norm", "not_tuned")] == 1


def test_bad_input_is_one_clear_error(registry):
    x, b0, t, w, b = _operands(N, HW, 7)
    with pytest.raises(ValueError, match="shift_bias and shift come together"):
        kernels.group_norm(x, G, w, b, shift=t)
    with pytest.raises(ValueError, match=r"shift must be \[2, 48\]"):
        kernels.group_norm(x, G, w, b, shift_bias=b0, shift=t[:1])
    with pytest.raises(ValueError, match="shift_bias must be"):
        kernels.group_norm(x, G, w, b, shift_bias=b0.double(), shift=t)


@pytest.mark.parametrize("grad", [False, True])
def test_opcheck(registry, grad):
    from torch.library import opcheck

    x, b0, t, w, b = _operands(N, HW, 8)
    args = [a.requires_grad_(grad) for a in (x, b0, t, w, b)]
    opcheck(torch.ops.shapetune.group_norm.default, (args[0], G, args[3], args[4], 1e-5, True, args[1], args[2]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("name, w", [c[:2] for c in CUDA_CASES], ids=[f"{n}-{w.name}" for n, w, _ in CUDA_CASES])
def test_cuda_templates_shift_verifies_on_the_gpu(name, w, tmp_path):
    """Each CUDA template's shift variant tuned on the GPU (fp16): the tuner's verification (fresh inputs,
    poisoned output, inputs unchanged, float64 reference on the device; a bucket at its bounds and an odd
    member) passes for its candidates, none a wrong result."""
    (rep,) = tune([w], detect("cuda"), tmp_path / "tuning.db", TuneOptions(trials=4, batch=4, templates=(name,)))
    assert rep.best is not None and not rep.by_status.get("wrong_result"), rep.by_status
