// Block-scaled FP8 GEMM for Ada (sm_89): 1x128 activation groups x 128x128 weight blocks, both scales applied in the
// mainloop. CUTLASS has no blockwise-scaling mainloop for mma.sync, so this one is written on the PTX building blocks:
//   - cp.async multistage pipeline, 16-byte chunks, zero-filled (nothing read) past M, N and K;
//   - shared memory tiles of 128 bytes per row (the K tile is the 128-wide scale block) with the 16-byte chunk index
//     XOR-swizzled by the row, so the 8 rows an ldmatrix reads hit 8 different bank groups;
//   - ldmatrix.x4 -> mma.sync.m16n8k32 e4m3 into a per-k-block fp32 partial accumulator;
//   - after each 128 of K the partial sums are promoted: acc += partial * scale_a[m, kb] * scale_b[n / 128, kb];
//   - epilogue: + bias in fp32, one rounding to the output dtype, guarded stores (any M, N; row stride ldd).
// The same source compiles for sm_90a, so FP8KERN_BACKEND=sm89 runs it on Hopper for testing.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "../common/check.h"
#include "../common/convert.cuh"
#include "../common/device_info.h"
#include "fp8kern/fp8kern.h"

namespace fp8kern::sm89::block {

constexpr int kBlockK = 128;           // K tile = scale block: exactly one promotion per K tile
constexpr int kChunks = kBlockK / 16;  // 16-byte chunks per shared memory row

// A CTA tile of BM x BN outputs computed by WarpsM x WarpsN warps through a Stages-deep cp.async pipeline.
template <int BM_, int BN_, int WarpsM_, int WarpsN_, int Stages_>
struct Tile {
  static constexpr int BM = BM_, BN = BN_, kWarpsM = WarpsM_, kWarpsN = WarpsN_, kStages = Stages_;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int WM = BM / kWarpsM, WN = BN / kWarpsN;  // warp tile
  static constexpr int MI = WM / 16, NI = WN / 8;              // m16n8k32 atoms per warp along M and N
  static constexpr int kStageBytes = (BM + BN) * kBlockK;
  static constexpr int kSmemBytes = kStages * kStageBytes;
  static_assert(128 % BN == 0, "a tile's columns must lie in one 128-row weight block (one B scale per k-block)");
  static_assert(BM % (16 * kWarpsM) == 0 && WN % 16 == 0, "warp tile: M a multiple of 16, N of 16 (ldmatrix.x4 "
                                                          "loads two n8 atoms)");
  static_assert((BM * kChunks) % kThreads == 0 && (BN * kChunks) % kThreads == 0, "whole chunks per thread");
  static_assert(kStages >= 2, "a pipeline needs at least two stages");
  static_assert(kSmemBytes <= 99 * 1024, "Ada allows at most 99 KB of shared memory per block");
};

template <class ElementD>
struct Params {
  const uint8_t* a;      // [m, lda] e4m3
  const uint8_t* b;      // [n, ldb] e4m3
  ElementD* d;           // [m, ldd]
  const float* scale_a;  // [m, kb] fp32, K-major
  const float* scale_b;  // [ceil(n / 128), kb] fp32, K-major
  const ElementD* bias;  // [n] or null
  int m, n, k, kb;       // kb = ceil(k / 128)
  int64_t lda, ldb, ldd;
  int tiles_m, tiles_n;
};

// Output element traits: fp32 -> ElementD, one value or an adjacent pair (reads go through to_float).
template <class T> struct Out;
template <> struct Out<__nv_bfloat16> {
  using Pair = __nv_bfloat162;
  static __device__ __forceinline__ __nv_bfloat16 cvt(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ Pair cvt2(float a, float b) { return __floats2bfloat162_rn(a, b); }
};
template <> struct Out<__half> {
  using Pair = __half2;
  static __device__ __forceinline__ __half cvt(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ Pair cvt2(float a, float b) { return __floats2half2_rn(a, b); }
};
template <> struct Out<float> {
  using Pair = float2;
  static __device__ __forceinline__ float cvt(float v) { return v; }
  static __device__ __forceinline__ Pair cvt2(float a, float b) { return make_float2(a, b); }
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Byte offset of 16-byte chunk `chunk` of tile row `row`, XOR-swizzled.
__device__ __forceinline__ uint32_t swizzle(int row, int chunk) {
  return static_cast<uint32_t>(row * kBlockK + ((chunk ^ (row & 7)) << 4));
}

// 16 bytes global -> shared; when !pred nothing is read and the 16 bytes are zero-filled.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool pred) {
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// d += A(16x32, row) * B(32x8, col), e4m3 inputs, fp32 accumulators.
__device__ __forceinline__ void mma_e4m3(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// One operand's part of a pipeline stage: ROWS tile rows of 128 bytes from global rows [r0, r0 + ROWS), K columns
// [k0, k0 + 128), each thread copying every THREADS-th 16-byte chunk; chunks past `rows` or `k` are zero-filled.
template <int ROWS, int THREADS>
__device__ __forceinline__ void load_rows(uint32_t smem, const uint8_t* g, int64_t ld, int r0, int rows, int k0,
                                          int k, int tid) {
#pragma unroll
  for (int i = 0; i < ROWS * kChunks / THREADS; ++i) {
    const int c = tid + i * THREADS, row = c / kChunks, chunk = c % kChunks;
    const int gr = r0 + row, gk = k0 + chunk * 16;
    const bool ok = gr < rows && gk < k;
    cp_async_16(smem + swizzle(row, chunk), ok ? g + int64_t(gr) * ld + gk : g, ok);
  }
}

// Accumulator fragments of a warp: MI x NI m16n8 atoms of 4 fp32 values per thread.
template <int MI, int NI>
__device__ __forceinline__ void zero(float (&frag)[MI][NI][4]) {
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) frag[mi][ni][e] = 0.f;
}

// Tile order: groups of 8 M-tiles walk N together, so the B tiles they share are read from L2.
__device__ __forceinline__ void raster(int pid, int tiles_m, int tiles_n, int& tm, int& tn) {
  constexpr int kGroup = 8;
  const int per_group = kGroup * tiles_n;
  const int first = (pid / per_group) * kGroup;
  const int rows = min(tiles_m - first, kGroup);
  const int r = pid % per_group;
  tm = first + r % rows;
  tn = r / rows;
}

template <class T, class ElementD>
__global__ void __launch_bounds__(T::kThreads, 1) blockwise_kernel(const Params<ElementD> p) {
  constexpr int BM = T::BM, BN = T::BN, MI = T::MI, NI = T::NI, kStages = T::kStages, kThreads = T::kThreads;
  extern __shared__ __align__(128) uint8_t smem[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = (warp / T::kWarpsN) * T::WM, warp_n = (warp % T::kWarpsN) * T::WN;
  int tm, tn;
  raster(blockIdx.x, p.tiles_m, p.tiles_n, tm, tn);
  const int m0 = tm * BM, n0 = tn * BN;
  const uint32_t smem_base = smem_addr(smem);

  // Copies K tile kt of A rows [m0, m0 + BM) and B rows [n0, n0 + BN) into pipeline stage s. K is a multiple of 16
  // (checked on the host), so a chunk lies wholly inside or wholly outside the problem.
  auto load_tile = [&](int kt, int s) {
    const int k0 = kt * kBlockK;
    const uint32_t sa = smem_base + s * T::kStageBytes;
    load_rows<BM, kThreads>(sa, p.a, p.lda, m0, p.m, k0, p.k, tid);
    load_rows<BN, kThreads>(sa + BM * kBlockK, p.b, p.ldb, n0, p.n, k0, p.k, tid);
  };

  // Rows of this thread's accumulator fragments: m16n8 atom mi holds rows g and g + 8 (g = lane / 4), columns
  // 2 * (lane % 4) + {0, 1} of atom ni.
  const int g = lane >> 2, t = lane & 3;
  float acc[MI][NI][4];
  zero(acc);

  const int k_tiles = p.kb;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_tile(s, s);
    cp_async_commit();  // one group per stage, empty or not, so wait_group counts stay uniform
  }

  const float* scale_b = p.scale_b + int64_t(n0 / 128) * p.kb;
  for (int kt = 0; kt < k_tiles; ++kt) {
    // Groups 0..kt are complete once at most kStages - 2 newer ones are pending; the barrier publishes every
    // thread's copies and ends all reads of the stage the next load overwrites (read in iteration kt - 1).
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = kt + kStages - 1;
    if (next < k_tiles) load_tile(next, next % kStages);
    cp_async_commit();

    // This k-block's scales; the loads are in flight while the MMAs run. Rows past M take scale 0 (their A rows
    // are zero-filled and never stored).
    float sa[MI][2];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = m0 + warp_m + mi * 16 + h * 8 + g;
        sa[mi][h] = row < p.m ? __ldg(p.scale_a + int64_t(row) * p.kb + kt) : 0.f;
      }
    const float sb = __ldg(scale_b + kt);

    float part[MI][NI][4];
    zero(part);

    const uint32_t sa_tile = smem_base + (kt % kStages) * T::kStageBytes, sb_tile = sa_tile + BM * kBlockK;
#pragma unroll
    for (int kk = 0; kk < kBlockK / 32; ++kk) {
      // A atom (16 rows x 32 bytes) = four 8x16-byte matrices: lanes 0-15 address rows 0-15 of chunk 2kk, lanes
      // 16-31 rows 0-15 of chunk 2kk + 1; registers come back as a0..a3 of the m16n8k32 fragment.
      uint32_t af[MI][4];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
        ldmatrix_x4(af[mi], sa_tile + swizzle(warp_m + mi * 16 + (lane & 15), 2 * kk + (lane >> 4)));
      // Two B atoms (8 rows of N x 32 bytes each) per ldmatrix.x4: lanes 0-7 atom ni chunk 2kk, 8-15 atom ni chunk
      // 2kk + 1, 16-23 atom ni + 1 chunk 2kk, 24-31 atom ni + 1 chunk 2kk + 1 -> b0, b1 of ni, then of ni + 1.
      uint32_t bf[NI][2];
#pragma unroll
      for (int ni = 0; ni < NI; ni += 2) {
        uint32_t r[4];
        ldmatrix_x4(r, sb_tile + swizzle(warp_n + (ni + (lane >> 4)) * 8 + (lane & 7), 2 * kk + ((lane >> 3) & 1)));
        bf[ni][0] = r[0];
        bf[ni][1] = r[1];
        bf[ni + 1][0] = r[2];
        bf[ni + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) mma_e4m3(part[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
    }

    // Promotion: the k-block's partial sums enter the fp32 result with both scales.
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
      const float s0 = sa[mi][0] * sb, s1 = sa[mi][1] * sb;
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        acc[mi][ni][0] = fmaf(part[mi][ni][0], s0, acc[mi][ni][0]);
        acc[mi][ni][1] = fmaf(part[mi][ni][1], s0, acc[mi][ni][1]);
        acc[mi][ni][2] = fmaf(part[mi][ni][2], s1, acc[mi][ni][2]);
        acc[mi][ni][3] = fmaf(part[mi][ni][3], s1, acc[mi][ni][3]);
      }
    }
  }
  cp_async_wait<0>();  // only empty groups can be pending here; leave none behind

  // Epilogue: + bias, one rounding, stores guarded by M and N. A pair store at an even column is aligned because the
  // host checks that d and ldd * sizeof(ElementD) are 16-byte aligned.
  using O = Out<ElementD>;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m0 + warp_m + mi * 16 + h * 8 + g;
      if (row >= p.m) continue;
      ElementD* d_row = p.d + int64_t(row) * p.ldd;
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const int col = n0 + warp_n + ni * 8 + 2 * t;
        if (col >= p.n) continue;
        float v0 = acc[mi][ni][2 * h], v1 = acc[mi][ni][2 * h + 1];
        const bool pair = col + 1 < p.n;
        if (p.bias != nullptr) {
          v0 += to_float(p.bias[col]);
          if (pair) v1 += to_float(p.bias[col + 1]);
        }
        if (pair)
          *reinterpret_cast<typename O::Pair*>(d_row + col) = O::cvt2(v0, v1);
        else
          d_row[col] = O::cvt(v0);
      }
    }
}

// Host launcher for one tile config and output type.
template <class T, class ElementD>
void run(const BlockGemmProblem& p) {
  FP8KERN_CHECK(p.k % 16 == 0 && p.lda % 16 == 0 && p.ldb % 16 == 0, "blockwise_sm89: K and the A/B row strides "
                "must be multiples of 16 (16-byte cp.async chunks); pad K first");
  Params<ElementD> k;
  k.a = static_cast<const uint8_t*>(p.a);
  k.b = static_cast<const uint8_t*>(p.b);
  k.d = static_cast<ElementD*>(p.d);
  k.scale_a = p.scale_a;
  k.scale_b = p.scale_b;
  k.bias = static_cast<const ElementD*>(p.bias);
  k.m = int(p.m);
  k.n = int(p.n);
  k.k = int(p.k);
  k.kb = int((p.k + kBlockK - 1) / kBlockK);
  k.lda = p.lda;
  k.ldb = p.ldb;
  k.ldd = p.ldd;
  const int64_t tiles_m = (p.m + T::BM - 1) / T::BM, tiles_n = (p.n + T::BN - 1) / T::BN;
  FP8KERN_CHECK(tiles_m * tiles_n <= INT32_MAX, "blockwise_sm89: M=", p.m, " N=", p.n, " needs ", tiles_m * tiles_n,
                " tiles, more than one launch can hold (2^31 - 1)");
  k.tiles_m = int(tiles_m);
  k.tiles_n = int(tiles_n);

  // More than 48 KB of dynamic shared memory is opt-in, once per device.
  auto kernel = blockwise_kernel<T, ElementD>;
  static std::atomic<uint64_t> opted_in{0};
  const int dev = current_device();
  const uint64_t bit = dev < 64 ? uint64_t(1) << dev : 0;
  if (bit == 0 || !(opted_in.load(std::memory_order_acquire) & bit)) {
    int limit = 0;
    FP8KERN_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    FP8KERN_CHECK(T::kSmemBytes <= limit, "blockwise_sm89: the tile needs ", T::kSmemBytes,
                  " bytes of shared memory, this GPU allows ", limit, " per block");
    FP8KERN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, T::kSmemBytes));
    opted_in.fetch_or(bit, std::memory_order_release);
  }
  kernel<<<unsigned(tiles_m * tiles_n), T::kThreads, T::kSmemBytes, p.stream>>>(k);
  FP8KERN_CUDA_CHECK(cudaGetLastError());
}

// Configs (ids and names in csrc/dispatch/gemm_configs.cpp). Ada has 99 KB of shared memory per block and 64K
// registers per SM; each config runs one CTA per SM.
using Tile32x32 = Tile<32, 32, 2, 2, 4>;     // decode: many CTAs over N, 32 KB shared, 128 threads
using Tile64x128 = Tile<64, 128, 2, 4, 4>;   // mid M: 96 KB shared, 256 threads, 32x32 warp tiles
using Tile128x128 = Tile<128, 128, 2, 4, 3>; // large M: 96 KB shared, 256 threads, 64x32 warp tiles

}  // namespace fp8kern::sm89::block

#define FP8KERN_SM89_BLOCK_INSTANTIATE(ElementD, NAME)                                                       \
  namespace fp8kern::sm89 {                                                                                  \
  void NAME(const BlockGemmProblem& p, int config) {                                                         \
    switch (config) {                                                                                        \
      case 0: block::run<block::Tile32x32, ElementD>(p); break;                                              \
      case 1: block::run<block::Tile64x128, ElementD>(p); break;                                             \
      default: block::run<block::Tile128x128, ElementD>(p); break;                                           \
    }                                                                                                        \
  }                                                                                                          \
  }
