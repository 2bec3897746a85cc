"""CUDA source -> fatbin through nvcc, for the exact arch of the target (sm_90 -> sm_90a).

TVM's default callback uses NVRTC through cuda-python, which the GPU machines may lack; nvcc is
always there with the toolkit. Built modules then carry machine code and load without a compiler.
"""

from __future__ import annotations

import os
import subprocess
import tempfile

from shapetune import config

_installed = False


def nvcc_fatbin(code: str, arch: str) -> bytes:
    sm = arch.replace("sm_", "")
    if sm == "90":
        sm = "90a"  # Hopper-only instructions (wgmma, setmaxnreg) need the 'a' target
    with tempfile.TemporaryDirectory() as d:
        src, out = os.path.join(d, "k.cu"), os.path.join(d, "k.fatbin")
        with open(src, "w") as f:
            f.write(code)
        cmd = [config.nvcc_path(), "--fatbin", "-O3", "-std=c++17", "-lineinfo",
               f"-gencode=arch=compute_{sm},code=sm_{sm}", "-o", out, src]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{p.stderr[-4000:]}")
        with open(out, "rb") as f:
            return f.read()


def _device_arch() -> str:
    """sm_XY of the current GPU (where a module carrying CUDA source is loaded), else sm_90."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"sm_{major}{minor}"
    except Exception:  # pragma: no cover
        pass
    return "sm_90"


def install_compile_callback():
    """Register tvm_callback_cuda_compile (used by codegen when a CUDA runtime is present)."""
    global _installed
    if _installed:
        return
    import tvm
    import tvm_ffi

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def _compile(code, *rest):
        try:
            tgt = tvm.target.Target.current(allow_none=True)
        except AttributeError:  # runtime-only TVM (no target registry): loading, not building
            tgt = None
        arch = str(tgt.attrs.get("arch", "sm_90")) if tgt is not None else _device_arch()
        return nvcc_fatbin(code, arch)

    _installed = True
