"""Loading compiled TVM modules and calling them on torch tensors, on torch's current stream."""

from __future__ import annotations

import os
import threading
from functools import lru_cache
from pathlib import Path

_lock = threading.Lock()
_cuda_ready = False


def ensure_cuda_runtime(compile_source: bool = True):
    """Make TVM able to load CUDA modules, also where only TVM's runtime library is present.

    compile_source: also install the nvcc callback for modules that still carry CUDA source. A
    pack (kernels.pack) ships machine code only and loads with False: a module holding source then
    fails to load (counted fallback) instead of compiling."""
    global _cuda_ready
    if not _cuda_ready:
        with _lock:
            if not _cuda_ready:
                _load_cuda_runtime()
                _cuda_ready = True
    if compile_source:
        from scheduler.cuda_compile import install_compile_callback

        install_compile_callback()


def _load_cuda_runtime():
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


@lru_cache(maxsize=1024)
def load_function(path: str, is_gpu: bool, compile_source: bool = True):
    """The "main" function of an exported module, loaded once per process (compile_source: see
    `ensure_cuda_runtime`), called with the op's arguments: where the module takes scratch buffers
    (scheduler/workspaces.py), a wrapper allocates and appends them."""
    import tvm

    from .workspaces import bind

    if is_gpu:
        ensure_cuda_runtime(compile_source)
    return bind(tvm.runtime.load_module(path)["main"], path)


_KDL_CUDA = 2  # DLPack's device type of CUDA memory
_set_stream = None  # tvm_ffi.core._env_set_current_stream, bound on the first GPU launch
_raw_stream = None  # device index -> torch's current cudaStream_t as an int, bound with it


def _bind_streams():
    global _set_stream, _raw_stream
    import torch
    from tvm_ffi import core

    # torch._C._cuda_getCurrentRawStream is what torch's own compiled code launches on (dynamo's
    # get_raw_stream): one C call, where torch.cuda.current_stream(i).cuda_stream builds a Stream
    # object in Python first.
    _raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
        lambda idx: torch.cuda.current_stream(idx).cuda_stream)
    _set_stream = core._env_set_current_stream


def call_on_current_stream(fn, args, is_gpu: bool):
    """Launch fn(*args) on torch's current CUDA stream (the CPU path just calls). The stream is handed
    to TVM's environment for the launch and the previous one put back: three C calls around the launch
    (a tvm_ffi.StreamContext, a device object and torch.cuda.current_stream() cost several µs of
    Python per op call, and a patched UNet step makes ~1000). Arguments whose memory does not start on a
    16-byte boundary (a view at an odd storage offset: `buf[1:].view(...)`) are realigned first: the
    kernels may use aligned vector loads (the llvm norms segfaulted on them); the last argument, the output
    the kernel writes (in place for some ops), is copied back after the launch."""
    for a in args:
        if a.data_ptr() & 15:
            _call_realigned(fn, args, is_gpu)
            return
    if not is_gpu:
        fn(*args)
        return
    if _set_stream is None:
        _bind_streams()
    idx = args[-1].get_device()
    prev = _set_stream(_KDL_CUDA, idx, _raw_stream(idx))
    try:
        fn(*args)
    finally:
        _set_stream(_KDL_CUDA, idx, prev)


def _call_realigned(fn, args, is_gpu: bool) -> None:
    """call_on_current_stream with each misaligned argument replaced by a fresh copy (torch's allocations
    are aligned), the output's written back into the caller's tensor."""
    staged = [a.clone() if a.data_ptr() & 15 else a for a in args]
    call_on_current_stream(fn, staged, is_gpu)
    if staged[-1] is not args[-1]:
        args[-1].copy_(staged[-1])

