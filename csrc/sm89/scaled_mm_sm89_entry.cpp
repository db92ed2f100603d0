// Entry of the sm89 per-tensor/per-token/per-channel family: validates the problem again and dispatches by output
// dtype. mma.sync accumulates in fp32 registers, so fast_accum changes nothing here.
#include "../common/gemm_checks.h"
#include "fp8kern/fp8kern.h"

namespace fp8kern {
namespace sm89 {
void run_bf16_tile128x64(const GemmProblem& p);
void run_fp16_tile128x64(const GemmProblem& p);
void run_fp32_tile128x64(const GemmProblem& p);
}  // namespace sm89

void scaled_mm_sm89(const GemmProblem& p) {
  validate_operands(p, "scaled_mm_sm89", 1);
  FP8KERN_CHECK(p.config >= -1 && p.config < 1, "scaled_mm_sm89: config=", p.config, ", expected -1 or 0");
  switch (p.d_dtype) {
    case DType::kBFloat16: sm89::run_bf16_tile128x64(p); break;
    case DType::kFloat16: sm89::run_fp16_tile128x64(p); break;
    default: sm89::run_fp32_tile128x64(p); break;
  }
}

}  // namespace fp8kern
