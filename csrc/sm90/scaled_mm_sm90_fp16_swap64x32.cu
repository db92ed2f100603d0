// sm90 scaled_mm kernels: fp16 output, config CfgSwap64x32 (promoted and fast accumulation).
#include "scaled_mm_sm90.cuh"

FP8KERN_SM90_INSTANTIATE(cutlass::half_t, CfgSwap64x32, run_fp16_swap64x32)
