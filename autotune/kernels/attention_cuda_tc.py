"""Flash attention on tensor cores for CUDA (bf16 / fp16, head_dim 16 to 128, sm_80+ / sm_70+).

One thread block of 4 warps per (head, 64-query tile); each warp owns 16 query rows. Per 64-key
tile: K and V staged in shared memory, S = Q.K^T on wmma 16x16x16 fragments (float32
accumulation), the online softmax in float32 (two threads per row, exp2 with the scale folded into
log2 units), P rounded to the input dtype, and O += P.V on wmma again. O lives in shared memory in
float32 and is rescaled there (a wmma accumulator's element-to-row mapping is opaque), then
normalized by the row sums on the way out. Nothing of size Lq x Lk exists: 32,760-token heads fit.

The device code is CUDA C++ (`DEVICE_SOURCE`); the PrimFunc binds the grid and the dynamic shared
memory and calls it with `T.call_extern`. `support.cuda_library` adds the source to the kernels it
compiles when their code names one of `DEVICE_FUNCTIONS` (registered at import here).

Signature and layout are those of the CUDA-core kernel (attention_cuda.py): q (B, Lq, 1, D),
k / v (B, Lk, 1, D) -> o (B, Lq, 1, D), lse (B, Lq, 1) (natural log; the rewrite drops it).
Checked here: nvcc compiles it and its SASS holds HMMA. Its numbers are checked on a GPU only
(tools/gpu_check.py).
"""

from __future__ import annotations

import math

from tvm.script import tirx as T

from autotune.support import tvm_compat
from autotune.support.cuda_library import register_device_source
from autotune.support.ir import ATTENTION_ATTR

BLOCK_M, BLOCK_N, THREADS = 64, 64, 128
HEAD_DIMS = (16, 32, 64, 128)  # multiples of the 16-wide fragment; Wan uses 128
DTYPES = {"bfloat16": ("bf16", "__nv_bfloat16", 80), "float16": ("f16", "half", 70)}

DEVICE_SOURCE = r"""
#include <mma.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace autotune_attention {

__device__ __forceinline__ half to_input(float x, half) { return __float2half_rn(x); }
__device__ __forceinline__ __nv_bfloat16 to_input(float x, __nv_bfloat16) { return __float2bfloat16_rn(x); }

template <typename T, int D>
__device__ __forceinline__ void flash_attention(const T* __restrict__ q, const T* __restrict__ k,
                                                const T* __restrict__ v, T* __restrict__ o, T* __restrict__ lse,
                                                unsigned char* smem_raw, int qo_len, int kv_len, float scale_log2) {
  using namespace nvcuda;
  constexpr int BM = 64, BN = 64, NT = 128, VEC = 8;  // VEC: elements per 16-byte load
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int row = lane % 16, half_ = lane / 16;  // this thread's row of the warp's 16, and its half of a row
  const int bh = blockIdx.y, m0 = blockIdx.x * BM;
  const T* qb = q + (size_t)bh * qo_len * D;
  const T* kb = k + (size_t)bh * kv_len * D;
  const T* vb = v + (size_t)bh * kv_len * D;
  unsigned char* smem = (unsigned char*)(((size_t)smem_raw + 127) & ~(size_t)127);  // wmma wants 32-byte alignment
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + BM * D;
  T* sV = sK + BN * D;
  T* sP = sV + BN * D;                                   // BM x BN probabilities, input dtype
  float* sS = reinterpret_cast<float*>(sP + BM * BN);    // BM x BN scores
  float* sO = sS + BM * BN;                              // BM x D output accumulator

  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int i = tid; i < BM * D / VEC; i += NT) {
    const int r = i / (D / VEC), c = (i % (D / VEC)) * VEC;
    *reinterpret_cast<uint4*>(sQ + r * D + c) =
        m0 + r < qo_len ? *reinterpret_cast<const uint4*>(qb + (size_t)(m0 + r) * D + c) : zero;
  }
  for (int i = lane; i < 16 * D; i += 32) sO[warp * 16 * D + i] = 0.f;
  float m_i = -INFINITY, l_i = 0.f;

  for (int n0 = 0; n0 < kv_len; n0 += BN) {
    __syncthreads();  // every warp is done with the previous K/V tile (and sQ is written)
    for (int i = tid; i < BN * D / VEC; i += NT) {
      const int r = i / (D / VEC), c = (i % (D / VEC)) * VEC;
      const bool in = n0 + r < kv_len;
      *reinterpret_cast<uint4*>(sK + r * D + c) = in ? *reinterpret_cast<const uint4*>(kb + (size_t)(n0 + r) * D + c) : zero;
      *reinterpret_cast<uint4*>(sV + r * D + c) = in ? *reinterpret_cast<const uint4*>(vb + (size_t)(n0 + r) * D + c) : zero;
    }
    __syncthreads();

    // S = Q K^T for this warp's 16 rows: K^T read as a column-major B straight from sK
    for (int j = 0; j < BN / 16; ++j) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
      for (int kk = 0; kk < D / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(a, sQ + warp * 16 * D + kk * 16, D);
        wmma::load_matrix_sync(b, sK + j * 16 * D + kk * 16, D);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(sS + warp * 16 * BN + j * 16, acc, BN, wmma::mem_row_major);
    }
    __syncwarp();

    // online softmax: two threads per row, each over half of the tile's keys
    float* srow = sS + (warp * 16 + row) * BN + half_ * (BN / 2);
    float tile_max = -INFINITY;
    for (int c = 0; c < BN / 2; ++c) {
      const float s = n0 + half_ * (BN / 2) + c < kv_len ? srow[c] * scale_log2 : -INFINITY;
      srow[c] = s;
      tile_max = fmaxf(tile_max, s);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 16));
    const float m_new = fmaxf(m_i, tile_max);  // finite: key n0 always exists
    const float alpha = exp2f(m_i - m_new);    // 0 on the first tile (m_i = -inf)
    T* prow = sP + (warp * 16 + row) * BN + half_ * (BN / 2);
    float tile_sum = 0.f;
    for (int c = 0; c < BN / 2; ++c) {
      const float p = exp2f(srow[c] - m_new);
      tile_sum += p;
      prow[c] = to_input(p, T());
    }
    tile_sum += __shfl_xor_sync(0xffffffffu, tile_sum, 16);
    l_i = l_i * alpha + tile_sum;
    m_i = m_new;
    float* orow = sO + (warp * 16 + row) * D + half_ * (D / 2);
    for (int d = 0; d < D / 2; ++d) orow[d] *= alpha;
    __syncwarp();

    // O += P V
    for (int j = 0; j < D / 16; ++j) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, sO + warp * 16 * D + j * 16, D, wmma::mem_row_major);
      for (int kk = 0; kk < BN / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, sP + warp * 16 * BN + kk * 16, BN);
        wmma::load_matrix_sync(b, sV + kk * 16 * D + j * 16, D);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(sO + warp * 16 * D + j * 16, acc, D, wmma::mem_row_major);
    }
    __syncwarp();
  }

  const int r = m0 + warp * 16 + row;
  if (r < qo_len) {
    const float inv = 1.f / l_i;
    const float* orow = sO + (warp * 16 + row) * D + half_ * (D / 2);
    T* out = o + ((size_t)bh * qo_len + r) * D + half_ * (D / 2);
    for (int d = 0; d < D / 2; ++d) out[d] = to_input(orow[d] * inv, T());
    if (half_ == 0) lse[(size_t)bh * qo_len + r] = to_input((m_i + log2f(l_i)) * 0.6931471805599453f, T());
  }
}

}  // namespace autotune_attention
"""


def smem_bytes(d: int, dtype_bytes: int = 2) -> int:
    """Q, K, V and P tiles in the input dtype, S and O in float32, plus 128 bytes to align."""
    return (BLOCK_M * d + 2 * BLOCK_N * d + BLOCK_M * BLOCK_N) * dtype_bytes + (BLOCK_M * BLOCK_N + BLOCK_M * d) * 4 + 128


def device_symbol(d: int, dtype: str) -> str:
    return f"autotune_flash_attention_{DTYPES[dtype][0]}_d{d}"


def _entry_points() -> str:
    out = []
    for dtype, (_, ctype, _) in DTYPES.items():
        for d in HEAD_DIMS:
            out.append(
                f"__device__ __forceinline__ void {device_symbol(d, dtype)}(void* q, void* k, void* v, void* o, void* lse, "
                f"void* smem, int qo_len, int kv_len, float scale_log2) {{\n"
                f"  autotune_attention::flash_attention<{ctype}, {d}>((const {ctype}*)q, (const {ctype}*)k, "
                f"(const {ctype}*)v, ({ctype}*)o, ({ctype}*)lse, (unsigned char*)smem, qo_len, kv_len, scale_log2);\n}}\n"
            )
    return "".join(out)


register_device_source([device_symbol(d, t) for t in DTYPES for d in HEAD_DIMS], DEVICE_SOURCE + _entry_points())


def supports(d: int, dtype: str, sm: int) -> bool:
    return d in HEAD_DIMS and dtype in DTYPES and sm >= DTYPES[dtype][2]


def make_primfunc(d: int, dtype: str, scale: float):
    """The scheduled kernel (q, k, v, o, lse) for head_dim `d`; `supports` says where it applies."""
    symbol, nbytes = device_symbol(d, dtype), smem_bytes(d)
    scale_log2 = float(scale) * math.log2(math.e)

    @tvm_compat.prim_func(private=True, s_tir=True)
    def attention(var_q: T.handle, var_k: T.handle, var_v: T.handle, var_o: T.handle, var_lse: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch_size, qo_len, kv_len = T.int32(), T.int32(), T.int32()
        q = T.match_buffer(var_q, (batch_size, qo_len, 1, d), dtype)
        k = T.match_buffer(var_k, (batch_size, kv_len, 1, d), dtype)
        v = T.match_buffer(var_v, (batch_size, kv_len, 1, d), dtype)
        o = T.match_buffer(var_o, (batch_size, qo_len, 1, d), dtype)
        lse = T.match_buffer(var_lse, (batch_size, qo_len, 1), dtype)
        for bx in T.thread_binding((qo_len + BLOCK_M - 1) // BLOCK_M, thread="blockIdx.x"):
            for by in T.thread_binding(batch_size, thread="blockIdx.y"):
                for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                    with T.sblock("attention"):
                        T.reads(q[by, :, 0, :], k[by, :, 0, :], v[by, :, 0, :])
                        T.writes(o[by, :, 0, :], lse[by, :, 0])
                        smem = T.sblock_alloc_buffer((nbytes,), "uint8", scope="shared.dyn")
                        T.evaluate(
                            T.call_extern(
                                "void", symbol, q.data, k.data, v.data, o.data, lse.data, smem.data,
                                qo_len, kv_len, T.float32(scale_log2),
                            )
                        )

    return attention.with_attr(ATTENTION_ATTR, {"d": d, "scale": float(scale), "layout": "BL1D", "tensor_cores": True})
