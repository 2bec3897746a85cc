"""CUDA flash attention (fp16 in, fp32 softmax and accumulation) on WMMA tensor cores, for sm_70+.

o[b, i, h, :] = sum_t softmax_t(q[b, i, h, :] . k[b, t, h, :] * scale) v[b, t, h, :], layout bshd.
Written as one TVMScript PrimFunc per (workload, knobs), not through tir.Schedule: the online
softmax's per-row state and the warp-private staging tiles have no schedule primitive.

Grid: (ceil(sq / BQ), b*h); a block of `warps` warps owns BQ = 16*warps query rows, a warp owns 16.
  1. The block stages its Q tile in shared memory (rows >= sq and head-dim columns d..DP read as 0;
     DP = d rounded up to 16, so d = 40 runs as 48).
  2. For each key/value tile of BK rows (rows >= skv read as 0):
     S = Q Kᵀ on WMMA 16x16x16 (fp32 accumulators) -> the warp's S tile in shared memory;
     the warp's 32 lanes do the online softmax, two lanes per row (lane 2r+h owns row r, columns
     h, h+2, ...): scores * scale*log2(e), keys >= skv masked to -inf, new row max m' (shuffle with
     the partner lane), alpha = 2^(m - m'), P = 2^(s - m') rounded to fp16 into shared memory,
     running sum l = l*alpha + sum(P) (each lane's partial; combined at the end), and the lane's
     slice of the fp32 O rows (registers) scaled by alpha;
     O += P V, one 16-column chunk at a time through a 16x16 fp32 staging tile inside the warp's
     S tile, free by then (lane 2r+h adds columns 8h..8h+7 of row r of each chunk into its
     registers).
  3. O / l, rounded to fp16, staged in shared memory (over the Q tile), stored with vector writes
     (rows >= sq and columns >= d are not written).
Symbolic sq / skv (buckets) only change the grid size, the key-tile count and the masks.

Measured: times against torch SDPA in the same run, per SD 1.5 shape, with the best knobs: see
BENCHMARKS.md, "Attention (flash-style on WMMA)"; its verification error: "Verification error of
the committed kernels" (the same size as for every other op). Short self-attention (64 tokens) is
where it wins; long self-attention is where it loses most; the bucket kernels (symbolic sq / skv)
ran at about the ratio of the exact shapes they cover.
Where it loses (long self-attention): 3 block barriers per key tile with synchronous K/V loads (no
cp.async / double buffering: load latency is exposed), scores, P and each O chunk round-trip through
shared memory (WMMA fragments have no element access), 146-255 registers per thread, and the
48 KB shared-memory cap that rules out larger tiles. Next steps, by expected gain: mma.sync
(T.ptx_mma + ldmatrix) so S, P and O stay in registers (no staging, no O-chunk barriers); cp.async
double-buffered K/V; opting in to >48 KB dynamic shared memory (needs a launch attribute TVM 0.27
does not set).

TVM 0.27 notes (found writing this; [built] = compiled here, [measured] = ran on a GPU):
- `from tvm.script import tirx as T`; a plain `@T.prim_func` with `T.launch_thread` and
  `T.alloc_buffer(..., scope=...)` lowers through tvm.compile's default pipeline. Fragments are
  buffers in scope "wmma.matrix_a" / "wmma.matrix_b" / "wmma.accumulator" driven by
  T.tvm_fill_fragment / tvm_load_matrix_sync / tvm_mma_sync / tvm_store_matrix_sync with
  T.tvm_access_ptr(T.type_annotation(dtype), buf.data, offset, extent, rw) pointers; fragment
  index = element offset / 256. Static shared arrays are emitted `alignas(64)` (WMMA needs 32 B).
- A matrix_b fragment buffer has one layout: K (col_major) and V (row_major) need two buffers
  (else InferFragment: "row_major vs. col_major") [built].
- `T.tvm_storage_sync("warp")` emits nothing (pre-Volta assumption); write
  `T.call_extern("void", "__syncwarp")`. The ThreadSync pass adds a __syncthreads() after every
  shared write that another thread reads, warp-private or not (it added 2 per 16 O columns per key
  tile). Marking the WMMA stores of warp-private tiles read-only in tvm_access_ptr (rw mask 1) keeps
  it out; then 3 block barriers per key tile remain [built; verified on H200].
- A shared scope with a made-up tag ("shared.foo") is emitted as a per-thread local array, not
  __shared__ [built]: don't use tags to dodge ThreadSync.
- A key loop with one trip (skv <= kv_tile) is simplified away; StorageRewrite then shares one
  allocation between the fp32 S and an fp16 tile and the build fails ("tvm_access_ptr element type
  must match the source buffer"). An annotation on the loop keeps it [built].
- Runtime-only TVM (the GPU bundle) rejected scheduler.loader.ensure_cuda_runtime's str lib paths
  ("extra_lib_paths[0] must be a pathlib.Path") and scheduler.cuda_compile's callback called
  Target.current(), absent there ("_ffi_api has no attribute TargetCurrent") [measured; both fixed].
"""

from __future__ import annotations

import math

from cost_model import dtype_bytes

from .base import Template, register

SMEM_LIMIT = 49152  # TVM 0.27 launches without opting in to more (see gemm_cuda.py)
LOG2E = 1.4426950408889634


def head_pad(d: int) -> int:
    return -(-d // 16) * 16


def vec_width(d: int) -> int:
    """Widest fp16 vector (<= 8 lanes, 16 bytes) that divides d: global loads and stores."""
    return next(v for v in (8, 4, 2, 1) if d % v == 0)


def smem_bytes(d: int, kn: dict) -> int:
    """Q tile + K and V tiles + per-warp S (fp32, also the O-chunk staging) and P (fp16) tiles."""
    dp, bq, bk, w = head_pad(d), 16 * kn["warps"], kn["kv_tile"], kn["warps"]
    ld = dp + 8
    return bq * ld * 2 + 2 * bk * ld * 2 + w * 16 * (bk + 4) * 4 + w * 16 * (bk + 8) * 2


def attention_kernel(workload, kn: dict):
    """The PrimFunc main(q, k, v, o) for this workload and knobs."""
    from tvm import tirx
    from tvm.script import tirx as T

    from shapetune.ops.attention import scale_of

    dd = workload.dim
    B, H, D = dd["b"], dd["h"], dd["d"]
    rng = workload.ranges
    if "b" in rng:
        B = tirx.Var("b", "int32")
    SQ = tirx.Var("sq", "int32") if "sq" in rng else dd["sq"]
    SKV = tirx.Var("skv", "int32") if "skv" in rng else dd["skv"]
    W, BK = kn["warps"], kn["kv_tile"]
    BQ, NT = 16 * W, 32 * W
    DP = head_pad(D)
    VEC = vec_width(D)
    LDQ = DP + 8  # fp16 row strides (x8: WMMA ldm; +8 staggers banks)
    LDS, LDP, LDO = BK + 4, BK + 8, 20  # fp32 S, fp16 P, fp32 O-chunk staging (inside S's tile)
    NF_D, NF_K = DP // 16, BK // 16
    CH_ROW = DP // VEC  # vector chunks per padded row
    CH_REAL = D // VEC  # of which hold data
    QLOAD_IT = -(-BQ * CH_ROW // NT)
    KLOAD_IT = -(-BK * CH_ROW // NT)
    OSTORE_IT = -(-BQ * CH_REAL // NT)
    SCALE = float(scale_of(workload)) * LOG2E
    NEG_INF = -math.inf

    f16, f32 = "float16", "float32"

    # The S and O staging tiles are written by WMMA stores and read back by the lanes of the same
    # warp only, after a __syncwarp. Their stores' pointers are marked read-only (rw mask 1, not 2)
    # so that the ThreadSync pass does not put a __syncthreads after each of them.
    WARP_PRIVATE = 1

    def ptr(dtype, buf, offset, extent, rw):
        return T.tvm_access_ptr(T.type_annotation(dtype), buf.data, offset, extent, rw)

    @T.prim_func
    def main(q_h: T.handle, k_h: T.handle, v_h: T.handle, o_h: T.handle):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        q = T.match_buffer(q_h, (B, SQ, H, D), f16)
        k = T.match_buffer(k_h, (B, SKV, H, D), f16)
        v = T.match_buffer(v_h, (B, SKV, H, D), f16)
        o = T.match_buffer(o_h, (B, SQ, H, D), f16)
        bx = T.launch_thread("blockIdx.x", (SQ + BQ - 1) // BQ)
        by = T.launch_thread("blockIdx.y", B * H)
        ty = T.launch_thread("threadIdx.y", W)
        tx = T.launch_thread("threadIdx.x", 32)
        q_s = T.alloc_buffer((BQ * LDQ,), f16, scope="shared")
        k_s = T.alloc_buffer((BK * LDQ,), f16, scope="shared")
        v_s = T.alloc_buffer((BK * LDQ,), f16, scope="shared")
        s_s = T.alloc_buffer((W * 16 * LDS,), f32, scope="shared")
        p_s = T.alloc_buffer((W * 16 * LDP,), f16, scope="shared")
        a_f = T.alloc_buffer((NF_K * 256,), f16, scope="wmma.matrix_a")
        kb_f = T.alloc_buffer((256,), f16, scope="wmma.matrix_b")  # one layout per fragment
        vb_f = T.alloc_buffer((256,), f16, scope="wmma.matrix_b")
        s_f = T.alloc_buffer((NF_K * 256,), f32, scope="wmma.accumulator")
        qa_f = T.alloc_buffer((256,), f16, scope="wmma.matrix_a")
        o_f = T.alloc_buffer((256,), f32, scope="wmma.accumulator")
        o_r = T.alloc_buffer((DP // 2,), f32, scope="local")
        sv = T.alloc_buffer((BK // 2,), f32, scope="local")
        m_r = T.alloc_buffer((1,), f32, scope="local")
        l_r = T.alloc_buffer((1,), f32, scope="local")
        mx = T.alloc_buffer((1,), f32, scope="local")
        ps = T.alloc_buffer((1,), f32, scope="local")

        bi: T.let[T.int32] = by // H
        hi: T.let[T.int32] = by % H
        q0: T.let[T.int32] = bx * BQ
        tid: T.let[T.int32] = ty * 32 + tx
        row: T.let[T.int32] = tx // 2  # the lane's row within its warp's 16
        hf: T.let[T.int32] = tx % 2

        # Q tile -> shared, zero-padded
        for it in T.unroll(QLOAD_IT):
            idx: T.let[T.int32] = it * NT + tid
            if idx < BQ * CH_ROW:
                r: T.let[T.int32] = idx // CH_ROW
                c: T.let[T.int32] = idx % CH_ROW
                if q0 + r < SQ and c < CH_REAL:
                    for e in T.vectorized(VEC):
                        q_s[r * LDQ + c * VEC + e] = q[bi, q0 + r, hi, c * VEC + e]
                else:
                    for e in T.vectorized(VEC):
                        q_s[r * LDQ + c * VEC + e] = T.float16(0)
        m_r[0] = T.float32(NEG_INF)
        l_r[0] = T.float32(0)
        for j in T.unroll(DP // 2):
            o_r[j] = T.float32(0)

        for kt in T.serial((SKV + BK - 1) // BK, annotations={"attn_kv_loop": 1}):
            kv0: T.let[T.int32] = kt * BK
            T.tvm_storage_sync("shared")
            for it in T.unroll(KLOAD_IT):
                idx: T.let[T.int32] = it * NT + tid
                if idx < BK * CH_ROW:
                    r: T.let[T.int32] = idx // CH_ROW
                    c: T.let[T.int32] = idx % CH_ROW
                    if kv0 + r < SKV and c < CH_REAL:
                        for e in T.vectorized(VEC):
                            k_s[r * LDQ + c * VEC + e] = k[bi, kv0 + r, hi, c * VEC + e]
                        for e in T.vectorized(VEC):
                            v_s[r * LDQ + c * VEC + e] = v[bi, kv0 + r, hi, c * VEC + e]
                    else:
                        for e in T.vectorized(VEC):
                            k_s[r * LDQ + c * VEC + e] = T.float16(0)
                        for e in T.vectorized(VEC):
                            v_s[r * LDQ + c * VEC + e] = T.float16(0)
            T.tvm_storage_sync("shared")

            # S = Q Kᵀ for this warp's 16 rows
            for n in T.unroll(NF_K):
                T.tvm_fill_fragment(s_f.data, 16, 16, 16, n, T.float32(0))
            for kk in T.unroll(NF_D):
                T.tvm_load_matrix_sync(qa_f.data, 16, 16, 16, 0,
                                       ptr(f16, q_s, ty * 16 * LDQ + kk * 16, 16 * LDQ, 1), LDQ, "row_major")
                for n in T.unroll(NF_K):
                    T.tvm_load_matrix_sync(kb_f.data, 16, 16, 16, 0,
                                           ptr(f16, k_s, n * 16 * LDQ + kk * 16, 16 * LDQ, 1), LDQ, "col_major")
                    T.tvm_mma_sync(s_f.data, n, qa_f.data, 0, kb_f.data, 0, s_f.data, n)
            for n in T.unroll(NF_K):
                T.tvm_store_matrix_sync(s_f.data, 16, 16, 16, n,
                                        ptr(f32, s_s, ty * 16 * LDS + n * 16, 16 * LDS, WARP_PRIVATE), LDS, "row_major")
            T.call_extern("void", "__syncwarp")

            # online softmax: lane 2*row + hf owns columns hf, hf + 2, ... of its row
            mx[0] = T.float32(NEG_INF)
            for t in T.unroll(BK // 2):
                sv[t] = T.if_then_else(kv0 + 2 * t + hf < SKV,
                                       s_s[(ty * 16 + row) * LDS + 2 * t + hf] * T.float32(SCALE),
                                       T.float32(NEG_INF))
                mx[0] = T.max(mx[0], sv[t])
            mx[0] = T.max(mx[0], T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), mx[0], 1, 32, 32))
            mx[0] = T.max(mx[0], m_r[0])  # the new row max m'
            ps[0] = T.exp2(m_r[0] - mx[0])  # alpha
            m_r[0] = mx[0]
            l_r[0] = l_r[0] * ps[0]
            for j in T.unroll(DP // 2):
                o_r[j] = o_r[j] * ps[0]
            for t in T.unroll(BK // 2):
                sv[t] = T.exp2(sv[t] - mx[0])
                l_r[0] = l_r[0] + sv[t]
                p_s[(ty * 16 + row) * LDP + 2 * t + hf] = T.Cast(f16, sv[t])
            T.call_extern("void", "__syncwarp")

            # O += P V, one 16-column chunk at a time
            for kk in T.unroll(NF_K):
                T.tvm_load_matrix_sync(a_f.data, 16, 16, 16, kk,
                                       ptr(f16, p_s, ty * 16 * LDP + kk * 16, 16 * LDP, 1), LDP, "row_major")
            for n in T.unroll(NF_D):
                T.tvm_fill_fragment(o_f.data, 16, 16, 16, 0, T.float32(0))
                for kk in T.unroll(NF_K):
                    T.tvm_load_matrix_sync(vb_f.data, 16, 16, 16, 0,
                                           ptr(f16, v_s, kk * 16 * LDQ + n * 16, 16 * LDQ, 1), LDQ, "row_major")
                    T.tvm_mma_sync(o_f.data, 0, a_f.data, kk, vb_f.data, 0, o_f.data, 0)
                T.tvm_store_matrix_sync(o_f.data, 16, 16, 16, 0,
                                        ptr(f32, s_s, ty * 16 * LDS, 16 * LDO, WARP_PRIVATE), LDO, "row_major")
                T.call_extern("void", "__syncwarp")
                for j in T.unroll(8):
                    o_r[n * 8 + j] = o_r[n * 8 + j] + s_s[ty * 16 * LDS + row * LDO + hf * 8 + j]
                T.call_extern("void", "__syncwarp")

        # O / l -> fp16 over the warp's rows of the Q tile -> global
        l_r[0] = l_r[0] + T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), l_r[0], 1, 32, 32)
        l_r[0] = T.float32(1) / l_r[0]
        for n in T.unroll(NF_D):
            for j in T.unroll(8):
                q_s[(ty * 16 + row) * LDQ + n * 16 + hf * 8 + j] = T.Cast(f16, o_r[n * 8 + j] * l_r[0])
        T.tvm_storage_sync("shared")
        for it in T.unroll(OSTORE_IT):
            idx: T.let[T.int32] = it * NT + tid
            if idx < BQ * CH_REAL:
                r: T.let[T.int32] = idx // CH_REAL
                c: T.let[T.int32] = idx % CH_REAL
                if q0 + r < SQ:
                    for e in T.vectorized(VEC):
                        o[bi, q0 + r, hi, c * VEC + e] = q_s[r * LDQ + c * VEC + e]

    return main


class AttnCudaWMMA(Template):
    name = "attn_cuda_wmma"
    ops = ("attention",)
    kinds = ("cuda",)
    knob_choices = {
        "warps": (1, 2, 4, 8),
        "kv_tile": (16, 32, 64, 128),
    }

    def applies(self, workload, target):
        return super().applies(workload, target) and workload.dtype == "float16"

    def valid(self, workload, target, kn):
        d = workload.dim
        if smem_bytes(d["d"], kn) > SMEM_LIMIT:
            return False
        # Tiles far beyond the problem only add masked work.
        return 16 * kn["warps"] <= max(16, 2 * d["sq"]) and kn["kv_tile"] <= max(16, 2 * d["skv"])

    def apply(self, workload, target, candidate):
        import tvm

        return tvm.IRModule({"main": attention_kernel(workload, candidate.knob)})

    def features(self, workload, target, kn):
        d = workload.dim
        dp, bq, bk = head_pad(d["d"]), 16 * kn["warps"], kn["kv_tile"]
        q_tiles = -(-d["sq"] // bq)
        kv_tiles = -(-d["skv"] // bk)
        blocks = q_tiles * d["b"] * d["h"]
        smem = smem_bytes(d["d"], kn)
        resident = max(1, min(32, 2048 // (32 * kn["warps"]), 232448 // smem)) * target.num_cores
        waves = blocks / resident
        useful = d["sq"] * d["skv"] * d["d"]
        done = q_tiles * bq * kv_tiles * bk * dp
        return {
            "warps": float(kn["warps"]),
            "q_tile": float(bq),
            "kv_tile": float(bk),
            "kv_tiles": float(kv_tiles),
            "blocks": float(blocks),
            "waves": waves,
            "wave_eff": blocks / (math.ceil(waves) * resident),
            "pad_flop_frac": 1.0 - useful / done,
            "smem_kb": smem / 1024,
            "log2_flops": math.log2(4.0 * d["b"] * d["h"] * useful),
            "kv_bytes_per_block": 2.0 * d["skv"] * d["d"] * dtype_bytes(workload.dtype),
        }


register(AttnCudaWMMA())
