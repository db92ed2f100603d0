// Argument checks shared by the GEMM entry points (the Python layer checked already; never trust it).
#pragma once

#include <cstdint>

#include "check.h"

namespace fp8kern {

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <class Problem>
inline void validate_operands(const Problem& p, const char* what, int64_t min_k) {
  FP8KERN_CHECK(p.m >= 1 && p.n >= 1 && p.k >= min_k, what, ": M=", p.m, " N=", p.n, " K=", p.k,
                ", expected M, N >= 1 and K >= ", min_k, " (empty problems never reach the kernel; pad smaller K)");
  // The kernels use 32-bit coordinates, and a ragged last tile reaches up to a tile (<= 256) past the extent.
  constexpr int64_t kMaxDim = (int64_t(1) << 31) - 256;
  FP8KERN_CHECK(p.m < kMaxDim && p.n < kMaxDim && p.k < kMaxDim, what, ": M=", p.m, " N=", p.n, " K=", p.k,
                ", expected each below 2^31 - 256 (32-bit tile coordinates)");
  FP8KERN_CHECK(p.a && p.b && p.d && p.scale_a && p.scale_b, what,
                ": a, b, d, scale_a and scale_b must be non-null device pointers");
  FP8KERN_CHECK(p.lda >= p.k && p.ldb >= p.k && p.ldd >= p.n, what, ": leading dimensions (", p.lda, ", ", p.ldb,
                ", ", p.ldd, ") must be >= (K, K, N) = (", p.k, ", ", p.k, ", ", p.n, ")");
  FP8KERN_CHECK(p.k % 16 == 0 && p.lda % 16 == 0 && p.ldb % 16 == 0 && aligned16(p.a) && aligned16(p.b), what,
                ": K=", p.k, " and the A/B row strides must be multiples of 16 with 16-byte aligned pointers (TMA); "
                "pad K first");
  FP8KERN_CHECK(p.d_dtype == DType::kBFloat16 || p.d_dtype == DType::kFloat16 || p.d_dtype == DType::kFloat32,
                what, ": output dtype ", dtype_name(p.d_dtype), ", expected bfloat16, float16 or float32");
  FP8KERN_CHECK((p.ldd * dtype_size(p.d_dtype)) % 16 == 0 && aligned16(p.d), what, ": output row stride ", p.ldd,
                " x ", dtype_size(p.d_dtype), " bytes must be a multiple of 16 with a 16-byte aligned pointer");
  FP8KERN_CHECK(reinterpret_cast<uintptr_t>(p.scale_a) % 4 == 0 && reinterpret_cast<uintptr_t>(p.scale_b) % 4 == 0,
                what, ": scale pointers must be 4-byte aligned fp32");
  FP8KERN_CHECK(reinterpret_cast<uintptr_t>(p.bias) % dtype_size(p.d_dtype) == 0, what,
                ": bias pointer is not aligned to its dtype");
}

}  // namespace fp8kern
