// sm90 scaled_mm kernels: fp16 output, config CfgStreamK128x128 (promoted and fast accumulation).
#include "scaled_mm_sm90.cuh"

FP8KERN_SM90_INSTANTIATE(cutlass::half_t, CfgStreamK128x128, run_fp16_streamk128x128)
