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
    """

    op: str
    dims: tuple[tuple[str, int], ...]
    dtype: str
    acc_dtype: str
    layout: str
    epilogue: tuple[str, ...] = field(default=())

    def __post_init__(self):
        object.__setattr__(self, "dims", tuple((str(n), int(v)) for n, v in self.dims))
        object.__setattr__(self, "epilogue", tuple(self.epilogue))
        for name, v in self.dims:
            if v <= 0:
                raise ValueError(f"{self.op}: dim {name}={v} must be positive")

    # -- views -------------------------------------------------------------------------------
    @property
    def dim(self) -> dict[str, int]:
        return dict(self.dims)

    def to_json(self) -> dict:
        return {
            "op": self.op,
            "dims": [[n, v] for n, v in self.dims],
            "dtype": self.dtype,
            "acc_dtype": self.acc_dtype,
            "layout": self.layout,
            "epilogue": list(self.epilogue),
        }

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
        )

    @property
    def key(self) -> str:
        """Stable across processes and versions: a hash of the canonical JSON."""
        canon = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:20]

    @property
    def name(self) -> str:
        dims = "_".join(f"{n}{v}" for n, v in self.dims)
        epi = "".join(f"+{e}" for e in self.epilogue)
        return f"{self.op}_{dims}_{DTYPE_SHORT.get(self.dtype, self.dtype)}{epi}"

    @property
    def flops(self) -> float:
        if self.op == "linear":
            d = self.dim
            return 2.0 * d["m"] * d["n"] * d["k"]
        raise NotImplementedError(self.op)


def linear_workload(m: int, n: int, k: int, dtype: str = "float16", bias: bool = True) -> Workload:
    """y[m, n] = x[m, k] @ w[n, k]^T (+ b[n]); fp16 accumulates in fp32."""
    acc = "float32" if dtype in ("float16", "bfloat16", "float32") else dtype
    return Workload(
        op="linear",
        dims=(("m", m), ("n", n), ("k", k)),
        dtype=dtype,
        acc_dtype=acc,
        layout="x[m,k] w[n,k] -> y[m,n]",
        epilogue=("bias",) if bias else (),
    )
