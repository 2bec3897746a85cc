"""A kernel's global scratch buffers as arguments the caller allocates, not TVM workspace.

A scheduled PrimFunc keeps intermediates that live in global memory (a split reduction's partial sums,
an llvm schedule's statistics) as buffers of its root block; TVM lowers those to TVMBackendAllocWorkspace
calls in the host function, served by TVM's per-thread WorkspacePool. That pool frees a page and
allocates a larger one whenever a request outgrows it (src/runtime/workspace_pool.cc, "resize the
page"). A CUDA graph that captured a kernel reading the old page then replays on freed memory: with the
SD UNet captured at 512² and then run at 768² (larger partial sums), replaying the 512² graph would read
and write memory that is no longer the graph's (an illegal address, or another tensor's bytes).

So for GPU targets the builder lifts them (`lift`): each global root-block buffer becomes a trailing parameter, and its
shape, as an expression of the function's symbolic dims, goes into a JSON file next to the module
(`spec_path`). `bind` wraps the loaded function: it allocates those buffers with torch on the output's
device (inside a capture: from the graph's own pool, alive as long as the graph) and passes them after
the caller's arguments. The caller's convention (inputs, then the output) does not change. On the CPU
(no graphs) modules keep TVM's workspace: a torch allocation per call would cost more than a small
kernel runs.

Spec, JSON: {"version": 1, "dims": {name: [argument index, axis]}, "buffers": [{"name", "dtype",
"shape": [expr, ...]}]}; an expr is an int, ["var", name], or [op, a, b] with op one of add, sub, mul,
floordiv, floormod, min, max (all a scheduled norm's shapes need). Anything else is refused at build
time (the candidate fails to build), and a malformed file at load time (the kernel falls back, counted).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

VERSION = 1
SUFFIX = ".ws.json"
_OPS = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
        "floordiv": lambda a, b: a // b, "floormod": lambda a, b: a % b, "min": min, "max": max}


class WorkspaceError(ValueError):
    pass


def spec_path(artifact: str | Path) -> Path:
    """The workspace spec of a module at `artifact` (x.so -> x.ws.json)."""
    p = Path(artifact)
    return p.with_name(p.stem + SUFFIX)


def remove(artifact: str | Path) -> None:
    """Delete a module and its spec (either may be absent)."""
    Path(artifact).unlink(missing_ok=True)
    spec_path(artifact).unlink(missing_ok=True)


# -- build side --------------------------------------------------------------------------------------
def _expr(e) -> int | list:
    from tvm import tirx

    if isinstance(e, int):
        return e
    if isinstance(e, tirx.IntImm):
        return int(e.value)
    if isinstance(e, tirx.Var):
        return ["var", e.name]
    if isinstance(e, tirx.Cast):
        return _expr(e.value)
    for op, cls in (("add", tirx.Add), ("sub", tirx.Sub), ("mul", tirx.Mul), ("floordiv", tirx.FloorDiv),
                    ("floormod", tirx.FloorMod), ("min", tirx.Min), ("max", tirx.Max)):
        if isinstance(e, cls):
            return [op, _expr(e.a), _expr(e.b)]
    raise WorkspaceError(f"a workspace shape has an expression this loader cannot evaluate: {e} ({type(e).__name__})")


def lift(mod):
    """(mod with every global buffer of main's root block a trailing parameter, spec dict or None)."""
    import tvm
    from tvm import s_tir, tirx

    f = mod["main"]
    realize = f.body
    if not isinstance(realize, s_tir.stmt.SBlockRealize):
        return mod, None
    root = realize.block
    lifted = [b for b in root.alloc_buffers if b.scope() == "global"]
    if not lifted:
        return mod, None
    dims: dict[str, list[int]] = {}
    for i, p in enumerate(f.params):
        for axis, s in enumerate(getattr(p, "shape", None) or ()):
            if isinstance(s, tirx.Var) and s.name not in dims:
                dims[s.name] = [i, axis]
    buffers = [{"name": b.name, "dtype": str(b.dtype), "shape": [_expr(s) for s in b.shape]} for b in lifted]
    missing = {v for b in buffers for s in b["shape"] for v in _vars(s)} - set(dims)
    if missing:
        raise WorkspaceError(f"workspace shapes use {sorted(missing)}, which no argument's shape gives")
    keep = [b for b in root.alloc_buffers if b.scope() != "global"]
    block = s_tir.stmt.SBlock(root.iter_vars, root.reads, root.writes, root.name_hint, root.body, root.init, keep,
                              root.match_buffers, root.annotations)
    body = s_tir.stmt.SBlockRealize(realize.iter_values, realize.predicate, block)
    func = tirx.PrimFunc(list(f.params) + lifted, body, f.ret_type, f.attrs)
    return tvm.IRModule({"main": func}), {"version": VERSION, "dims": dims, "buffers": buffers}


def _vars(e) -> set[str]:
    """The dims an expression reads."""
    if isinstance(e, list):
        return {e[1]} if e[0] == "var" else _vars(e[1]) | _vars(e[2])
    return set()


def write_spec(artifact: str | Path, spec: dict | None) -> None:
    """Write (or, for a module without workspaces, remove) the spec next to `artifact`, atomically."""
    _put(spec_path(artifact), None if spec is None else json.dumps(spec, sort_keys=True).encode())


def copy_spec(src: str | Path, dst: str | Path) -> None:
    """Give the module at `dst` the spec of the module at `src` (none where it has none), atomically."""
    try:
        data = spec_path(src).read_bytes()
    except FileNotFoundError:
        data = None
    _put(spec_path(dst), data)


def _put(path: Path, data: bytes | None) -> None:
    """Write `data` to `path` through a temporary file and a rename (a reader never sees half of it), or
    remove the file where data is None."""
    if data is None:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -- load side ---------------------------------------------------------------------------------------
def _eval(e, env: dict[str, int]) -> int:
    if isinstance(e, bool) or not isinstance(e, (int, list)):
        raise WorkspaceError(f"malformed workspace expression {e!r}")
    if isinstance(e, int):
        return e
    if len(e) == 2 and e[0] == "var":
        return env[e[1]]
    if len(e) != 3 or e[0] not in _OPS:
        raise WorkspaceError(f"malformed workspace expression {e!r}")
    return int(_OPS[e[0]](_eval(e[1], env), _eval(e[2], env)))


def read_spec(artifact: str | Path) -> dict | None:
    """The spec next to `artifact`, checked; None where the module has none (no workspace)."""
    path = spec_path(artifact)
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise WorkspaceError(f"cannot read {path}: {e}") from None
    try:
        if spec["version"] != VERSION:
            raise WorkspaceError(f"{path}: spec version {spec['version']}, this loader reads {VERSION}")
        dims = {str(k): (int(v[0]), int(v[1])) for k, v in spec["dims"].items()}
        bufs = [(str(b["dtype"]), list(b["shape"])) for b in spec["buffers"]]
        env = {k: 1 for k in dims}
        for _, shape in bufs:  # every expression well-formed over the declared dims
            for s in shape:
                _eval(s, env)
    except WorkspaceError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise WorkspaceError(f"{path}: malformed workspace spec ({e})") from None
    return {"dims": dims, "buffers": bufs}


class WithWorkspaces:
    """fn(*args, *workspaces): the buffers `spec` describes, allocated with torch for each call on the
    device of the last argument (the output); their shapes are cached per value of the dims."""

    def __init__(self, fn, spec: dict):
        import torch

        self.fn = fn
        self.dims = list(spec["dims"].items())
        self.buffers = [(getattr(torch, dt), shape) for dt, shape in spec["buffers"]]
        self._shapes: dict[tuple, list[tuple[int, ...]]] = {}

    def __call__(self, *args):
        import torch

        key = tuple(args[i].shape[axis] for _, (i, axis) in self.dims)
        shapes = self._shapes.get(key)
        if shapes is None:
            env = {name: v for (name, _), v in zip(self.dims, key)}
            shapes = [tuple(_eval(s, env) for s in shape) for _, shape in self.buffers]
            self._shapes[key] = shapes
        dev = args[-1].device
        ws = [torch.empty(s, dtype=dt, device=dev) for (dt, _), s in zip(self.buffers, shapes)]
        return self.fn(*args, *ws)


def bind(fn, artifact: str | Path):
    """`fn` as its callers call it: wrapped with its workspaces where the module has a spec."""
    spec = read_spec(artifact)
    return fn if spec is None else WithWorkspaces(fn, spec)
