"""The README's install commands (issue 11 item 6): the main job's and the tests' install the same
torch, so one leaves an environment the other keeps (torch's version is in every record's target key),
and that torch is a pinned release, never whatever is newest (a multi-GB CUDA build on a CPU machine)."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]


def torch_requirements(command: str, project: dict) -> set[str]:
    """The torch requirements a `pip install ...` command asks for: its own arguments, and for
    `-e .` or `-e '.[extra,...]'` the project's dependencies and those extras'."""
    args = shlex.split(command.split("&&")[0])
    assert args[:2] == ["pip", "install"], command
    reqs = []
    for a in args[2:]:
        if a == "-e":
            continue
        m = re.fullmatch(r"\.(?:\[(.*)\])?", a)
        if m:
            reqs += project["dependencies"]
            for extra in filter(None, (m.group(1) or "").split(",")):
                reqs += project["optional-dependencies"][extra]
        else:
            reqs.append(a)
    return {str(r.specifier) for r in map(Requirement, reqs) if r.name == "torch"}


def readme_commands() -> list[str]:
    quick = (ROOT / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in quick.splitlines() if line.startswith("    pip install")]


def test_main_job_and_tests_install_the_same_pinned_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    commands = readme_commands()
    assert len(commands) == 2 and "shapetune tune" in commands[0] and "pytest" in commands[1], commands
    main, tests = (torch_requirements(c, project) for c in commands)
    assert main == tests, (main, tests)
    pins = [Requirement(f"torch{s}") for s in main if s.startswith("==")]
    assert pins, f"no pinned torch in {main}"
    # The pin lies inside the project's own range, which is what a machine with its own torch keeps.
    (rng,) = {str(Requirement(r).specifier) for r in project["dependencies"] if Requirement(r).name == "torch"}
    assert all(Requirement(f"torch{rng}").specifier.contains(str(p.specifier).lstrip("=")) for p in pins), rng


def test_ci_runs_the_readmes_test_command():
    """CI installs exactly as the README says (.ci/run), so the check above covers what CI runs."""
    assert readme_commands()[1] in (ROOT / ".ci" / "run").read_text()
