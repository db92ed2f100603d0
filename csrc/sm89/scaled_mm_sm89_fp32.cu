// sm89 scaled_mm kernel: fp32 output, 128x64x64 tile, 4 stages (also built for sm_90a for testing on Hopper).
#include "scaled_mm_sm89.cuh"

namespace fp8kern::sm89 {
void run_fp32_tile128x64(const GemmProblem& p) { ScaledMm<Cfg128x64, float>::run(p); }
}  // namespace fp8kern::sm89
