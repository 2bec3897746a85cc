"""Every environment variable and path shapetune reads, in one place.

SHAPETUNE_DB          path of the tuning DB (default: <user cache>/shapetune/tuning.db)
SHAPETUNE_CACHE_DIR   root of compiled-kernel caches (default: <user cache>/shapetune)
SHAPETUNE_TARGET      force a target kind: "cuda" or "llvm" (default: cuda if a GPU is visible)
SHAPETUNE_DISABLE     "1" makes every op run its PyTorch fallback (kill switch)
SHAPETUNE_BUILD_JOBS  parallel builder processes (default: number of CPU cores)
SHAPETUNE_NVCC        nvcc used by the runtime-only compile callback (default: nvcc on PATH)
"""

from __future__ import annotations

import os
from pathlib import Path


def _user_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "shapetune"


def cache_root() -> Path:
    return Path(os.environ.get("SHAPETUNE_CACHE_DIR") or _user_cache_root())


def default_db_path() -> Path:
    return Path(os.environ.get("SHAPETUNE_DB") or cache_root() / "tuning.db")


def kernel_cache_dir(target_key: str) -> Path:
    """Compiled kernels live in a directory per target key (kind, arch, GPU, versions)."""
    return cache_root() / "kernels" / target_key


def forced_target_kind() -> str | None:
    kind = os.environ.get("SHAPETUNE_TARGET")
    if kind and kind not in ("cuda", "llvm"):
        raise ValueError(f"SHAPETUNE_TARGET must be 'cuda' or 'llvm', got {kind!r}")
    return kind


def disabled() -> bool:
    return os.environ.get("SHAPETUNE_DISABLE", "0") == "1"


def build_jobs() -> int:
    return int(os.environ.get("SHAPETUNE_BUILD_JOBS") or os.cpu_count() or 1)


def nvcc_path() -> str:
    return os.environ.get("SHAPETUNE_NVCC", "nvcc")
