// sm90 scaled_mm kernels: fp32 output, config CfgSwap64x64 (promoted and fast accumulation).
#include "scaled_mm_sm90.cuh"

FP8KERN_SM90_INSTANTIATE(float, CfgSwap64x64, run_fp32_swap64x64)
