"""Features of (workload, target, candidate) for the learned cost model.

The generic part knows nothing about templates: workload dims and their dynamic ranges, dtype,
epilogue steps, layout parameters (conv stride/padding, ...), flops, target cores, and every knob as
a number. For one op every workload gets the same workload columns (fixed length), so workloads
that differ only in epilogue, layout or ranges ("twins") differ in value, never in presence. Templates add analytical features (tile vs. dim padding, waves, shared memory, ...)
through `register_feature_fn`; `gemm_tile_features` is the shared helper for tiled GEMM-like
templates. Feature dicts become a dense matrix through a `FeatureSpace`, whose column list is stored
with the model so that a saved model reads new rows in the same order.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from shapetune.records import Candidate
from shapetune.target import Target
from shapetune.workload import Workload

FeatureFn = Callable[[Workload, Target, Mapping], Mapping[str, float]]

_FEATURE_FNS: dict[str, FeatureFn] = {}
#: every epilogue step of the op families (shapetune/ops/); each gets an `epi:<step>` 0/1 column
EPILOGUE_STEPS = ("bias", "gelu", "residual", "affine", "silu", "gelu_gate")
_DTYPE_BYTES = {"bool": 1, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}


def register_feature_fn(template: str, fn: FeatureFn) -> None:
    """Register analytical features for one template (replaces an earlier registration).

    Parameters
    ----------
    template : str
        `Candidate.template` the function applies to.
    fn : callable
        ``fn(workload, target, knobs) -> dict[str, float]``; `knobs` is the candidate's knob dict.
        Its keys are stored as ``x:<key>``, so names may be shared across templates (``waves``
        means the same thing everywhere) without clashing with the generic features.

    Notes
    -----
    Registrations are per process and not saved with a model: a loaded model sees NaN (missing) in
    the columns of a template whose function is not registered.
    """
    _FEATURE_FNS[template] = fn


def unregister_feature_fn(template: str) -> None:
    """Remove the analytical features of `template`, if any."""
    _FEATURE_FNS.pop(template, None)


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype name such as "float16", "int8", "bfloat16"."""
    if dtype in _DTYPE_BYTES:
        return _DTYPE_BYTES[dtype]
    bits = re.search(r"(\d+)", dtype)
    if not bits:
        raise ValueError(f"unknown dtype {dtype!r}")
    return max(1, int(bits.group(1)) // 8)


def _log2(v: float) -> float:
    return math.log2(v) if v > 0 else 0.0


def _knob_features(knobs: Mapping) -> dict[str, float]:
    out = {}
    for name, v in knobs.items():
        if isinstance(v, (bool, np.bool_)):
            out[f"knob:{name}"] = float(v)
        elif isinstance(v, (int, np.integer)):
            out[f"knob:{name}"] = math.copysign(math.log2(1 + abs(int(v))), v)
        elif isinstance(v, (float, np.floating)):
            out[f"knob:{name}"] = float(v)
        else:
            out[f"knob:{name}={v}"] = 1.0
    return out


def featurize(workload: Workload, target: Target, candidate: Candidate) -> dict[str, float]:
    """All features of one candidate on one workload and target.

    Parameters
    ----------
    workload, target, candidate
        What is run, where, and how.

    Returns
    -------
    dict[str, float]
        Workload: ``dim:<name>`` log2 of each dim (a bucket's representative); ``range_lo:<name>``,
        ``range_hi:<name>`` log2 of the range each dim must serve (lo = hi = the dim when exact);
        ``bucket`` 1 for a shape-bucket workload, else 0; ``epi:<step>`` 0/1 per `EPILOGUE_STEPS`
        step and ``epi:other`` the count of other steps; ``layout:<param>`` each numeric layout
        parameter (`Workload.layout_params`: conv ``s``, ``p``; norms ``eps``; attention ``scale``);
        ``dtype_bytes``, ``acc_dtype_bytes``; ``log2_flops`` (when the op defines flops).
        Target: ``num_cores``. Candidate: ``template=<name>`` one-hot, ``knob:<name>`` per numeric knob
        (log2(1+v) for ints, 0/1 for bools, the value for floats), ``knob:<name>=<value>`` one-hot per
        string knob, and ``x:<key>`` for the template's registered analytical features.
    """
    f = workload_features(workload)
    try:
        f["log2_flops"] = _log2(workload.flops)
    except NotImplementedError:
        pass
    f["num_cores"] = float(target.num_cores)
    f[f"template={candidate.template}"] = 1.0
    knobs = candidate.knob
    f.update(_knob_features(knobs))
    fn = _FEATURE_FNS.get(candidate.template)
    if fn is not None:
        f.update({f"x:{k}": float(v) for k, v in fn(workload, target, knobs).items()})
    return f


def workload_features(workload: Workload) -> dict[str, float]:
    """The workload part of `featurize` (see there); the same keys for every workload of one op."""
    rng = workload.ranges
    f: dict[str, float] = {}
    for n, v in workload.dims:
        lo, hi = rng.get(n, (v, v))
        f[f"dim:{n}"], f[f"range_lo:{n}"], f[f"range_hi:{n}"] = _log2(v), _log2(lo), _log2(hi)
    f["bucket"] = float(bool(workload.dynamic))
    f.update({f"epi:{e}": float(e in workload.epilogue) for e in EPILOGUE_STEPS})
    f["epi:other"] = float(sum(e not in EPILOGUE_STEPS for e in workload.epilogue))
    f.update({f"layout:{k}": float(v) for k, v in workload.layout_params})
    f["dtype_bytes"] = float(dtype_bytes(workload.dtype))
    f["acc_dtype_bytes"] = float(dtype_bytes(workload.acc_dtype))
    return f


def gemm_tile_features(m: int, n: int, k: int, bm: int, bn: int, bk: int, num_units: int,
                       elem_bytes: int) -> dict[str, float]:
    """Analytical features of an (m, n, k) GEMM tiled into (bm, bn, bk) blocks, one block per tile.

    Parameters
    ----------
    m, n, k : int
        Problem size: output is m x n, reduction over k.
    bm, bn, bk : int
        Tile size of one thread block (bk: the k-step staged per iteration).
    num_units : int
        Parallel units that each run one tile at a time (SMs, CPU cores).
    elem_bytes : int
        Bytes per input element.

    Returns
    -------
    dict[str, float]
        ``pad_waste_{m,n,k}`` fraction of the padded extent that is padding; ``pad_waste`` of the
        padded volume; ``tiles`` and ``log2_tiles`` (output tiles); ``waves`` = tiles / num_units;
        ``wave_eff`` = tiles / (ceil(waves) * num_units); ``k_iters``; ``tile_ai`` flops per byte
        loaded by one k-step of a tile; ``smem_bytes`` of one A+B stage; ``log2_b{m,n,k}``.
    """
    tm, tn, tk = -(-m // bm), -(-n // bn), -(-k // bk)
    pm, pn, pk = tm * bm, tn * bn, tk * bk
    tiles = tm * tn
    waves = tiles / num_units
    return {
        "pad_waste_m": 1.0 - m / pm,
        "pad_waste_n": 1.0 - n / pn,
        "pad_waste_k": 1.0 - k / pk,
        "pad_waste": 1.0 - (m * n * k) / (pm * pn * pk),
        "tiles": float(tiles),
        "log2_tiles": math.log2(tiles),
        "waves": waves,
        "wave_eff": tiles / (math.ceil(waves) * num_units),
        "k_iters": float(tk),
        "tile_ai": 2.0 * bm * bn / ((bm + bn) * elem_bytes),
        "smem_bytes": float((bm + bn) * bk * elem_bytes),
        "log2_bm": math.log2(bm),
        "log2_bn": math.log2(bn),
        "log2_bk": math.log2(bk),
    }


class FeatureSpace:
    """A fixed, ordered list of feature names; turns feature dicts into a float32 matrix.

    Parameters
    ----------
    columns : iterable of str, optional
        The column order. Empty until `fit` when not given.
    """

    def __init__(self, columns: Iterable[str] = ()):
        self.columns = list(columns)
        self._index = {c: i for i, c in enumerate(self.columns)}

    def fit(self, rows: Iterable[Mapping[str, float]]) -> FeatureSpace:
        """Take the sorted union of the rows' keys as the columns."""
        cols = set()
        for r in rows:
            cols.update(r)
        self.__init__(sorted(cols))
        return self

    def transform(self, rows: Iterable[Mapping[str, float]]) -> np.ndarray:
        """Dense ``(len(rows), len(columns))`` float32; NaN where a row lacks a column, unknown keys dropped."""
        rows = list(rows)
        x = np.full((len(rows), len(self.columns)), np.nan, dtype=np.float32)
        idx = self._index
        for i, r in enumerate(rows):
            for c, v in r.items():
                j = idx.get(c)
                if j is not None:
                    x[i, j] = v
        return x

    def fit_transform(self, rows: Iterable[Mapping[str, float]]) -> np.ndarray:
        rows = list(rows)
        return self.fit(rows).transform(rows)

    def __len__(self) -> int:
        return len(self.columns)
