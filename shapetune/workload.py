"""Workloads: what a kernel computes, as a frozen, serializable value with a stable key."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

DTYPE_SHORT = {"float16": "f16", "bfloat16": "bf16", "float32": "f32", "float64": "f64"}

# A layout parameter: a whitespace-separated token "<letters><number>" or "<letters>=<number>",
# e.g. conv's "s2" and "p1", the norms' "eps=1e-05", attention's "scale=0.125".
_LAYOUT_PARAM = re.compile(r"([a-z]+)=?(-?[0-9][0-9.eE+-]*)")

#: op -> the layout parameters its constructor writes by default, as a function of the dims.
#: `Workload.name` leaves them out when all equal these, so the common case keeps a short name.
LAYOUT_DEFAULTS: dict[str, Callable[[dict[str, int]], dict[str, float]]] = {
    "conv2d": lambda d: {"s": 1, "p": d["kh"] // 2},  # stride 1, "same" padding
    "group_norm": lambda d: {"eps": 1e-5},
    "layer_norm": lambda d: {"eps": 1e-5},
    "add_layer_norm": lambda d: {"eps": 1e-5},
    "attention": lambda d: {"scale": d["d"] ** -0.5},
}


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
        """Readable and unique per key: op, dims (ranges for dynamic ones), layout parameters,
        dtype, accumulation type, epilogue, e.g. "conv2d_n2_h64_w64_ci320_co320_kh3_kw3_s2p1_f16+bias".

        The layout's parameters (`layout_params`) appear, all of them, unless every one equals the
        op's default (`LAYOUT_DEFAULTS`); an op without stated defaults always shows them. The
        accumulation type appears ("_accf16") unless it is the dtype's usual one.
        """
        rng = self.ranges
        parts = [self.op] + [f"{n}{rng[n][0]}-{rng[n][1]}" if n in rng else f"{n}{v}" for n, v in self.dims]
        params = self.layout_params
        if params and not self._default_layout(params):
            parts.append("".join(f"{k}{v}" for k, v in params))
        parts.append(_short(self.dtype))
        if self.acc_dtype != acc_dtype(self.dtype):
            parts.append(f"acc{_short(self.acc_dtype)}")
        return "_".join(parts) + "".join(f"+{e}" for e in self.epilogue)

    @property
    def layout_params(self) -> tuple[tuple[str, str], ...]:
        """The (name, value text) parameters in `layout`, in order: "nhwc ohwi s2 p1" -> (("s", "2"), ("p", "1"))."""
        return tuple(m.groups() for t in self.layout.split() if (m := _LAYOUT_PARAM.fullmatch(t)))

    def _default_layout(self, params: tuple[tuple[str, str], ...]) -> bool:
        fn = LAYOUT_DEFAULTS.get(self.op)
        if fn is None:
            return False
        want = fn(self.dim)
        # 12 significant digits, as the constructors write floats (attention_workload's scale)
        return all(k in want and float(v) == float(f"{want[k]:.12g}") for k, v in params)

    @property
    def flops(self) -> float:
        """Useful flops of the op at these dims (its definition's `flops`, shapetune.ops)."""
        from shapetune.ops import opdef

        fn = opdef(self.op).flops
        if fn is None:
            raise NotImplementedError(f"{self.op} is memory-bound: it has no flops count")
        return fn(self)


def _short(dtype: str) -> str:
    return DTYPE_SHORT.get(dtype, dtype)


def acc_dtype(dtype: str) -> str:
    """The accumulator type of an op computing in dtype: fp32 for fp16/bf16/fp32, else dtype."""
    return "float32" if dtype in ("float16", "bfloat16", "float32") else dtype
