// Entries of the sm89 families (per-tensor/per-token/per-channel and block-scaled): validate the problem again and
// dispatch by output dtype and config. The per-token kernels honour fast_accum (see ScaledMm in scaled_mm_sm89.cuh);
// the block kernel always promotes every 128 of K, applying the scales.
#include "../common/device_info.h"
#include "../dispatch/gemm_configs.h"
#include "fp8kern/fp8kern.h"

namespace fp8kern {
namespace sm89 {
void run_bf16(const GemmProblem& p, int config);
void run_fp16(const GemmProblem& p, int config);
void run_fp32(const GemmProblem& p, int config);
void run_block_bf16(const BlockGemmProblem& p, int config);
void run_block_fp16(const BlockGemmProblem& p, int config);
void run_block_fp32(const BlockGemmProblem& p, int config);
}  // namespace sm89

void scaled_mm_sm89(const GemmProblem& p) {
  validate_gemm(p, "sm89");
  const int config = p.config >= 0 ? p.config : sm89::select_config(p.m, p.n, p.k, sm_count(current_device()));
  switch (p.d_dtype) {
    case DType::kBFloat16: sm89::run_bf16(p, config); break;
    case DType::kFloat16: sm89::run_fp16(p, config); break;
    default: sm89::run_fp32(p, config); break;
  }
}

void blockwise_sm89(const BlockGemmProblem& p) {
  validate_gemm(p, "sm89_block");
  const int config = p.config >= 0 ? p.config : sm89::select_block_config(p.m, p.n, p.k, sm_count(current_device()));
  switch (p.d_dtype) {
    case DType::kBFloat16: sm89::run_block_bf16(p, config); break;
    case DType::kFloat16: sm89::run_block_fp16(p, config); break;
    default: sm89::run_block_fp32(p, config); break;
  }
}

}  // namespace fp8kern
