"""`shapetune doctor`: what this machine runs shapetune with, in one report to paste into an issue."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import click

from shapetune import config


def _version(dist: str, module: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return getattr(__import__(module), "__version__", "installed (no version)")
    except ImportError:
        return "not installed"


def _size(p: Path) -> int:
    """Bytes under a file or directory (0 if missing)."""
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _pack_state(here) -> str:
    """Whether the registry serves from a pack (SHAPETUNE_PACK), and whether it can here."""
    from kernels.pack import Pack, PackError
    from kernels.registry import PACK_ENV

    path = os.environ.get(PACK_ENV)
    if not path:
        return f"none active (the tuning DB and kernel cache serve; {PACK_ENV}=DIR serves a pack)"
    try:
        p = Pack(path)
    except PackError as e:
        return f"{path} unusable, every op runs torch's path: {e}"
    if here is not None and p.target_key != here.key:
        return f"{p.describe()}: for another target key ({p.target_key}), every op runs torch's path"
    return f"{p.describe()}: active (the DB above is not served)"


def report(db_path: str) -> list[tuple[str, str]]:
    """(field, value) pairs: versions, GPU, this machine's target, the DB, the caches and the pack."""
    import torch

    from shapetune.db import DBError, TuningDB
    from shapetune.target import detect

    out = [("shapetune", _version("shapetune", "shapetune"))]
    out += [(name, _version(dist, mod)) for name, dist, mod in (
        ("torch", "torch", "torch"), ("tvm", "apache-tvm", "tvm"), ("tvm-ffi", "apache-tvm-ffi", "tvm_ffi"),
        ("xgboost", "xgboost", "xgboost"), ("pandas (optional)", "pandas", "pandas"))]
    out.append(("torch CUDA", torch.version.cuda or "none (CPU build)"))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append((f"GPU {i}", f"{p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs"))
    else:
        out.append(("GPU", "none visible to torch (tuning and serving use the CPU, TVM llvm)"))
    try:
        here = detect()
        out += [("target", here.describe()), ("target key", here.key)]
    except (RuntimeError, ValueError) as e:
        here = None
        out.append(("target", f"cannot detect: {e}"))
    path = Path(db_path)
    out.append(("DB", f"{path} ({_mib(_size(path))})" if path.exists() else f"{path} (none yet)"))
    if path.exists():
        try:
            with TuningDB(path, create=False) as d:
                s = d.stats()
                out.append(("DB records", f"{s['records']} ({', '.join(f'{k} {v}' for k, v in s['by_trust'].items()) or '-'})"))
                if here is not None:
                    stale = sum(n for k, n in s["by_target"].items() if k != here.key)
                    out.append(("DB stale records", f"{stale} (of other targets: never served here)"))
                    out.append(("DB pending imports", f"{len(d.pending(here.key))} (`shapetune db verify`)"))
        except DBError as e:
            out.append(("DB problem", str(e)))
    root = config.cache_root()
    out.append(("cache root", f"{root} ({_mib(_size(root))})"))
    kernels = root / "kernels"
    for sub in sorted(kernels.iterdir()) if kernels.is_dir() else []:
        mark = " (this target)" if here is not None and sub.name == here.key else " (stale)"
        out.append((f"kernel cache {sub.name}", f"{_mib(_size(sub))}, {len(list(sub.iterdir()))} files{mark}"))
    out.append(("pack", _pack_state(here)))
    for var in ("SHAPETUNE_DB", "SHAPETUNE_CACHE_DIR", "SHAPETUNE_TARGET", "SHAPETUNE_DISABLE",
                "SHAPETUNE_BUILD_JOBS", "SHAPETUNE_NVCC", "SHAPETUNE_PACK"):
        if var in os.environ:
            out.append((var, os.environ[var]))
    return out


@click.command()
@click.option("--db", "db_path", type=click.Path(dir_okay=False),
              default=lambda: str(config.default_db_path()), show_default="$SHAPETUNE_DB "
              "or <user cache>/shapetune/tuning.db", help="Tuning DB file.")
def doctor(db_path):
    """Versions (torch, TVM, tvm-ffi, xgboost), the GPUs torch sees and their arch, this machine's
    target, the tuning DB (records, stale, pending), the caches with their sizes, and the pack served
    (SHAPETUNE_PACK) if any."""
    rows = report(db_path)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")
