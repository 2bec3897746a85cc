"""A template turns (workload, target, knob values) into a scheduled TVM IRModule.

The search space is plain data: `space()` enumerates every valid Candidate (template name + knob
values), so candidates can be ranked by the cost model, stored in the DB and replayed exactly.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping

from shapetune.ops import opdef
from shapetune.records import Candidate, version_of
from shapetune.target import Target
from shapetune.workload import Workload


class Template(ABC):
    """One schedule template. version: of its code; bump it when a change alters the generated kernel
    for some knobs: its candidates then carry the new version (Candidate.version, with the op
    definition's: `current_version`), so its records are re-verified and re-timed, never served as
    measured, and its kernels get new artifact names (scheduler.reverify)."""

    name: str
    ops: tuple[str, ...]
    kinds: tuple[str, ...]  # target kinds
    knob_choices: Mapping[str, tuple] = {}
    version: int = 1

    def applies(self, workload: Workload, target: Target) -> bool:
        return workload.op in self.ops and target.kind in self.kinds

    def valid(self, workload: Workload, target: Target, knobs: dict) -> bool:
        return True

    def space(self, workload: Workload, target: Target) -> list[Candidate]:
        names = sorted(self.knob_choices)
        version = version_of(self.version, opdef(workload.op).version)
        out = []
        for values in itertools.product(*(self.knob_choices[n] for n in names)):
            knobs = dict(zip(names, values))
            if self.valid(workload, target, knobs):
                out.append(Candidate(self.name, tuple(knobs.items()), version))
        return out

    @abstractmethod
    def apply(self, workload: Workload, target: Target, candidate: Candidate):
        """The scheduled IRModule (function "main") for this candidate."""

    def features(self, workload: Workload, target: Target, knobs: dict) -> dict[str, float]:
        return {}


_TEMPLATES: dict[str, Template] = {}


def register(t: Template) -> Template:
    _TEMPLATES[t.name] = t
    from cost_model import register_feature_fn

    register_feature_fn(t.name, t.features)
    return t


def get(name: str) -> Template:
    _load_builtin()
    try:
        return _TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown template {name!r}; known: {sorted(_TEMPLATES)}") from None


def current_version(template: str, op: str) -> str:
    """Candidate.version of `template`'s candidates for workloads of `op` in this code (a template or
    op unknown here counts as version 1: its records fail to build, as before versions)."""
    if template not in _TEMPLATES:
        _load_builtin()
    t = _TEMPLATES.get(template)
    try:
        op_version = opdef(op).version
    except ValueError:
        op_version = 1
    return version_of(t.version if t else 1, op_version)


def for_workload(workload: Workload, target: Target) -> list[Template]:
    _load_builtin()
    return [t for t in _TEMPLATES.values() if t.applies(workload, target)]


def all_templates() -> Iterable[Template]:
    _load_builtin()
    return list(_TEMPLATES.values())


def _load_builtin():
    """Import every module of this package: each template module registers itself."""
    import importlib
    import pkgutil

    from .. import templates

    for m in pkgutil.iter_modules(templates.__path__):
        if m.name != "base":
            importlib.import_module(f"{templates.__name__}.{m.name}")
