// Entries of the sm90 families (per-tensor/per-token/per-channel and block-scaled): validate the problem again
// (never trust the caller) and dispatch to the instantiation for the output dtype and the selected config.
#include <cstdint>
#include <string>

#include "../common/check.h"
#include "../dispatch/sm90_configs.h"
#include "fp8kern/fp8kern.h"
#include "sm90_kernels.h"

namespace fp8kern {
namespace {

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Checks shared by both problem types (the Python layer checked already; never trust it).
template <class Problem>
void validate_operands(const Problem& p, const char* what, int64_t min_k) {
  FP8KERN_CHECK(p.m >= 1 && p.n >= 1 && p.k >= min_k, what, ": M=", p.m, " N=", p.n, " K=", p.k,
                ", expected M, N >= 1 and K >= ", min_k, " (empty problems never reach the kernel; pad smaller K)");
  FP8KERN_CHECK(p.m <= INT32_MAX && p.n <= INT32_MAX && p.k <= INT32_MAX, what, ": M, N, K must be < 2^31");
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

}  // namespace

void blockwise_sm90(const BlockGemmProblem& p) {
  validate_operands(p, "blockwise_sm90", 128);
#if defined(FP8KERN_HAS_SM90)
  switch (p.d_dtype) {
    case DType::kBFloat16: sm90::run_block_bf16_tile128x128(p); break;
    case DType::kFloat16: sm90::run_block_fp16_tile128x128(p); break;
    default: sm90::run_block_fp32_tile128x128(p); break;
  }
#else
  FP8KERN_CHECK(false, "blockwise_sm90: this fp8kern._C was built without the sm_90a target (FP8KERN_CUDA_ARCHS=",
                compiled_archs(), "); rebuild with FP8KERN_CUDA_ARCHS including 90a");
#endif
}

bool gemm_family_compiled(const char* family) {
#if defined(FP8KERN_HAS_SM90)
  if (std::string(family) == "sm90") return true;
#endif
  (void)family;
  return false;
}

void scaled_mm_sm90(const GemmProblem& p) {
  validate_operands(p, "scaled_mm_sm90", 1);
  FP8KERN_CHECK(p.config >= -1 && p.config < sm90::kNumConfigs, "scaled_mm_sm90: config=", p.config,
                ", expected -1 (select by shape) or 0..", int(sm90::kNumConfigs) - 1);
#if defined(FP8KERN_HAS_SM90)
  using Launch = void (*)(const GemmProblem&);
  // [output dtype][config id], config order as in csrc/dispatch/sm90_configs.h
  static constexpr Launch kTable[3][sm90::kNumConfigs] = {
      {sm90::run_bf16_swap64x32, sm90::run_bf16_swap64x64, sm90::run_bf16_tile128x128},
      {sm90::run_fp16_swap64x32, sm90::run_fp16_swap64x64, sm90::run_fp16_tile128x128},
      {sm90::run_fp32_swap64x32, sm90::run_fp32_swap64x64, sm90::run_fp32_tile128x128},
  };
  const int row = p.d_dtype == DType::kBFloat16 ? 0 : (p.d_dtype == DType::kFloat16 ? 1 : 2);
  const int id = p.config >= 0 ? p.config : sm90::select_config(p.m, p.n, p.k);
  kTable[row][id](p);
#else
  FP8KERN_CHECK(false, "scaled_mm_sm90: this fp8kern._C was built without the sm_90a target "
                "(FP8KERN_CUDA_ARCHS=", compiled_archs(), "); rebuild with FP8KERN_CUDA_ARCHS including 90a");
#endif
}

}  // namespace fp8kern
