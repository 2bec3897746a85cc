"""The ops' per-call plans (kernels.dispatch.plan, issue 10 item 3): after a call-metadata key's first
call, an op makes no registry lookup and runs its checks no more, yet nothing it serves is stale.

A plan is keyed on what the op's checks and signature read (shapes, dtypes, devices, scalar args) and
lives in the registry, so each way a call's outcome can change is seen: a weight written in place
(through `.data`, no version bump) or replaced (`param.data = t` of another shape or dtype, a new
Parameter), a new input shape, the registry cleared or swapped. One linear workload is tuned on llvm
(one candidate) and served whatever its speed (require_faster=False). Tolerance: float32, 1e-4 on
O(1) outputs (scheduler/verify.py's bound for a tuned GEMM of k=16).

The structural test counts, with sys.setprofile, the Python calls into kernels/ per call of each
patched module kind after warm-up (the bounds are this change's counts; before it every op call also
ran its checks, `tuned`, `Registry.lookup`, `Registry.count` and the public wrapper: 11-14 per op
call, now 3.5-7).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

import kernels
from kernels.registry import Registry, Resolution
from scheduler.tuner import TuneOptions, tune
from shapetune.db import TuningDB
from shapetune.ops.linear import linear_workload
from shapetune.target import detect

diffusers = pytest.importorskip("diffusers")

M, N, K = 6, 8, 16  # the tuned linear: x [M, K] -> [M, N], with bias
TOL = dict(atol=1e-4, rtol=1e-4)
KERNELS = str(Path(kernels.__file__).parent)
LOADER = str(Path(kernels.__file__).parents[1] / "scheduler" / "loader.py")


@pytest.fixture(scope="module")
def tuned_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("plans") / "tuning.db"
    reps = tune([linear_workload(M, N, K, "float32", True)], detect("llvm"), path,
                TuneOptions(trials=1, batch=1, templates=("gemm_llvm",)))
    assert reps[0].best is not None, reps[0].by_status
    return path


@pytest.fixture(autouse=True)
def _shared_kernel_cache(module_kernel_cache):
    """The module's kernels, built once (tests/conftest.py)."""


class _Lookups:
    """Registry.lookup wrapped on one registry: the signatures looked up."""

    def __init__(self, reg: Registry):
        self.sigs, inner = [], reg.lookup

        def lookup(sig, make_workload):
            self.sigs.append(sig)
            return inner(sig, make_workload)

        reg.lookup = lookup


def _linear(seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(K, N).eval()
    kernels.patch(lin)
    return lin


def _x(m=M, seed=1):
    return torch.randn(m, K, generator=torch.Generator().manual_seed(seed))


def _run(mod, *args):
    with torch.no_grad():
        return mod(*args)


def _delta(shape, seed=2):
    return 0.5 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# -- nothing stale --------------------------------------------------------------------------------------
def test_a_planned_call_follows_in_place_weight_writes(registry):
    lin, x = _linear(), _x()
    before = _run(lin, x)
    lookups = _Lookups(registry)
    registry.calls.clear()
    lin.weight.data.add_(_delta(lin.weight.shape))  # .data: the version counter does not move
    after = _run(lin, x)
    torch.testing.assert_close(after, torch.nn.functional.linear(x, lin.weight, lin.bias), **TOL)
    assert (after - before).abs().max() > 1e-2
    with torch.no_grad():
        lin.bias.copy_(_delta(lin.bias.shape, seed=3))
    torch.testing.assert_close(_run(lin, x), torch.nn.functional.linear(x, lin.weight, lin.bias), **TOL)
    assert registry.calls == Counter({("linear", "tuned"): 2}) and lookups.sigs == []  # planned: no lookup


def test_a_replaced_parameter_is_checked_and_resolved_again(registry):
    lin, x = _linear(), _x()
    _run(lin, x)
    lin.weight = nn.Parameter(lin.weight.detach() + _delta(lin.weight.shape))  # a new Parameter, same shape
    torch.testing.assert_close(_run(lin, x), torch.nn.functional.linear(x, lin.weight, lin.bias), **TOL)
    lookups = _Lookups(registry)
    registry.calls.clear()
    lin.weight.data, lin.bias.data = _delta((2 * N, K)), _delta((2 * N,))  # another shape: another workload
    y = _run(lin, x)
    assert y.shape == (M, 2 * N)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, lin.weight, lin.bias), **TOL)
    assert lookups.sigs == [("linear", M, 2 * N, K, torch.float32, True, "cpu")]
    assert registry.calls == Counter({("linear", "not_tuned"): 1})
    lin.weight.data = lin.weight.data.double()  # the op's own one-line error, not torch's or TVM's
    with pytest.raises(ValueError, match="dtypes differ"):
        _run(lin, x)


def test_a_bias_free_weight_of_another_shape_is_resolved_again(registry):
    """Without a bias only the weight's shape tells the output width."""
    lin = nn.Linear(K, N, bias=False).eval()
    kernels.patch(lin)
    x = _x()
    _run(lin, x)
    lookups = _Lookups(registry)
    lin.weight.data = _delta((2 * N, K))
    torch.testing.assert_close(_run(lin, x), x @ lin.weight.T, **TOL)
    assert lookups.sigs == [("linear", M, 2 * N, K, torch.float32, False, "cpu")]


def test_a_new_input_shape_is_resolved_again(registry):
    lin = _linear()
    _run(lin, _x())
    lookups = _Lookups(registry)
    registry.calls.clear()
    x5 = _x(M - 1)
    torch.testing.assert_close(_run(lin, x5), torch.nn.functional.linear(x5, lin.weight, lin.bias), **TOL)
    torch.testing.assert_close(_run(lin, _x()), torch.nn.functional.linear(_x(), lin.weight, lin.bias), **TOL)
    assert lookups.sigs == [("linear", M - 1, N, K, torch.float32, True, "cpu")]
    assert registry.calls == Counter({("linear", "not_tuned"): 1, ("linear", "tuned"): 1})


def test_a_cleared_or_swapped_registry_starts_without_plans(tuned_db, tmp_path):
    """A registry over a DB tuned after its first call keeps its outcome until clear() (as its
    resolutions do); a registry swapped in resolves for itself."""
    cpu, lin, x = detect("llvm"), _linear(), _x()
    path = tmp_path / "later.db"
    TuningDB(path).close()
    later = Registry(db_path=path, target=cpu, require_faster=False)
    prev = kernels.set_registry(later)
    try:
        _run(lin, x)
        with TuningDB(path) as db:
            db.merge_from(tuned_db)
        _run(lin, x)
        assert later.calls == Counter({("linear", "not_tuned"): 2})
        later.clear()
        y = _run(lin, x)
        assert later.calls == Counter({("linear", "tuned"): 1})
        empty = Registry(db_path=tmp_path / "none.db", target=cpu)
        kernels.set_registry(empty)
        torch.testing.assert_close(_run(lin, x), y, **TOL)
        assert empty.calls == Counter({("linear", "no_db"): 1}) and later.calls[("linear", "tuned")] == 1
    finally:
        kernels.set_registry(prev)


def _tensors_in(v, seen=None) -> list:
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, Resolution):
        v = tuple(getattr(v, f) for f in v.__dataclass_fields__)
    if isinstance(v, (tuple, list)):
        return [t for e in v for t in _tensors_in(e)]
    return []


def test_plans_hold_no_tensor(registry):
    """Weights are read per call: no plan (of the tuned linear, nor of the tiny UNet's ops, all
    falling back here) keeps a tensor."""
    from scripts.bench_host import _cases

    _run(_linear(), _x())
    unet, args, kw = _cases(torch.float32)["UNet (tiny)"]
    kernels.patch(unet.eval())
    with torch.no_grad():
        unet(*args, **kw)
    assert len(registry.plans) > 10
    assert {p[0][0] for p in registry.plans.values()} >= {"linear", "conv2d", "group_norm", "layer_norm",
                                                          "attention", "geglu", "linear_residual"}
    assert [k for k, p in registry.plans.items() if _tensors_in(p) or _tensors_in(k)] == []


# -- structure: no lookup, few Python calls per op call after warm-up -------------------------------------
#: module kind -> (op calls per module call, Python calls into kernels/ per module call at most), all
#: on torch's fallback; before plans: 11, 26, 12, 11, 22, 62, 97, 210 calls. Attention's q/k/v are one
#: linear call (kernels/qkv.py): 3 op calls (5 with the projections apart), a block's 13 (16 apart); a
#: resnet asks kernels/temb.py for its packed time-embedding projection first (one call more); a block
#: asks for an add_layer_norm kernel per residual add that a LayerNorm reads (2 op calls: the fallback
#: counted; 6 Python calls more; 2 more since the ask is kernels.dispatch.served, shared with the resnet's);
#: a conv builds its plan key in a function of its own, which a resnet also asks for its conv1's plan
#: by (1 call more), and a resnet asks whether norm2 serves conv1's bias and time embedding in its
#: kernel (group_norm+shift: 1 op call, the fallback counted; 7 Python calls more); a block checks that
#: the modules whose call a fused path skips have no hooks (kernels.packing.hooked: the attentions and the
#: FeedForward, 3 calls more); and on every call, not only at patch (hooks registered after patch): each
#: projection a fused GEMM reads, each dropout a fused path skips, a GroupNorm and the SiLU fused into it,
#: the convs a resnet's fused paths read (a block 14 calls more, a resnet 12, GEGLU 2, a GroupNorm 1)
CALLS = {"Linear": (1, 5), "Conv2d": (2, 8), "GroupNorm": (1, 8), "LayerNorm": (1, 6), "GEGLU": (2, 12),
         "Attention": (3, 29), "ResnetBlock2D": (8, 60), "BasicTransformerBlock": (15, 130)}


@pytest.mark.parametrize("kind", sorted(CALLS))
def test_a_warm_op_call_makes_no_lookup_and_few_python_calls(kind, tmp_path):
    from scripts.bench_host import _cases

    reg = Registry(db_path=tmp_path / "none.db", target=detect("llvm"))
    prev = kernels.set_registry(reg)
    try:
        mod, args, kw = _cases(torch.float32)[kind]
        kernels.patch(mod.eval())
        eager = mod.__class__  # the reference: torch's / diffusers' own forward on the same module
        with torch.no_grad():
            mod(*args, **kw)
            lookups = _Lookups(reg)
            reg.calls.clear()
            ours = Counter()

            def hook(frame, event, arg):
                if event == "call" and frame.f_code.co_filename.startswith(KERNELS):
                    ours[frame.f_code.co_name] += 1

            sys.setprofile(hook)
            try:
                y = mod(*args, **kw)
            finally:
                sys.setprofile(None)
            kernels.unpatch(mod)
            ref = eager.__call__(mod, *args, **kw)
    finally:
        kernels.set_registry(prev)
    ops, most = CALLS[kind]
    assert sum(reg.calls.values()) == ops and lookups.sigs == []
    assert sum(ours.values()) <= most, dict(ours)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_a_warm_tuned_call_makes_no_lookup_and_few_python_calls(registry):
    lin, x = _linear(), _x()
    _run(lin, x)
    lookups = _Lookups(registry)
    registry.calls.clear()
    ours = Counter()

    def hook(frame, event, arg):
        f = frame.f_code.co_filename
        if event == "call" and (f.startswith(KERNELS) or f == LOADER):
            ours[frame.f_code.co_name] += 1

    sys.setprofile(hook)
    try:
        y = _run(lin, x)
    finally:
        sys.setprofile(None)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, lin.weight, lin.bias), **TOL)
    assert registry.calls == Counter({("linear", "tuned"): 1}) and lookups.sigs == []
    # _linear_forward, call_op, direct_ok, _linear, plan, call_on_current_stream (before: 12, with the
    # public wrapper, the checks, tuned, Registry.target, .lookup and .count)
    assert sum(ours.values()) <= 6, dict(ours)


@pytest.mark.parametrize("factor, residual", [(1.0, False), (2.0, False), (2.0, True)])
def test_attention_skips_only_a_division_by_one(factor, residual, tmp_path):
    """The processor returns to_out's output itself where rescale_output_factor is 1 (eager divides
    by 1: a copy); any other factor still divides, with and without the residual connection."""
    import copy

    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(32, heads=2, dim_head=16, rescale_output_factor=factor, residual_connection=residual).eval()
    ref, x = copy.deepcopy(attn), torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
    prev = kernels.set_registry(Registry(db_path=tmp_path / "none.db", target=detect("llvm")))
    try:
        kernels.patch(attn)
        y = _run(attn, x)
    finally:
        kernels.set_registry(prev)
    torch.testing.assert_close(y, _run(ref, x), atol=1e-5, rtol=1e-5)
    assert y.data_ptr() != x.data_ptr()
