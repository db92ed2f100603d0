// What the CPU family's instruction-set kernels share: the prepared problem, the tile each kernel computes, and the
// exact scalar e4m3 conversion every path agrees with. One kernel file per instruction set (kernel_generic.cpp,
// kernel_avx2.cpp, kernel_avx512.cpp), each compiled with its own target flags; dispatch.cpp picks one at run time.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "fp8kern/cpu.h"
#include "number_formats.h"

namespace fp8kern {
namespace cpu {

constexpr int64_t kChunk = 64;   // K is converted 64 values at a time; A's converted rows are padded to a multiple
constexpr int kTileN = 4;        // rows of B (columns of D) per tile of the AVX-512, AVX2 and portable kernels
constexpr int64_t kARows = 32;   // rows of A per convert_a call (the last group may be shorter)
constexpr int kMaxTileN = 128;   // the most rows of B a tile has (the driver's task size)

// A problem as the kernels see it: the problem, and A converted once per call into the kernel's element type
// (float for generic / avx2, bf16 for avx512), rows padded with zeros to kp (a multiple of kChunk).
struct Prepared {
  const GemmProblem* p = nullptr;
  const void* a = nullptr;
  int64_t kp = 0;
  int64_t kblocks = 0;  // ceil(k / 128)
};

// One instruction set's kernels.
struct Kernels {
  const char* name;
  int tile_n;  // rows of B per tile: divides 128 (so a tile never crosses a 128-row block of B)
  // Bytes of converted A for a problem (m rows of kp elements).
  int64_t (*a_bytes)(int64_t m, int64_t kp);
  // Converts rows [m0, m1) of A into `dst` (the whole converted buffer): m0 a multiple of kARows, m1 - m0 <= kARows.
  void (*convert_a)(const GemmProblem& p, int64_t kp, void* dst, int64_t m0, int64_t m1);
  // Bytes of per-thread scratch the tile kernel needs.
  int64_t (*scratch_bytes)(int64_t m, int64_t kp);
  // c[i * nt + j] for every row i of A and B rows n0 + j, j < nt <= tile_n: the fp32 sum over K, or with block
  // scales the scaled sum of the 128-blocks.
  void (*tile)(const Prepared& pp, int64_t n0, int nt, float* c, void* scratch);
  // D[i, n0 + j] from a tile's sums c: times scale_a[i] * sb[j] unless block-scaled, plus bias[j] where p.bias, in
  // fp32, rounded once to the output type (sb, bias: the tile's per-column factors, fp32, 64-byte aligned).
  void (*epilogue)(const GemmProblem& p, int64_t n0, int nt, const float* c, const float* sb, const float* bias);
};

// The epilogue in portable C++ (gemm.cpp), and the same operations 16 columns at a time in AVX-512
// (epilogue_avx512.cpp: the same bits; the AVX-512 and AMX kernels use it).
void epilogue_rows(const GemmProblem& p, int64_t n0, int nt, const float* c, const float* sb, const float* bias);
void epilogue_rows_avx512(const GemmProblem& p, int64_t n0, int nt, const float* c, const float* sb,
                          const float* bias);

extern const Kernels kGenericKernels;
#ifdef FP8KERN_CPU_AMX
extern const Kernels kAmxKernels;
#endif
#ifdef FP8KERN_CPU_AVX2
extern const Kernels kAvx2Kernels;
#endif
#ifdef FP8KERN_CPU_AVX512
extern const Kernels kAvx512Kernels;
#endif

}  // namespace cpu
}  // namespace fp8kern
