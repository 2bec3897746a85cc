"""Builder: candidate -> scheduled TIR -> compiled, exported module (.so), in parallel processes."""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from shapetune import config
from shapetune.records import Candidate
from shapetune.target import Target
from shapetune.workload import Workload

from .isolation import ClosedOnExit, IsolatedPool


@dataclass(frozen=True)
class BuildResult:
    candidate: Candidate
    path: str | None  # exported module; None when the build failed
    error: str = ""
    build_s: float = 0.0
    kind: str = ""  # "" ok | "build_error" | "timeout"


# The modules' calling convention: 2 since their global scratch buffers are arguments (scheduler/workspaces.py),
# so a module built before (TVM workspace inside) is never loaded as one of these.
ABI = 2


def artifact_name(workload: Workload, candidate: Candidate) -> str:
    return f"{workload.key}-{candidate.key}-abi{ABI}.so"


def build_one(workload_json: dict, target_json: dict, candidate_json: dict, out_dir: str) -> tuple[str, float]:
    """Worker entry point (also usable in-process): returns (path, seconds)."""
    from shapetune.target import Target as _T
    from shapetune.workload import Workload as _W

    from . import templates, workspaces
    from .cuda_compile import install_compile_callback

    t0 = time.perf_counter()
    w, tgt, c = _W.from_json(workload_json), _T.from_json(target_json), Candidate.from_json(candidate_json)
    import tvm

    tvm_target = tgt.tvm_target()
    if tgt.is_gpu:
        install_compile_callback()
    mod, spec = templates.get(c.template).apply(w, tgt, c), None
    if tgt.is_gpu:  # CUDA graphs replay them (the CPU keeps TVM's workspace: no graphs, no allocation per call)
        mod, spec = workspaces.lift(mod)
    with tvm_target:
        lib = tvm.compile(mod, target=tvm_target)
    path = Path(out_dir) / artifact_name(w, c)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.so")
    lib.export_library(str(tmp))
    workspaces.write_spec(path, spec)  # before the module appears: a reader of the module finds its spec
    os.replace(tmp, path)  # atomic: a reader never sees a half-written module
    return str(path), time.perf_counter() - t0


class Builder(ClosedOnExit):
    def __init__(self, target: Target, out_dir: str | Path, jobs: int | None = None, timeout_s: float = 120):
        self.target = target
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.timeout_s = timeout_s
        self.pool = IsolatedPool(jobs or config.build_jobs())

    def build(self, workload: Workload, candidates: list[Candidate]) -> list[BuildResult]:
        """Build `candidates` of `workload` in parallel; one BuildResult per candidate, in order."""
        return self.build_many([(workload, candidates)])[0]

    def build_many(self, jobs: list[tuple[Workload, list[Candidate]]]) -> list[list[BuildResult]]:
        """Build the candidates of several workloads in ONE pool batch (the pool stays busy across
        workloads: a warm-up of many tasks, scheduler.task_scheduler); per job its BuildResults, in
        order. A failing or hung build fails its own slot only (IsolatedPool.run_all)."""
        flat = [(w, c) for w, cands in jobs for c in cands]
        args = [(w.to_json(), self.target.to_json(), c.to_json(), str(self.out_dir)) for w, c in flat]
        built = []
        for (_, c), r in zip(flat, self.pool.run_all(build_one, args, self.timeout_s)):
            if isinstance(r, BaseException):
                kind = "timeout" if type(r).__name__ == "WorkerTimeout" else "build_error"
                built.append(BuildResult(c, None, _short_error(r), 0.0, kind))
            else:
                built.append(BuildResult(c, r[0], "", r[1]))
        out, i = [], 0
        for _, cands in jobs:
            out.append(built[i:i + len(cands)])
            i += len(cands)
        return out

    def close(self, abort: bool = False):
        self.pool.close(abort)


def _short_error(e: BaseException, limit: int = 2000) -> str:
    text = "".join(traceback.format_exception_only(type(e), e)).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # TVM errors put the useful line last; keep the head and the tail.
    if len(lines) > 12:
        lines = lines[:4] + ["..."] + lines[-6:]
    return "\n".join(lines)[-limit:]
