// Entries of the sm89 families (per-tensor/per-token/per-channel and block-scaled): validate the problem again and
// dispatch by output dtype and config. fast_accum is ignored: both families always promote. Ada's FP8 mma.sync adds
// into its accumulator with reduced precision, so CUTLASS's sm89 mainloop sums each CTA K tile (128 or 64 of K) in
// a fresh partial accumulator and adds that to the fp32 total (staged accumulation, chosen by OpMultiplyAdd), and
// the block kernel promotes every 128 of K with the scales.
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
