"""What the GPU tests of a block with a fused kernel share (test_add_norm_gpu.py, test_norm_shift_gpu.py):
the fused workloads' buckets extracted from the block and tuned on the GPU, then each patched call against
the same block in float64, within twice eager fp16's error plus 1e-4, eagerly and under CUDA graphs of a
sequence of inputs."""

from __future__ import annotations

import torch

from kernels.graphs import GraphedCall
from kernels.registry import Registry, set_registry


def extracted_buckets(block: torch.nn.Module, x: dict, fused) -> list:
    """The shape buckets (shapetune.buckets.DEFAULT) of the fp16 workloads scheduler.extract lists for
    `block` called on x (fusions folded in) for which `fused(workload)` holds, in order of first call."""
    from scheduler.extract import extract_fused_workloads
    from shapetune.buckets import DEFAULT

    ws = [op.workload for op in extract_fused_workloads(block, x, "float16") if fused(op.workload)]
    return list(dict.fromkeys(DEFAULT.bucket_of(w) for w in ws))


def tuned_registry(buckets: list, path, templates: tuple[str, ...]):
    """A module fixture's body (yield from it): `buckets` tuned on the GPU into the DB at `path` (3 trials of
    `templates`, a verified kernel each), then the process-wide registry over that DB, serving the tuned
    kernels even where the vendor path measured faster; the previous registry restored after."""
    from scheduler.tuner import TuneOptions, tune
    from shapetune.target import detect

    reps = tune(buckets, detect("cuda"), path, TuneOptions(trials=3, batch=3, templates=templates))
    assert all(r.best is not None for r in reps), [r.by_status for r in reps]
    reg = Registry(db_path=path, target=detect("cuda"), require_faster=False)
    prev = set_registry(reg)
    try:
        yield reg
    finally:
        set_registry(prev)


def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


def copies(base: torch.nn.Module):
    """(float64 copy, fp16 copy, fp16 copy patched by kernels.patch, `checker` of the first two) of `base`,
    each on the GPU."""
    import copy

    import kernels

    ref_block = copy.deepcopy(base).double().cuda()
    eager, opt = (copy.deepcopy(base).half().cuda() for _ in range(2))
    kernels.patch(opt)
    return ref_block, eager, opt, checker(ref_block, eager)


def checker(ref_block: torch.nn.Module, eager: torch.nn.Module):
    """check(out, x): `out`, the patched block's output on the inputs x (a dict of keyword arguments), is
    within twice `eager`'s relative L2 error (fp16) plus 1e-4 of `ref_block` (the block in float64)."""

    def check(out: torch.Tensor, x: dict) -> None:
        with torch.no_grad():
            ref = ref_block(**{k: v.double() for k, v in x.items()})
            bound = 2 * rel_l2(eager(**x), ref) + 1e-4
        assert rel_l2(out, ref) <= bound, (rel_l2(out, ref), bound)

    return check


def graphed_calls(opt: torch.nn.Module, xs: list[dict], check) -> GraphedCall:
    """`opt` under a GraphedCall (one CUDA graph per call signature), called on each of `xs` and each output
    checked; the GraphedCall, whose stats say what was captured and replayed."""
    graphed = GraphedCall(opt)
    with torch.no_grad():
        for x in xs:
            check(opt(**x), x)
    return graphed
