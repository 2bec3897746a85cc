"""The five WMMA tensor intrinsics the GEMM-shaped CUDA templates tensorize with, registered on first use.

gemm_cuda, geglu_cuda and conv_cuda (through gemm_cuda's schedule) need exactly one configuration:
16x16x16 fragments, fp16 inputs read from `shared.dyn` (B transposed: the weight is [n, k]), an fp32
accumulator zero-filled and stored to `shared`. TVM's `tvm.s_tir.tensor_intrin.cuda` registers
about a hundred intrinsics when it is imported (ldmatrix, mma, int8, fp8, every scope), each
parsed from TVMScript: 25 s on an idle core, 67-97 s on a loaded 2-core machine, paid once per
builder process. These five take well under a second. Their names carry our prefix, so they sit
beside TVM's in one process (dlight's Matmul rule still imports TVM's module when it tensorizes).

Each intrinsic is a pair: `desc` (the loop nest tensorize matches in the schedule) and `impl`
(the one call it becomes: `tvm_load_matrix_sync` / `tvm_mma_sync` / `tvm_fill_fragment` /
`tvm_store_matrix_sync`, lowered by TVM's CUDA codegen to nvcuda::wmma calls). A fragment's index
inside its fragment buffer is its tile position in that buffer, computed from the matched
buffer's elem_offset and leading stride.
"""

from __future__ import annotations

import threading

F = 16  # fragment edge: m = n = k = 16
PREFIX = "shapetune_wmma_"
_lock = threading.Lock()
_names: dict[str, str] | None = None


def _fragment(buf, stride):
    """Index of the 16x16 tile `buf` starts at, in a fragment buffer whose rows are `stride` long."""
    return (buf.elem_offset // stride // F) * (stride // F) + buf.elem_offset % stride // F


def _copy(src_scope: str, dst_scope: str, dtype: str, call):
    """desc: dst[i, j] = src[i, j] over one 16x16 tile; impl: `call(src, dst, src_stride, dst_stride)`."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (F, F), dtype, align=64, offset_factor=F, scope=src_scope)
        C = T.match_buffer(c, (F, F), dtype, align=64, offset_factor=F, scope=dst_scope)
        with T.sblock("root"):
            T.reads(A[0:F, 0:F])
            T.writes(C[0:F, 0:F])
            for i, j in T.grid(F, F):
                with T.sblock("copy"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    C[vi, vj] = A[vi, vj]

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, c: T.handle) -> None:
        sa, sa0, sc, sc0 = T.int32(), T.int32(), T.int32(), T.int32()
        A = T.match_buffer(a, (F, F), dtype, align=64, offset_factor=F, scope=src_scope, strides=[sa, sa0])
        C = T.match_buffer(c, (F, F), dtype, align=64, offset_factor=F, scope=dst_scope, strides=[sc, sc0])
        with T.sblock("root"):
            T.reads(A[0:F, 0:F])
            T.writes(C[0:F, 0:F])
            T.evaluate(call(A, C, sa, sc))

    return desc, impl


def _load(scope: str, operand: str, layout: str):
    from tvm.script import tirx as T

    return _copy(scope, f"wmma.matrix_{operand}", "float16", lambda A, C, sa, sc: T.tvm_load_matrix_sync(
        C.data, F, F, F, _fragment(C, sc), A.access_ptr("r", ptr_type="float16"), sa, layout, dtype="void"))


def _store(scope: str):
    from tvm.script import tirx as T

    return _copy("wmma.accumulator", scope, "float32", lambda A, C, sa, sc: T.tvm_store_matrix_sync(
        A.data, F, F, F, _fragment(A, sa), C.access_ptr("w", ptr_type="float32"), sc, "row_major",
        dtype="void"))


def _fill():
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(c: T.handle) -> None:
        C = T.match_buffer(c, (F, F), "float32", align=64, offset_factor=F, scope="wmma.accumulator")
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:F, 0:F])
            for i, j in T.grid(F, F):
                with T.sblock("init"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    C[vi, vj] = T.float32(0)

    @T.prim_func(s_tir=True)
    def impl(c: T.handle) -> None:
        sc, sc0 = T.int32(), T.int32()
        C = T.match_buffer(c, (F, F), "float32", align=64, offset_factor=F, scope="wmma.accumulator",
                           strides=[sc, sc0])
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:F, 0:F])
            T.evaluate(T.tvm_fill_fragment(C.data, F, F, F, _fragment(C, sc), T.float32(0), dtype="void"))

    return desc, impl


def _mma_bt():
    """C[i, j] += float(A[i, k]) * float(B[j, k]): fp16 operands, B transposed, fp32 accumulator."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (F, F), "float16", align=64, offset_factor=F, scope="wmma.matrix_a")
        B = T.match_buffer(b, (F, F), "float16", align=64, offset_factor=F, scope="wmma.matrix_b")
        C = T.match_buffer(c, (F, F), "float32", align=64, offset_factor=F, scope="wmma.accumulator")
        with T.sblock("root"):
            T.reads(C[0:F, 0:F], A[0:F, 0:F], B[0:F, 0:F])
            T.writes(C[0:F, 0:F])
            for i, j, k in T.grid(F, F, F):
                with T.sblock(""):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    C[vi, vj] = C[vi, vj] + T.Cast("float32", A[vi, vk]) * T.Cast("float32", B[vj, vk])

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        sa, sa0, sb, sb0, sc, sc0 = T.int32(), T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
        A = T.match_buffer(a, (F, F), "float16", align=64, offset_factor=F, scope="wmma.matrix_a",
                           strides=[sa, sa0])
        B = T.match_buffer(b, (F, F), "float16", align=64, offset_factor=F, scope="wmma.matrix_b",
                           strides=[sb, sb0])
        C = T.match_buffer(c, (F, F), "float32", align=64, offset_factor=F, scope="wmma.accumulator",
                           strides=[sc, sc0])
        with T.sblock("root"):
            T.reads(C[0:F, 0:F], A[0:F, 0:F], B[0:F, 0:F])
            T.writes(C[0:F, 0:F])
            T.evaluate(T.tvm_mma_sync(C.data, _fragment(C, sc), A.data, _fragment(A, sa),
                                      B.data, _fragment(B, sb), C.data, _fragment(C, sc), dtype="void"))

    return desc, impl


def intrinsics() -> dict[str, str]:
    """Register the five intrinsics once per process; their names by role (load_a, load_b, init,
    compute, store), as `sch.tensorize` takes them."""
    global _names
    with _lock:
        if _names is None:
            from tvm.s_tir import TensorIntrin

            pairs = {"load_a": _load("shared.dyn", "a", "row_major"),
                     "load_b": _load("shared.dyn", "b", "col_major"),  # B is [n, k]: column-major k x n
                     "init": _fill(), "compute": _mma_bt(), "store": _store("shared")}
            names = {role: PREFIX + role for role in pairs}
            for role, (desc, impl) in pairs.items():
                TensorIntrin.register(names[role], desc, impl, override=True)
            _names = names
        return _names
