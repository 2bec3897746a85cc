"""Targets: the hardware and software a record was measured on.

Everything that can change a kernel's speed class is in the key: kind, arch, device name, the SM
count of a GPU, and the TVM, CUDA and torch versions. A record whose target key differs from the
running one is never served as measured. But a kernel itself depends only on `KERNEL_FIELDS` (kind,
arch, TVM and CUDA versions; template versions are in the candidate): on a target that shares them
(another torch, which only changes the vendor baseline; another GPU of the same architecture, an
H100 for an H200) another target's records are candidates that `shapetune db verify` / prebuild
rebuild, re-verify and re-time here, the vendor path timed in the same run (scheduler/reverify.py).
A CPU's thread count is not in the key: it is a per-process setting
(OMP_NUM_THREADS, taskset) that made every record stale, and a run's tuned kernel and its vendor path
are timed with the same count; the stored target keeps the count it was made with, as provenance.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
from dataclasses import asdict, dataclass
from functools import lru_cache

from . import config


def cuda_arch_version(arch: str) -> tuple[int, int]:
    """The compute capability (major, minor) of a CUDA arch string.

    "sm_90" and "sm_90a" -> (9, 0), "sm_86" -> (8, 6), "sm_100" -> (10, 0), "sm_120" -> (12, 0):
    the last digit is the minor version, the digits before it the major (a trailing "a"/"f" feature
    suffix is ignored). Compare archs through this, never as strings ("sm_100" < "sm_90" as text).
    """
    m = re.fullmatch(r"sm_(\d+)(\d)[af]?", arch)
    if not m:
        raise ValueError(f"not a CUDA arch 'sm_<major><minor>[a|f]': {arch!r}")
    return int(m.group(1)), int(m.group(2))


def max_shared_memory_per_block(arch: str) -> int:
    """Bytes of shared memory one block may use on `arch`: 227 KB (opt-in) on Hopper (9.x) and
    datacenter Blackwell (10.x), else the 48 KB every arch grants without opt-in."""
    return 232448 if 9 <= cuda_arch_version(arch)[0] <= 10 else 49152


#: what a compiled kernel depends on: its machine code is the same wherever these are
KERNEL_FIELDS = ("kind", "arch", "tvm_version", "cuda_version")


@dataclass(frozen=True)
class Target:
    kind: str  # "cuda" | "llvm"
    arch: str  # "sm_90" | llvm mcpu, e.g. "znver3"
    device_name: str  # "NVIDIA H100 80GB HBM3" | CPU model
    num_cores: int  # SMs on a GPU (in the key), torch's threads on a CPU (provenance only)
    tvm_version: str
    cuda_version: str  # "" on llvm
    torch_version: str

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict | str) -> Target:
        if isinstance(d, str):
            d = json.loads(d)
        return cls(**d)

    def shares_kernels_with(self, other: Target) -> bool:
        """Whether a kernel built for `other` is the same kernel here (KERNEL_FIELDS equal), so its
        records may be re-verified and re-timed here instead of refused."""
        return all(getattr(self, f) == getattr(other, f) for f in KERNEL_FIELDS)

    @property
    def key_fields(self) -> tuple[str, ...]:
        """The fields the key is made of: every one on a GPU, all but the thread count on a CPU."""
        return tuple(f for f in self.__dataclass_fields__ if not (f == "num_cores" and self.kind == "llvm"))

    @property
    def key(self) -> str:
        canon = json.dumps({f: getattr(self, f) for f in self.key_fields}, sort_keys=True, separators=(",", ":"))
        return f"{self.kind}-{self.arch}-" + hashlib.sha256(canon.encode()).hexdigest()[:12]

    @property
    def is_gpu(self) -> bool:
        return self.kind == "cuda"

    def tvm_target(self):
        import tvm

        if self.kind == "cuda":
            # Hopper needs shared memory beyond the 48 KB of the default tag.
            return tvm.target.Target(
                {
                    "kind": "cuda",
                    "arch": self.arch,
                    "max_shared_memory_per_block": max_shared_memory_per_block(self.arch),
                    "max_threads_per_block": 1024,
                    "thread_warp_size": 32,
                }
            )
        return tvm.target.Target({"kind": "llvm", "mcpu": self.arch, "num-cores": self.num_cores})

    def differences(self, other: Target) -> list[str]:
        """What differs between two targets' keys, field by field: ["torch_version 2.11.0 (here) vs 2.10.0"]."""
        return [f"{f} {getattr(self, f)!r} (here) vs {getattr(other, f)!r}" for f in self.key_fields
                if getattr(self, f) != getattr(other, f)]

    def describe(self) -> str:
        extra = f", CUDA {self.cuda_version}" if self.cuda_version else ""
        return f"{self.device_name} ({self.kind} {self.arch}, TVM {self.tvm_version}{extra}, torch {self.torch_version})"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=None)
def detect(kind: str | None = None) -> Target:
    """The target of this process: the current CUDA GPU if present, else the host CPU."""
    import torch
    import tvm

    kind = kind or config.forced_target_kind() or ("cuda" if torch.cuda.is_available() else "llvm")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("target 'cuda' requested but torch sees no CUDA device")
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return Target(
            kind="cuda",
            arch=f"sm_{props.major}{props.minor}",
            device_name=props.name,
            num_cores=props.multi_processor_count,
            tvm_version=tvm.__version__,
            cuda_version=torch.version.cuda or "",
            torch_version=torch.__version__.split("+")[0],
        )
    from tvm.target import codegen

    return Target(
        kind="llvm",
        arch=codegen.llvm_get_system_cpu(),
        device_name=_cpu_model(),
        num_cores=torch.get_num_threads(),
        tvm_version=tvm.__version__,
        cuda_version="",
        torch_version=torch.__version__.split("+")[0],
    )


def cuda_target(arch: str = "sm_90", device_name: str = "NVIDIA H100 80GB HBM3", sms: int = 132,
                cuda_version: str = "13.0", torch_version: str = "2.11.0") -> Target:
    """A CUDA target described by hand, for building on a machine without that GPU."""
    import tvm

    return Target("cuda", arch, device_name, sms, tvm.__version__, cuda_version, torch_version)
