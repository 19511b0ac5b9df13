// Just enough of CUDA to run autotune's tensor-core attention device code on a CPU, for its tests:
// one std::thread per CUDA thread of a block, barriers for __syncthreads/__syncwarp, a shuffle
// through memory, and wmma fragments held whole by every lane (lane 0 stores them). The wmma
// load/store/mma semantics follow the CUDA programming guide: row_major element (r, c) at
// p[r * ldm + c], col_major at p[c * ldm + r]; mma_sync d = a * b + c in float32.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __device__
#define __forceinline__ inline
#define __restrict__

struct Dim3 { int x = 0, y = 0, z = 0; };
thread_local Dim3 threadIdx, blockIdx;

struct uint4 { uint32_t x, y, z, w; };
inline uint4 make_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) { return {a, b, c, d}; }

struct __nv_bfloat16 { uint16_t bits = 0; };
struct half { _Float16 v = 0; };
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u; std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return {uint16_t(u >> 16)};
}
inline half __float2half_rn(float f) { return {(_Float16)f}; }
inline float to_float(__nv_bfloat16 b) { uint32_t u = uint32_t(b.bits) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline float to_float(half h) { return (float)h.v; }
inline float to_float(float f) { return f; }

struct Block {
  std::barrier<> all{128};
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  float shuffle[128];
  Block() { for (int i = 0; i < 4; ++i) warps.emplace_back(new std::barrier<>(32)); }
};
inline Block* current_block = nullptr;
inline void __syncthreads() { current_block->all.arrive_and_wait(); }
inline void __syncwarp() { current_block->warps[threadIdx.x / 32]->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float value, int mask) {
  const int t = threadIdx.x;
  current_block->shuffle[t] = value;
  __syncwarp();
  const float out = current_block->shuffle[(t & ~31) | ((t & 31) ^ mask)];
  __syncwarp();
  return out;
}

namespace nvcuda { namespace wmma {
struct matrix_a {}; struct matrix_b {}; struct accumulator {}; struct row_major {}; struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <typename Use, int M, int N, int K, typename T, typename Layout = void> struct fragment { float x[256]; };
using acc_t = fragment<accumulator, 16, 16, 16, float>;

template <typename Use, typename T, typename L> void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, float v) {
  for (float& e : f.x) e = v;
}
template <typename Use, typename T> void load_matrix_sync(fragment<Use, 16, 16, 16, T, row_major>& f, const T* p, unsigned ldm) {
  for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = to_float(p[r * ldm + c]);
}
template <typename Use, typename T> void load_matrix_sync(fragment<Use, 16, 16, 16, T, col_major>& f, const T* p, unsigned ldm) {
  for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = to_float(p[c * ldm + r]);
}
inline void load_matrix_sync(acc_t& f, const float* p, unsigned ldm, layout_t layout) {
  for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c)
    f.x[r * 16 + c] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
}
inline void store_matrix_sync(float* p, const acc_t& f, unsigned ldm, layout_t layout) {
  if (threadIdx.x % 32 != 0) return;  // every lane holds the whole tile; one writes it
  for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c)
    (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r * 16 + c];
}
template <typename T, typename LA, typename LB>
void mma_sync(acc_t& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a, const fragment<matrix_b, 16, 16, 16, T, LB>& b, const acc_t& c) {
  acc_t out;
  for (int i = 0; i < 16; ++i) for (int j = 0; j < 16; ++j) {
    float s = c.x[i * 16 + j];
    for (int k = 0; k < 16; ++k) s += a.x[i * 16 + k] * b.x[k * 16 + j];
    out.x[i * 16 + j] = s;
  }
  d = out;
}
}}  // namespace nvcuda::wmma

// Run `kernel` over a grid of (gx, gy) blocks of 128 threads, one block at a time.
template <typename F> void launch(int gx, int gy, size_t smem_bytes, F kernel) {
  for (int by = 0; by < gy; ++by) for (int bx = 0; bx < gx; ++bx) {
    Block block;
    current_block = &block;
    std::vector<unsigned char> smem(smem_bytes + 128);
    std::vector<std::thread> threads;
    for (int t = 0; t < 128; ++t) threads.emplace_back([&, t] { threadIdx.x = t; blockIdx.x = bx; blockIdx.y = by; kernel(smem.data()); });
    for (auto& th : threads) th.join();
  }
}
