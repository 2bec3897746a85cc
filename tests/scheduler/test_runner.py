"""scheduler.runner: what verification rejects, the copy yardstick's size, rotation over L2, the
vendor variants, host-bound timing detection (llvm; the GPU parts are marked gpu)."""

from __future__ import annotations


import pytest

from shapetune.ops.norm import group_norm_workload, layer_norm_workload
from shapetune.target import detect
from shapetune.ops.linear import linear_workload


@pytest.fixture(scope="module")
def cpu():
    return detect("llvm")



# -- item 1: a kernel that writes into its inputs --------------------------------------------------
def test_kernel_writing_into_its_input_is_wrong_result(tmp_path, cpu, bad_templates):
    """clobbering_gemm zeroes x and writes y = b, which matches a reference computed from the
    clobbered x: it must be stored as wrong_result with the reason, and never served."""
    from kernels.registry import Registry
    from scheduler.tuner import TuneOptions, tune
    from shapetune.db import TuningDB

    w = linear_workload(64, 48, 40, "float32", bias=True)
    (rep,) = tune([w], cpu, tmp_path / "t.db", TuneOptions(trials=2, batch=2, templates=("clobbering_gemm",)))
    assert rep.by_status == {"wrong_result": 1}, rep.by_status
    assert rep.best is None
    with TuningDB(tmp_path / "t.db") as db:
        (r,) = db.results(w.key, cpu.key)
        assert r.candidate.template == "clobbering_gemm" and r.status == "wrong_result" and not r.verified
        assert r.error.startswith("input 0 (x) modified by the kernel: 2560 of 2560 elements changed"), r.error
        assert db.best(w.key, cpu.key) is None
    res = Registry(db_path=tmp_path / "t.db", target=cpu, require_faster=False).resolve(w)
    assert res.kind == "fallback" and res.record is None and res.cause == "all_failed", res


def test_inputs_are_compared_bit_for_bit():
    """One changed element, -0.0 written over +0.0, NaN over a number: each counts; NaN == NaN."""
    import torch

    from scheduler.verify import first_modified

    x = torch.randn(6, 7, generator=torch.Generator().manual_seed(0))
    x[0, 0], x[0, 1], x[0, 2] = 0.0, float("nan"), 1.0
    b = torch.randn(3, generator=torch.Generator().manual_seed(1)).half()
    before = [x.clone(), b.clone()]
    assert first_modified([x.clone(), b.clone()], before) is None
    for i, j, v in ((3, 4, float(x[3, 4]) + 0.5), (0, 0, -0.0), (0, 2, float("nan"))):
        y = x.clone()
        y[i, j] = v
        assert first_modified([y, b.clone()], before) == (0, 1), (i, j, v)
    b2 = b.clone()
    b2[2] = -b2[2]
    assert first_modified([x.clone(), b2], before) == (1, 1)
    assert first_modified([x.permute(1, 0), b], [x.clone().permute(1, 0), b.clone()]) is None  # any strides


# -- item 2: the copy yardstick's bytes ------------------------------------------------------------
@pytest.mark.parametrize("w, expected", [
    # layer_norm x[m, c] fp16, w[c], b[c] -> y[m, c]: (2 m c + 2 c) * 2 bytes
    (layer_norm_workload(77, 768), (2 * 77 * 768 + 2 * 768) * 2),
    # group_norm x[n, hw, c] fp32 (odd c), w, b -> y
    (group_norm_workload(2, 49, 96, 8, "float32"), (2 * 2 * 49 * 96 + 2 * 96) * 4),
    # linear x[m, k], w[n, k], b[n] -> y[m, n], fp16
    (linear_workload(5, 24, 40, bias=True), (5 * 40 + 24 * 40 + 24 + 5 * 24) * 2),
])
def test_min_traffic_and_aligned_copy_bytes(w, expected):
    """The copy moves the op's minimal bytes (each input read once, the output written once),
    rounded up only to whole COPY_ALIGN buffers: the old yardstick copied an odd-sized buffer."""
    from scheduler.runner import COPY_ALIGN, copy_bytes, min_traffic_bytes

    assert min_traffic_bytes(w) == expected
    cb = copy_bytes(w)
    assert cb % (2 * COPY_ALIGN) == 0 and expected <= cb < expected + 2 * COPY_ALIGN


def test_copy_yardstick_and_large_copy_run_on_cpu(cpu):
    from scheduler.runner import COPY, RunOptions, Runner, measure_one

    w = group_norm_workload(1, 37, 64, 8, "float32")
    r = measure_one(w.to_json(), cpu.to_json(), COPY, RunOptions.for_target(cpu), 0)
    assert r["status"] == "ok" and r["latency"]["median_us"] > 0 and r["latency"]["repeats"] == 10
    runner = Runner(cpu)
    try:
        big = runner.large_copy(1 << 20)
    finally:
        runner.close()
    assert big.status == "ok" and big.latency.median_us > 0 and big.latency.repeats == 10


@pytest.mark.parametrize("nbytes", [0, 100])
def test_copy_buffers_must_be_aligned(cpu, nbytes):
    import torch

    from scheduler.runner import RunOptions, _measure_copy

    with pytest.raises(ValueError, match="multiple of 256"):
        _measure_copy(nbytes, torch.device("cpu"), RunOptions.for_target(cpu), False)


# -- item 7: rotation exceeds 2x L2 for every workload ---------------------------------------------
L2_H200 = 60 << 20


@pytest.mark.parametrize("set_bytes", [2_048, 240_000, 600_000, 1_900_000, 59 << 20, 130 << 20, 1 << 30])
def test_rotation_touches_twice_l2_between_two_uses_of_a_set(set_bytes):
    """N sets: the N - 1 used between two uses of one set hold >= 2x L2, with no set to spare (the
    old cap of 64 sets rotated a 600 kB workload through 38 MB)."""
    from scheduler.runner import rotation_set_count

    n = rotation_set_count(set_bytes, 2 * L2_H200)
    assert (n - 1) * set_bytes >= 2 * L2_H200
    assert n == 2 or (n - 2) * set_bytes < 2 * L2_H200


def test_no_rotation_is_one_set_and_bad_sizes_raise():
    from scheduler.runner import rotation_set_count

    assert rotation_set_count(4096, 0) == 1
    with pytest.raises(ValueError, match="rotation"):
        rotation_set_count(0, L2_H200)


def test_every_sd_norm_workload_rotates_over_twice_l2():
    from scheduler.extract import sd15_norm_workloads
    from scheduler.runner import min_traffic_bytes, rotation_set_count

    for op in sd15_norm_workloads(fuse_silu=True):
        set_bytes = min_traffic_bytes(op.workload)  # inputs + output: what one timing set holds
        assert (rotation_set_count(set_bytes, 2 * L2_H200) - 1) * set_bytes >= 2 * L2_H200, op.workload.name


def test_rotation_continues_from_warmup_into_timed_calls():
    """Calls take sets 0, 1, ..., N-1, 0, ... across warm-up and timed calls: restarting at set 0
    after the warm-up would re-read sets the warm-up touched a few calls before (still in L2)."""
    from scheduler.runner import RunOptions, _time

    used = []
    samples = _time(used.append, [0, 1, 2, 3, 4], RunOptions(warmup=3, repeats=9, rotate_bytes=0), False)
    assert len(samples) == 9
    assert used == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]


@pytest.mark.gpu
def test_l2_size_is_read_from_the_device():
    import torch

    from scheduler.runner import DEFAULT_L2_BYTES, l2_bytes

    dev = torch.device("cuda", 0)
    reported = torch.cuda.get_device_properties(dev).L2_cache_size
    assert reported > 0 and l2_bytes(dev) == reported and DEFAULT_L2_BYTES >= reported


# -- item 3: vendor variants -------------------------------------------------------------------
def test_baseline_names():
    from shapetune.ops import opdef

    gn = opdef("group_norm")
    assert gn.baseline_name() == "torch.nn.functional.group_norm"
    assert gn.baseline_name("nchw") == "torch.nn.functional.group_norm[nchw]"
    assert list(gn.vendor_variants) == ["nchw"] and opdef("layer_norm").vendor_variants == {}
    with pytest.raises(ValueError, match="no vendor variant 'nhwc'"):
        gn.baseline_name("nhwc")


def test_vendor_artifact_names():
    from scheduler.runner import VENDOR, vendor_artifact, vendor_variant

    assert vendor_artifact() == VENDOR and vendor_variant(VENDOR) == ""
    assert vendor_artifact("nchw") == "vendor:nchw" and vendor_variant("vendor:nchw") == "nchw"
    assert vendor_variant("/tmp/kernels/linear_abc.so") is None


@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
def test_group_norm_nchw_variant_is_verified_and_timed(cpu, silu):
    """The NCHW-contiguous baseline runs on its own layout and is checked in the op's layout."""
    import torch

    from shapetune.ops import opdef
    from scheduler.runner import VENDOR, RunOptions, measure_one, vendor_artifact
    from scheduler.verify import check_output

    w = group_norm_workload(2, 25, 64, 8, "float32", silu=silu)
    od = opdef("group_norm")
    path = od.vendor_variants["nchw"](w)
    ins = od.inputs(w, torch.device("cpu"), torch.Generator().manual_seed(3))
    x_nchw = path.prepare(ins)[0]
    assert x_nchw.shape == (2, 64, 25, 1) and x_nchw.is_contiguous()
    assert check_output(path(*ins), od.reference(w, ins), "float32").ok
    for art in (VENDOR, vendor_artifact("nchw")):
        r = measure_one(w.to_json(), cpu.to_json(), art, RunOptions.for_target(cpu), 5)
        assert r["status"] == "ok" and r["latency"]["median_us"] > 0, (art, r)
        assert 0 < r["rel_err"] < 1e-5


def test_unknown_vendor_variant_is_an_error(cpu):
    from scheduler.runner import RunOptions, measure_one, vendor_artifact

    w = layer_norm_workload(8, 32, "float32")
    with pytest.raises(ValueError, match="no vendor variant 'nchw'; known: \\[\\]"):
        measure_one(w.to_json(), cpu.to_json(), vendor_artifact("nchw"), RunOptions.for_target(cpu), 0)


@pytest.mark.gpu
def test_gpu_group_norm_baselines_and_copy_bandwidth():
    """On the GPU: both group_norm baselines verify; NCHW-contiguous pays no transpose, so it is the
    faster one at hw4096 c960 (H200: ~140 vs ~163 us); the aligned yardstick copy of its 31 MB is
    read from DRAM (no faster than a 1 GiB copy) at a fair share of that bandwidth (H200,
    2026-12-02: 2204 vs 4251 GB/s: a 14 us copy pays launch ramp-up and tail that a 505 us one
    amortizes); a tiny workload (thousands of rotation sets) still measures."""
    import time

    from scheduler.runner import COPY, VENDOR, RunOptions, Runner, copy_bytes, measure_one, vendor_artifact

    gpu = detect()
    opts = RunOptions.for_target(gpu)
    w = group_norm_workload(2, 4096, 960, 32, "float16", silu=True)
    us = {}
    for art in (VENDOR, vendor_artifact("nchw"), COPY):
        r = measure_one(w.to_json(), gpu.to_json(), art, opts, 0)
        assert r["status"] == "ok", (art, r)
        us[art] = r["latency"]["median_us"]
    assert us[vendor_artifact("nchw")] < us[VENDOR], us
    runner = Runner(gpu)
    try:
        big = runner.large_copy()
    finally:
        runner.close()
    assert big.status == "ok", big.error
    copy_gbps, big_gbps = copy_bytes(w) / us[COPY] / 1e3, 2 * (1 << 30) / big.latency.median_us / 1e3
    print(f"group_norm copy yardstick {copy_gbps:.0f} GB/s, 1 GiB copy {big_gbps:.0f} GB/s, {us}")
    assert 0.35 * big_gbps < copy_gbps < 1.1 * big_gbps
    t0 = time.perf_counter()
    tiny = layer_norm_workload(1, 320)
    assert measure_one(tiny.to_json(), gpu.to_json(), VENDOR, opts, 0)["status"] == "ok"
    assert time.perf_counter() - t0 < 60


def test_host_bound_detection_uses_the_median_gap():
    """GPU timing is repeated with a longer busy period when the GPU waited for the host between
    most timed calls; a few stalls (the median ignores them) or back-to-back events are fine."""
    from scheduler.runner import HOST_BOUND_GAP_US, host_bound

    assert not host_bound([])
    assert not host_bound([0.5] * 49)
    assert not host_bound([0.5] * 40 + [80.0] * 9)  # a few host stalls: the median sample is clean
    assert host_bound([0.5] * 20 + [40.0] * 29)  # the queue ran dry for most calls
    assert host_bound([HOST_BOUND_GAP_US + 0.1] * 3) and not host_bound([HOST_BOUND_GAP_US] * 3)


def test_copy_yardstick_moves_the_ops_minimal_bytes(cpu):
    """The runner's COPY pseudo-artifact (bandwidth yardstick of memory-bound ops) times a copy."""
    from shapetune.ops.norm import layer_norm_workload
    from scheduler.runner import COPY, RunOptions, measure_one

    w = layer_norm_workload(256, 96, "float32")
    r = measure_one(w.to_json(), cpu.to_json(), COPY, RunOptions.for_target(cpu), 0)
    assert r["status"] == "ok" and r["latency"]["median_us"] > 0 and r["latency"]["repeats"] == 10


def test_min_traffic_bytes_is_the_ops_real_operands_bytes_for_every_family():
    """min_traffic_bytes builds the operands on the meta device (no values drawn): the same bytes as
    the op's own constructors give on the CPU, for one workload (and its bucket) of every family."""
    import torch

    from scheduler.runner import min_traffic_bytes
    from shapetune.buckets import DEFAULT
    from shapetune.ops import opdef
    from shapetune.ops.attention import attention_workload
    from shapetune.ops.conv import conv2d_workload
    from shapetune.ops.elementwise import bias_add_workload, gelu_gate_workload
    from shapetune.ops.geglu import geglu_workload

    ws = [linear_workload(77, 320, 768), group_norm_workload(2, 1024, 320, silu=True), layer_norm_workload(2048, 320),
          geglu_workload(2048, 1280, 320), conv2d_workload(2, 32, 32, 4, 320), attention_workload(2, 1024, 77, 8, 40),
          gelu_gate_workload(2048, 1280), bias_add_workload(2, 1024, 320, epilogue=("residual",))]
    for w in [*ws, *(DEFAULT.bucket_of(w) for w in ws)]:
        od, cpu = opdef(w.op), torch.device("cpu")
        real = od.inputs(w, cpu, torch.Generator().manual_seed(0)) + [od.output(w, cpu)]
        assert min_traffic_bytes(w) == sum(t.numel() * t.element_size() for t in real), w.name
