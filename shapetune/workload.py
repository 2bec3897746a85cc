"""Workloads: what a kernel computes, as a frozen, serializable value with a stable key."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

DTYPE_SHORT = {"float16": "f16", "bfloat16": "bf16", "float32": "f32", "float64": "f64"}


@dataclass(frozen=True)
class Workload:
    """One computation at concrete shapes.

    op        op family, e.g. "linear"
    dims      named sizes, e.g. (("m", 8192), ("n", 320), ("k", 320)); order is the op's own
    dtype     input/output element type ("float16", "float32")
    acc_dtype accumulation type
    layout    operand layout, op-specific (linear: "x[m,k] w[n,k] -> y[m,n]")
    epilogue  fused ops applied to the output in order, e.g. ("bias",)
    dynamic   dims left symbolic in the kernel, with the closed range it must serve, e.g.
              (("m", 513, 1024),): a shape-bucket workload; `dims` then holds the representative
              shape it is tuned and timed at. Empty for an exact-shape workload.
    """

    op: str
    dims: tuple[tuple[str, int], ...]
    dtype: str
    acc_dtype: str
    layout: str
    epilogue: tuple[str, ...] = field(default=())
    dynamic: tuple[tuple[str, int, int], ...] = field(default=())

    def __post_init__(self):
        object.__setattr__(self, "dims", tuple((str(n), int(v)) for n, v in self.dims))
        object.__setattr__(self, "epilogue", tuple(self.epilogue))
        object.__setattr__(self, "dynamic", tuple((str(n), int(lo), int(hi)) for n, lo, hi in self.dynamic))
        for name, v in self.dims:
            if v <= 0:
                raise ValueError(f"{self.op}: dim {name}={v} must be positive")
        dims = self.dim
        for name, lo, hi in self.dynamic:
            if name not in dims or not 1 <= lo <= dims[name] <= hi:
                raise ValueError(f"{self.op}: dynamic dim {name} needs 1 <= lo <= {name} <= hi, "
                                 f"got [{lo}, {hi}] with {name}={dims.get(name)}")

    # -- views -------------------------------------------------------------------------------
    @property
    def dim(self) -> dict[str, int]:
        return dict(self.dims)

    @property
    def ranges(self) -> dict[str, tuple[int, int]]:
        return {n: (lo, hi) for n, lo, hi in self.dynamic}

    def covers(self, other: Workload) -> bool:
        """Whether this (bucket) workload's kernel computes `other`'s shape."""
        if (self.op, self.dtype, self.acc_dtype, self.layout, self.epilogue) != (
                other.op, other.dtype, other.acc_dtype, other.layout, other.epilogue):
            return False
        rng = self.ranges
        for (n, v), (n2, v2) in zip(self.dims, other.dims):
            lo, hi = rng.get(n, (v, v))
            if n != n2 or not lo <= v2 <= hi:
                return False
        return True

    def to_json(self) -> dict:
        d = {
            "op": self.op,
            "dims": [[n, v] for n, v in self.dims],
            "dtype": self.dtype,
            "acc_dtype": self.acc_dtype,
            "layout": self.layout,
            "epilogue": list(self.epilogue),
        }
        if self.dynamic:  # absent for exact workloads, so their keys never change
            d["dynamic"] = [[n, lo, hi] for n, lo, hi in self.dynamic]
        return d

    @classmethod
    def from_json(cls, d: dict | str) -> Workload:
        if isinstance(d, str):
            d = json.loads(d)
        return cls(
            op=d["op"],
            dims=tuple((n, v) for n, v in d["dims"]),
            dtype=d["dtype"],
            acc_dtype=d["acc_dtype"],
            layout=d["layout"],
            epilogue=tuple(d.get("epilogue", ())),
            dynamic=tuple(tuple(x) for x in d.get("dynamic", ())),
        )

    @property
    def key(self) -> str:
        """Stable across processes and versions: a hash of the canonical JSON."""
        canon = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:20]

    @property
    def name(self) -> str:
        rng = self.ranges
        dims = "_".join(f"{n}{rng[n][0]}-{rng[n][1]}" if n in rng else f"{n}{v}" for n, v in self.dims)
        epi = "".join(f"+{e}" for e in self.epilogue)
        return f"{self.op}_{dims}_{DTYPE_SHORT.get(self.dtype, self.dtype)}{epi}"

    @property
    def flops(self) -> float:
        d = self.dim
        if self.op == "linear":
            return 2.0 * d["m"] * d["n"] * d["k"]
        if self.op == "geglu":  # one GEMM with 2f outputs per row
            return 2.0 * d["m"] * 2 * d["f"] * d["k"]
        raise NotImplementedError(self.op)


def _acc_dtype(dtype: str) -> str:
    return "float32" if dtype in ("float16", "bfloat16", "float32") else dtype


def linear_workload(m: int, n: int, k: int, dtype: str = "float16", bias: bool = True,
                    m_range: tuple[int, int] | None = None,
                    epilogue: tuple[str, ...] | None = None) -> Workload:
    """y[m, n] = x[m, k] @ w[n, k]^T (+ b[n]); fp16 accumulates in fp32. m_range makes m dynamic.

    epilogue, when given, replaces the one `bias` implies, e.g. ("bias", "gelu") or
    ("bias", "residual") (kernels.defs.LINEAR_EPILOGUE_STEPS).
    """
    return Workload(
        op="linear",
        dims=(("m", m), ("n", n), ("k", k)),
        dtype=dtype,
        acc_dtype=_acc_dtype(dtype),
        layout="x[m,k] w[n,k] -> y[m,n]",
        epilogue=tuple(epilogue) if epilogue is not None else (("bias",) if bias else ()),
        dynamic=(("m", *m_range),) if m_range else (),
    )


def geglu_workload(m: int, f: int, k: int, dtype: str = "float16",
                   m_range: tuple[int, int] | None = None) -> Workload:
    """diffusers' GEGLU: h, g = (x[m, k] @ W[2f, k]^T + b[2f]).chunk(2, -1); y[m, f] = h * gelu(g).

    The kernel takes W as its free view [2, f, k] and b as [2, f] (half 0: h, half 1: the gate)."""
    return Workload(
        op="geglu",
        dims=(("m", m), ("f", f), ("k", k)),
        dtype=dtype,
        acc_dtype=_acc_dtype(dtype),
        layout="x[m,k] w[2,f,k] b[2,f] -> y[m,f]",
        epilogue=("bias", "gelu_gate"),
        dynamic=(("m", *m_range),) if m_range else (),
    )
