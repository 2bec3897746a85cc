"""Loading compiled TVM modules and calling them on torch tensors, on torch's current stream."""

from __future__ import annotations

import os
import threading
from functools import lru_cache
from pathlib import Path

_lock = threading.Lock()
_cuda_ready = False


def ensure_cuda_runtime():
    """Make TVM able to load CUDA modules, also where only TVM's runtime library is present."""
    global _cuda_ready
    if _cuda_ready:
        return
    with _lock:
        if _cuda_ready:
            return
        os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
        import tvm
        import tvm_ffi

        if tvm_ffi.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is None:
            # Runtime-only TVM skips backend autoload: load the CUDA runtime library ourselves.
            libdir = os.path.dirname(tvm_ffi.libinfo.find_libtvm_ffi()) if hasattr(tvm_ffi.libinfo, "find_libtvm_ffi") else None
            tvm_dir = os.path.join(os.path.dirname(tvm.__file__), "lib")
            tvm_ffi.libinfo.load_lib_ctypes(package="tvm", target_name="tvm_runtime_cuda",
                                            extra_lib_paths=[Path(p) for p in (tvm_dir, libdir) if p],
                                            mode="RTLD_LOCAL")
        from scheduler.cuda_compile import install_compile_callback

        install_compile_callback()  # modules that still carry CUDA source compile through nvcc
        _cuda_ready = True


@lru_cache(maxsize=1024)
def load_function(path: str, is_gpu: bool):
    """The "main" function of an exported module, loaded once per process."""
    import tvm

    if is_gpu:
        ensure_cuda_runtime()
    return tvm.runtime.load_module(path)["main"]


def call_on_current_stream(fn, args, is_gpu: bool):
    """Launch fn(*args) on torch's current CUDA stream (the CPU path just calls)."""
    if not is_gpu:
        fn(*args)
        return
    import torch
    import tvm_ffi

    stream = torch.cuda.current_stream()
    dev = args[-1].device
    with tvm_ffi.StreamContext(tvm_ffi.device(f"cuda:{dev.index or 0}"), stream.cuda_stream):
        fn(*args)
