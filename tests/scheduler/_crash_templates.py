"""Templates for the Builder's crash tests (tests/scheduler/test_builder_crash.py), registered only in
builder workers: the pool's `initializer` is `setup` (workers import this module by name), so the
test process's template registry never lists them.

- crash_gemm segfaults the worker, as a TVM build that crashes would.
- meet_gemm builds the plain linear kernel, but only once another meet_gemm build of the same batch
  is running at the same time (a rendezvous in `setup`'s folder): it fails when builds run serially.
"""

from __future__ import annotations

from scheduler.templates.base import Template, register

from . import _pool_helpers

MEET_DIR = ""
NOT_MET = "meet_gemm: built alone, no other meet_gemm build ran at the same time"


class CrashGemm(Template):
    name = "crash_gemm"
    ops = ()  # never offered for a workload: only built by name
    kinds = ("llvm",)

    def apply(self, workload, target, candidate):
        _pool_helpers.segfault()


class MeetGemm(Template):
    name = "meet_gemm"
    ops = ()
    kinds = ("llvm",)
    knob_choices = {"name": ("a", "b")}

    def apply(self, workload, target, candidate):
        import tvm

        from shapetune.ops.linear import linear_prim_func

        if not _pool_helpers.meet(MEET_DIR, candidate.knob["name"], len(self.knob_choices["name"])):
            raise RuntimeError(NOT_MET)
        return tvm.IRModule({"main": linear_prim_func(workload)})


def setup(meet_dir: str) -> None:
    """Pool initializer: register the templates in this worker; meet_gemm meets in `meet_dir`."""
    global MEET_DIR
    MEET_DIR = meet_dir
    register(CrashGemm())
    register(MeetGemm())
