"""The values that flow from the tuner into the DB: candidates, measurement results, baselines."""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import time
from dataclasses import dataclass, field

from .target import Target
from .workload import Workload

# A measurement ends in exactly one of these. Only "ok" carries times, and "ok" means verified.
STATUSES = ("ok", "build_error", "wrong_result", "runtime_error", "timeout")

Knob = tuple[str, "int | str | bool"]


def version_of(template_version: int, op_version: int) -> str:
    """`Candidate.version` of a template's candidates for an op: "T.O" (the template's version, the op
    definition's), "" for (1, 1), so every record and artifact made before versions existed keeps its key."""
    return "" if (template_version, op_version) == (1, 1) else f"{template_version}.{op_version}"


@dataclass(frozen=True)
class Candidate:
    """A schedule as plain data: a template name, its knob values and the version of the code that
    makes it (`version_of`: the template's and the op definition's). Replaying it is deterministic."""

    template: str
    knobs: tuple[Knob, ...] = ()
    version: str = ""  # "" is version (1, 1): absent from the JSON and the key

    def __post_init__(self):
        object.__setattr__(self, "knobs", tuple(sorted((str(k), v) for k, v in self.knobs)))
        if self.version and not (isinstance(self.version, str) and re.fullmatch(r"[1-9]\d*\.[1-9]\d*", self.version)):
            raise ValueError(f"candidate version must be 'T.O' (two integers >= 1), got {self.version!r}")
        if self.version == "1.1":
            object.__setattr__(self, "version", "")

    @property
    def knob(self) -> dict:
        return dict(self.knobs)

    def to_json(self) -> dict:
        d = {"template": self.template, "knobs": dict(self.knobs)}
        return d | {"version": self.version} if self.version else d

    @classmethod
    def from_json(cls, d: dict | str) -> Candidate:
        if isinstance(d, str):
            d = json.loads(d)
        return cls(d["template"], tuple(d.get("knobs", {}).items()), d.get("version", ""))

    @property
    def key(self) -> str:
        canon = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    def __str__(self) -> str:
        knobs = ",".join(f"{k}={v}" for k, v in self.knobs)
        return f"{self.template}[{knobs}]" + (f"@v{self.version}" if self.version else "")


@dataclass(frozen=True)
class LatencyStats:
    median_us: float
    mean_us: float
    min_us: float
    max_us: float
    std_us: float
    repeats: int

    @classmethod
    def of(cls, samples_us: list[float]) -> LatencyStats:
        if not samples_us:
            raise ValueError("no latency samples")
        return cls(
            median_us=statistics.median(samples_us),
            mean_us=statistics.fmean(samples_us),
            min_us=min(samples_us),
            max_us=max(samples_us),
            std_us=statistics.pstdev(samples_us) if len(samples_us) > 1 else 0.0,
            repeats=len(samples_us),
        )

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class MeasureResult:
    """One candidate, built, verified and timed (or the reason it was not)."""

    workload: Workload
    target: Target
    candidate: Candidate
    status: str
    latency: LatencyStats | None = None
    error: str = ""  # first lines of the build/run error, or the verification failure
    max_rel_err: float | None = None  # ‖out − ref‖ / ‖ref‖ of the worst verification trial
    build_s: float = 0.0
    run_id: str = ""
    created: float = field(default_factory=time.time)

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}")
        if (self.status == "ok") != (self.latency is not None):
            raise ValueError("a result carries a latency exactly when its status is 'ok'")

    @property
    def verified(self) -> bool:
        return self.status == "ok"

    @property
    def uid(self) -> str:
        """Identity for dedup on import: same workload, target, candidate, time and run."""
        s = f"{self.workload.key}|{self.target.key}|{self.candidate.key}|{self.run_id}|{self.created!r}"
        return hashlib.sha256(s.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class VendorBaseline:
    """The vendor path (torch's own op: cuBLAS / cuDNN / MKL) measured in the same run."""

    workload: Workload
    target: Target
    name: str  # e.g. "torch.nn.functional.linear"
    latency: LatencyStats
    run_id: str = ""
    created: float = field(default_factory=time.time)

    @property
    def uid(self) -> str:
        s = f"{self.workload.key}|{self.target.key}|{self.name}|{self.run_id}|{self.created!r}"
        return hashlib.sha256(s.encode()).hexdigest()[:24]
