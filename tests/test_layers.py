"""Imports run one way (issue 9): shapetune < cost_model < scheduler < kernels < the CLI.

Every import in the four packages (module level and inside functions) is read with `ast`; an import of
a higher floor from a lower one is an arrow running back up. The arrows that exist today are listed in
KNOWN, each with the reason it is still there: a new one fails the test, and so does a listed one that
is gone (delete it from KNOWN, so the list only shrinks).
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOORS = {"shapetune": 0, "cost_model": 1, "scheduler": 2, "kernels": 3}
CLI = {"shapetune.cli"}  # the roof (a package: shapetune/cli/): it alone may import every floor

# (importing module, package it imports upward) -> why it is still there. Empty since the op
# definitions moved to shapetune/ops (issue 9 item 2); keep it empty.
KNOWN: dict[tuple[str, str], str] = {}


def cli_module(module: str) -> str | None:
    """The CLI module that `module` is or lies in, else None."""
    return next((c for c in CLI if module == c or module.startswith(c + ".")), None)


def floor(module: str) -> int | None:
    if cli_module(module):
        return len(FLOORS)
    return FLOORS.get(module.split(".")[0])


def module_name(path: Path, root: Path = REPO) -> tuple[str, str]:
    """(module, package it resolves relative imports against) of a source file under root."""
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
        name = ".".join(parts[:-1])
        return name, name
    return ".".join(parts), ".".join(parts[:-1])


def imports(path: Path, root: Path = REPO) -> set[str]:
    """Absolute names of every module `path` imports, relative imports resolved."""
    _, package = module_name(path, root)
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):  # `from X import y`: X, and X.y in case y is a module
            base = (importlib.util.resolve_name("." * node.level + (node.module or ""), package)
                    if node.level else node.module)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
    return out


def upward_arrows(root: Path = REPO) -> set[tuple[str, str]]:
    """{(importing module, imported top-level package or CLI module)} for every arrow that runs up."""
    arrows = set()
    for pkg in FLOORS:
        for path in sorted((root / pkg).rglob("*.py")):
            mod, _ = module_name(path, root)
            for name in imports(path, root):
                up = floor(name)
                if up is not None and up > floor(mod):
                    arrows.add((mod, cli_module(name) or name.split(".")[0]))
    return arrows


def test_arrows_up_are_found_relative_or_not_inside_functions(tmp_path):
    (tmp_path / "shapetune" / "sub").mkdir(parents=True)
    (tmp_path / "shapetune" / "sub" / "__init__.py").write_text("from .. import workload\n")
    (tmp_path / "shapetune" / "sub" / "x.py").write_text("def f():\n    from kernels.registry import Registry\n")
    (tmp_path / "cost_model").mkdir()
    (tmp_path / "cost_model" / "y.py").write_text("import scheduler.tuner\nfrom shapetune import cli\n")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "z.py").write_text("from scheduler import builder\nfrom shapetune.cli import main\n")
    assert imports(tmp_path / "shapetune" / "sub" / "__init__.py", tmp_path) == {"shapetune", "shapetune.workload"}
    assert upward_arrows(tmp_path) == {("shapetune.sub.x", "kernels"), ("cost_model.y", "scheduler"),
                                       ("cost_model.y", "shapetune.cli"), ("kernels.z", "shapetune.cli")}
    # kernels.z -> scheduler runs down the stack, which is allowed


def test_no_new_upward_imports():
    arrows = upward_arrows()
    new = sorted(arrows - set(KNOWN))
    assert not new, f"imports running up the stack (shapetune < cost_model < scheduler < kernels < CLI): {new}"


def test_known_upward_imports_still_exist():
    gone = sorted(set(KNOWN) - upward_arrows())
    assert not gone, f"fixed, delete from KNOWN: {gone}"
