// Entries of the sm90 families (per-tensor/per-token/per-channel and block-scaled): validate the problem again
// (never trust the caller) and dispatch to the instantiation for the output dtype and the selected config.
#include <cstdint>
#include <string>

#include "../common/check.h"
#include "../common/device_info.h"
#include "../common/gemm_checks.h"
#include "../dispatch/gemm_configs.h"
#include "fp8kern/fp8kern.h"
#include "sm90_kernels.h"

namespace fp8kern {

bool gemm_family_compiled(const char* family) {
#if defined(FP8KERN_HAS_SM90)
  if (std::string(family) == "sm90") return true;
#endif
  return std::string(family) == "sm89";  // built for every requested arch
}

#if defined(FP8KERN_HAS_SM90)
namespace {

using Launch = void (*)(const GemmProblem&);
using Workspace = size_t (*)(const GemmProblem&);
// [output dtype][config id], config order as in csrc/dispatch/gemm_configs.h
constexpr Launch kLaunch[3][sm90::kNumConfigs] = {
    {sm90::run_bf16_swap64x32, sm90::run_bf16_swap64x64, sm90::run_bf16_streamk128x128, sm90::run_bf16_tile128x128},
    {sm90::run_fp16_swap64x32, sm90::run_fp16_swap64x64, sm90::run_fp16_streamk128x128, sm90::run_fp16_tile128x128},
    {sm90::run_fp32_swap64x32, sm90::run_fp32_swap64x64, sm90::run_fp32_streamk128x128, sm90::run_fp32_tile128x128},
};
constexpr Workspace kWorkspace[3][sm90::kNumConfigs] = {
    {sm90::run_bf16_swap64x32_workspace, sm90::run_bf16_swap64x64_workspace, sm90::run_bf16_streamk128x128_workspace,
     sm90::run_bf16_tile128x128_workspace},
    {sm90::run_fp16_swap64x32_workspace, sm90::run_fp16_swap64x64_workspace, sm90::run_fp16_streamk128x128_workspace,
     sm90::run_fp16_tile128x128_workspace},
    {sm90::run_fp32_swap64x32_workspace, sm90::run_fp32_swap64x64_workspace, sm90::run_fp32_streamk128x128_workspace,
     sm90::run_fp32_tile128x128_workspace},
};

using BlockLaunch = void (*)(const BlockGemmProblem&);
using BlockWorkspace = size_t (*)(const BlockGemmProblem&);
constexpr BlockLaunch kBlockLaunch[3][sm90::kNumBlockConfigs] = {
    {sm90::run_block_bf16_swap128x32, sm90::run_block_bf16_streamk128x128, sm90::run_block_bf16_tile128x128},
    {sm90::run_block_fp16_swap128x32, sm90::run_block_fp16_streamk128x128, sm90::run_block_fp16_tile128x128},
    {sm90::run_block_fp32_swap128x32, sm90::run_block_fp32_streamk128x128, sm90::run_block_fp32_tile128x128},
};
constexpr BlockWorkspace kBlockWorkspace[3][sm90::kNumBlockConfigs] = {
    {sm90::run_block_bf16_swap128x32_workspace, sm90::run_block_bf16_streamk128x128_workspace,
     sm90::run_block_bf16_tile128x128_workspace},
    {sm90::run_block_fp16_swap128x32_workspace, sm90::run_block_fp16_streamk128x128_workspace,
     sm90::run_block_fp16_tile128x128_workspace},
    {sm90::run_block_fp32_swap128x32_workspace, sm90::run_block_fp32_streamk128x128_workspace,
     sm90::run_block_fp32_tile128x128_workspace},
};

using GroupedLaunch = void (*)(const GroupedGemmProblem&);
using GroupedWorkspace = size_t (*)(const GroupedGemmProblem&);
constexpr GroupedLaunch kGroupedLaunch[3] = {sm90::run_grouped_bf16, sm90::run_grouped_fp16, sm90::run_grouped_fp32};
constexpr GroupedWorkspace kGroupedWorkspace[3] = {sm90::run_grouped_bf16_workspace, sm90::run_grouped_fp16_workspace,
                                                   sm90::run_grouped_fp32_workspace};

int dtype_row(DType d) { return d == DType::kBFloat16 ? 0 : (d == DType::kFloat16 ? 1 : 2); }
// Selection by shape uses the current device's SM count, the same count the CUTLASS kernels are launched with.
int config_id(const GemmProblem& p) {
  return p.config >= 0 ? p.config : sm90::select_config(p.m, p.n, p.k, sm_count(current_device()));
}
int config_id(const BlockGemmProblem& p) {
  return p.config >= 0 ? p.config : sm90::select_block_config(p.m, p.n, p.k, sm_count(current_device()));
}

}  // namespace
#endif

void scaled_mm_sm90(const GemmProblem& p) {
  validate_gemm(p, "sm90");
#if defined(FP8KERN_HAS_SM90)
  kLaunch[dtype_row(p.d_dtype)][config_id(p)](p);
#else
  FP8KERN_CHECK(false, "scaled_mm_sm90: this fp8kern._C was built without the sm_90a target "
                "(FP8KERN_CUDA_ARCHS=", compiled_archs(), "); rebuild with FP8KERN_CUDA_ARCHS including 90a");
#endif
}

void blockwise_sm90(const BlockGemmProblem& p) {
  validate_gemm(p, "sm90_block");
#if defined(FP8KERN_HAS_SM90)
  kBlockLaunch[dtype_row(p.d_dtype)][config_id(p)](p);
#else
  FP8KERN_CHECK(false, "blockwise_sm90: this fp8kern._C was built without the sm_90a target (FP8KERN_CUDA_ARCHS=",
                compiled_archs(), "); rebuild with FP8KERN_CUDA_ARCHS including 90a");
#endif
}

void validate_grouped(const GroupedGemmProblem& p) {
  const char* what = p.block ? "grouped_gemm_sm90 (block scales)" : "grouped_gemm_sm90 (row/col scales)";
  FP8KERN_CHECK(p.groups >= 1 && p.groups < (int64_t(1) << 24), what, ": groups=", p.groups,
                ", expected 1 <= groups < 2^24");
  FP8KERN_CHECK(p.rows >= 0 && p.n >= 1 && p.k >= 128, what, ": rows=", p.rows, " N=", p.n, " K=", p.k,
                ", expected rows >= 0, N >= 1 and K >= 128 (smaller K: run the experts one by one)");
  constexpr int64_t kMaxDim = (int64_t(1) << 31) - 256;  // 32-bit tile coordinates, a ragged tile past the extent
  FP8KERN_CHECK(p.rows < kMaxDim && p.n < kMaxDim && p.k < kMaxDim, what, ": rows=", p.rows, " N=", p.n, " K=", p.k,
                ", expected each below 2^31 - 256");
  FP8KERN_CHECK(p.a && p.b && p.d && p.scale_a && p.scale_b && p.offsets, what,
                ": a, b, d, scale_a, scale_b and offsets must be non-null device pointers");
  FP8KERN_CHECK(p.lda >= p.k && p.ldd >= p.n, what, ": leading dimensions (", p.lda, ", ", p.ldd,
                ") must be >= (K, N) = (", p.k, ", ", p.n, ")");
  FP8KERN_CHECK(p.k % 16 == 0 && p.lda % 16 == 0 && aligned16(p.a) && aligned16(p.b), what, ": K=", p.k,
                " and A's row stride ", p.lda, " must be multiples of 16 with 16-byte aligned A and B (TMA)");
  FP8KERN_CHECK(p.d_dtype == DType::kBFloat16 || p.d_dtype == DType::kFloat16 || p.d_dtype == DType::kFloat32,
                what, ": output dtype ", dtype_name(p.d_dtype), ", expected bfloat16, float16 or float32");
  const int ds = dtype_size(p.d_dtype);
  FP8KERN_CHECK((p.n * ds) % 16 == 0 && (p.ldd * ds) % 16 == 0 && aligned16(p.d), what, ": N=", p.n,
                " and the output row stride ", p.ldd, " x ", ds, " bytes must be multiples of 16 with a 16-byte "
                "aligned pointer (TMA; every group's first row must stay aligned)");
  FP8KERN_CHECK(reinterpret_cast<uintptr_t>(p.scale_a) % 4 == 0 && reinterpret_cast<uintptr_t>(p.scale_b) % 4 == 0 &&
                reinterpret_cast<uintptr_t>(p.offsets) % 8 == 0, what,
                ": scale pointers must be 4-byte aligned fp32 and offsets 8-byte aligned int64");
  FP8KERN_CHECK(reinterpret_cast<uintptr_t>(p.workspace) % 128 == 0, what, ": workspace must be 128-byte aligned "
                "(it holds TMA descriptors)");
}

void grouped_gemm_sm90(const GroupedGemmProblem& p) {
  validate_grouped(p);
#if defined(FP8KERN_HAS_SM90)
  kGroupedLaunch[dtype_row(p.d_dtype)](p);
#else
  FP8KERN_CHECK(false, "grouped_gemm_sm90: this fp8kern._C was built without the sm_90a target "
                "(FP8KERN_CUDA_ARCHS=", compiled_archs(), "); rebuild with FP8KERN_CUDA_ARCHS including 90a");
#endif
}

size_t grouped_workspace_size(const GroupedGemmProblem& p) {
  validate_grouped(p);
#if defined(FP8KERN_HAS_SM90)
  return kGroupedWorkspace[dtype_row(p.d_dtype)](p);
#else
  return 0;
#endif
}

size_t gemm_workspace_size(const BlockGemmProblem& p, const char* family) {
  validate_gemm(p, family);
#if defined(FP8KERN_HAS_SM90)
  if (std::string(family) == "sm90_block") return kBlockWorkspace[dtype_row(p.d_dtype)][config_id(p)](p);
#endif
  return 0;  // the sm89 block kernel uses no workspace
}

size_t gemm_workspace_size(const GemmProblem& p, const char* family) {
  validate_gemm(p, family);
#if defined(FP8KERN_HAS_SM90)
  if (std::string(family) == "sm90") return kWorkspace[dtype_row(p.d_dtype)][config_id(p)](p);
#endif
  return 0;  // the other families' kernels use no workspace
}

}  // namespace fp8kern
