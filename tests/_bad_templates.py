"""Deliberately broken templates for tuner tests.

Builder workers are separate processes (forked from a fork server that was started, with its own
preload list, before any test ran), so a template registered only in the test process does not exist
there. Importing this module registers the templates; tests make every builder worker import it (as
`tests._bad_templates`) via the pool's `initializer` (see tests/scheduler/test_tuner.py), which runs in
each worker whatever its start method.
"""

from __future__ import annotations

from scheduler.templates.base import Template, register


def wrong_linear_prim_func(w):
    """linear with the same signature as shapetune.ops.linear.linear_prim_func, but the reduction skips the
    last k and the bias is dropped: plausible-looking, wrong output."""
    from tvm import te

    d = w.dim
    m, n, k = d["m"], d["n"], d["k"]
    x = te.placeholder((m, k), w.dtype, name="x")
    wt = te.placeholder((n, k), w.dtype, name="w")
    r = te.reduce_axis((0, k - 1), name="r")
    acc = te.compute(
        (m, n),
        lambda i, j: te.sum(x[i, r].astype(w.acc_dtype) * wt[j, r].astype(w.acc_dtype), axis=r),
        name="matmul",
    )
    args = [x, wt]
    if "bias" in w.epilogue:
        args.append(te.placeholder((n,), w.dtype, name="b"))  # accepted, ignored
    y = te.compute((m, n), lambda i, j: acc[i, j].astype(w.dtype), name="y")
    return te.create_prim_func(args + [y]).with_attr("global_symbol", "main")


class WrongGemm(Template):
    name = "wrong_gemm"
    ops = ("linear",)
    kinds = ("llvm",)
    knob_choices = {"variant": (0, 1)}

    def apply(self, workload, target, candidate):
        import tvm
        from tvm import s_tir

        sch = s_tir.Schedule(tvm.IRModule({"main": wrong_linear_prim_func(workload)}))
        if candidate.knob["variant"]:
            mm = sch.get_sblock("matmul")
            i, _, _ = sch.get_loops(mm)
            sch.parallel(i)
        return sch.mod


def clobbering_linear_prim_func(w):
    """linear + bias (x, w, b, y) that zeroes x and writes y = b: exactly what the reference computes
    from the clobbered x, so only a check that the inputs came back unchanged can reject it."""
    from tvm.script import tirx as T

    d, dt = w.dim, w.dtype
    m, n, k = d["m"], d["n"], d["k"]

    @T.prim_func
    def main(x: T.Buffer((m, k), dt), wt: T.Buffer((n, k), dt), b: T.Buffer((n,), dt), y: T.Buffer((m, n), dt)):
        T.func_attr({"global_symbol": "main"})
        for i, r in T.grid(m, k):
            x[i, r] = T.cast(0, dt)
        for i, j in T.grid(m, n):
            y[i, j] = b[j]

    return main


class ClobberingGemm(Template):
    name = "clobbering_gemm"
    ops = ("linear",)
    kinds = ("llvm",)
    knob_choices = {"variant": (0,)}

    def applies(self, workload, target):
        return super().applies(workload, target) and workload.epilogue == ("bias",)

    def apply(self, workload, target, candidate):
        import tvm

        return tvm.IRModule({"main": clobbering_linear_prim_func(workload)})


BUILD_FAILURE = "raising_gemm: deliberately unbuildable"


class RaisingGemm(Template):
    name = "raising_gemm"
    ops = ("linear",)
    kinds = ("llvm",)
    knob_choices = {"variant": (0,)}

    def apply(self, workload, target, candidate):
        raise RuntimeError(f"{BUILD_FAILURE} ({workload.name})")


TEMPLATES = (WrongGemm(), RaisingGemm(), ClobberingGemm())
NAMES = tuple(t.name for t in TEMPLATES)


def register_all():
    for t in TEMPLATES:
        register(t)


register_all()
