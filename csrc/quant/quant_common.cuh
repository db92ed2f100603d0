// Device helpers shared by the activation quantization kernels: 16-byte loads, amax, scale math, e4m3 stores.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/check.h"
#include "../common/convert.cuh"
#include "../common/device_info.h"

namespace fp8kern::quant {

// Elements per 16-byte vector.
template <typename T>
constexpr int kVec = 16 / sizeof(T);

// |v| as fp32 bits. For non-negative floats unsigned order equals numeric order and NaN (0x7fc00000 after
// fabsf) sorts above inf, so an unsigned max over these bits is an amax that propagates NaN like torch.amax.
__device__ __forceinline__ unsigned abs_bits(float v) { return __float_as_uint(fabsf(v)); }

template <typename T>
__device__ __forceinline__ unsigned vec_amax_bits(const uint4& raw) {
  const T* e = reinterpret_cast<const T*>(&raw);
  unsigned m = 0;
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) m = max(m, abs_bits(to_float(e[i])));
  return m;
}

// Scale from amax bits; the reference (python/fp8kern/reference.py, _scale_from_amax) does the same steps.
__device__ __forceinline__ float scale_from_amax(unsigned amax_bits, float scale_ub, bool ue8m0) {
  float amax = __uint_as_float(amax_bits);
  if (scale_ub > 0.0f && amax > scale_ub) amax = scale_ub;  // NaN stays NaN
  float s = __fdiv_rn(amax, kE4M3Max);
  if (s < kMinScale) s = kMinScale;                          // NaN stays NaN
  if (ue8m0) {
    // Round up to a power of two: keep the exponent, bump it when any mantissa bit is set.
    unsigned b = __float_as_uint(s);
    if (b < 0x7f800000u && (b & 0x007fffffu)) b = (b & 0x7f800000u) + 0x00800000u;
    s = __uint_as_float(b);
  }
  return s;
}

__device__ __forceinline__ void store_scale(void* scale, int64_t idx, float s, bool ue8m0) {
  if (ue8m0) {
    // Biased exponent of a power of two; NaN maps to 0xff, the UE8M0 NaN encoding.
    unsigned b = __float_as_uint(s);
    reinterpret_cast<uint8_t*>(scale)[idx] = (b & 0x7fffffffu) > 0x7f800000u ? 0xff : uint8_t(b >> 23);
  } else {
    reinterpret_cast<float*>(scale)[idx] = s;
  }
}

__device__ __forceinline__ uint8_t to_e4m3(float v) {
  // Round to nearest even, saturating finite values to +-448; NaN stays NaN.
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}

// Quantizes n (a multiple of 4) floats into e4m3 bytes packed little-endian into 32-bit words, built with
// shifts so the packing stays in registers.
template <int N>
__device__ __forceinline__ void pack_e4m3(const float (&v)[N], uint32_t (&w)[N / 4]) {
  static_assert(N % 4 == 0, "pack whole 32-bit words");
#pragma unroll
  for (int j = 0; j < N / 4; ++j)
    w[j] = uint32_t(to_e4m3(v[4 * j])) | uint32_t(to_e4m3(v[4 * j + 1])) << 8 |
           uint32_t(to_e4m3(v[4 * j + 2])) << 16 | uint32_t(to_e4m3(v[4 * j + 3])) << 24;
}

// Stores N e4m3 bytes with one 8- or 4-byte write; dst must be aligned to N bytes.
template <int N>
__device__ __forceinline__ void store_words(uint8_t* dst, const uint32_t (&w)[N / 4]) {
  if constexpr (N == 8) *reinterpret_cast<uint2*>(dst) = make_uint2(w[0], w[1]);
  else *reinterpret_cast<uint32_t*>(dst) = w[0];
}

// Quantizes one 16-byte vector of T into kVec<T> e4m3 bytes.
template <typename T>
__device__ __forceinline__ void store_vec_e4m3(uint8_t* dst, const uint4& raw, float inv_scale) {
  constexpr int V = kVec<T>;
  const T* e = reinterpret_cast<const T*>(&raw);
  float v[V];
#pragma unroll
  for (int i = 0; i < V; ++i) v[i] = __fmul_rn(to_float(e[i]), inv_scale);
  uint32_t w[V / 4];
  pack_e4m3<V>(v, w);
  store_words<V>(dst, w);
}

template <typename T>
__device__ __forceinline__ uint4 load_vec(const T* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

__device__ __forceinline__ unsigned warp_max(unsigned v, int width = 32) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
    if (off < width) v = max(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Max over the block; every thread gets the result. blockDim.x must be a multiple of 32.
__device__ __forceinline__ unsigned block_max(unsigned v) {
  __shared__ unsigned partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_max(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < nwarps ? partial[lane] : 0u;
  v = warp_max(v);
  __syncthreads();  // partial may be reused by a later call
  return v;
}

// Launches run<T>() with T the C++ type of the input dtype.
template <typename F>
void dispatch_input(DType t, F&& run) {
  switch (t) {
    case DType::kFloat32: run(float{}); break;
    case DType::kFloat16: run(__half{}); break;
    case DType::kBFloat16: run(__nv_bfloat16{}); break;
    default: FP8KERN_CHECK(false, "x has dtype ", dtype_name(t), ", expected float32, float16 or bfloat16");
  }
}

// True when 16-byte vector loads of x and vector stores of q are aligned for every row.
template <typename T>
bool vector_path_ok(const QuantProblem& p) {
  constexpr int V = kVec<T>;
  return p.cols % V == 0 && p.x_row_stride % V == 0 && p.q_row_stride % V == 0 &&
         reinterpret_cast<uintptr_t>(p.x) % 16 == 0 && reinterpret_cast<uintptr_t>(p.q) % V == 0;
}

constexpr int kMaxThreads = 256;

// Threads per block: whole warps, about one work item each, at most max_threads.
inline int threads_for(int64_t work_items, int max_threads) {
  const int64_t t = (work_items + 31) / 32 * 32;
  return int(t < 32 ? 32 : (t > max_threads ? max_threads : t));
}

// Blocks for a grid-stride loop over n items: enough to fill the GPU a few times over, never more than needed.
inline unsigned grid_stride_blocks(int64_t n, int threads) {
  const int64_t needed = (n + threads - 1) / threads;
  const int64_t cap = int64_t(sm_count(current_device())) * 8;
  return static_cast<unsigned>(needed < 1 ? 1 : (needed < cap ? needed : cap));
}

}  // namespace fp8kern::quant
