// Entries of the sm90 families (per-tensor/per-token/per-channel and block-scaled): validate the problem again
// (never trust the caller) and dispatch to the instantiation for the output dtype and the selected config.
#include <cstdint>
#include <string>

#include "../common/check.h"
#include "../common/device_info.h"
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
