"""Import a script of scripts/ as a module (they are run as files, not a package)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def script(name: str):
    """scripts/<name>.py, imported once per process under its own name."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(SCRIPTS))


def run_main(monkeypatch, main, argv: list[str]) -> None:
    """main() of a script run with `argv` as its command line, keeping the process's kernel registry
    (a bench script installs its own)."""
    import kernels

    monkeypatch.setattr(sys, "argv", argv)
    prev = kernels.get_registry()
    try:
        main()
    finally:
        kernels.set_registry(prev)
