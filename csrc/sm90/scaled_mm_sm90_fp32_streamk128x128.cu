// sm90 scaled_mm kernels: fp32 output, config CfgStreamK128x128 (promoted and fast accumulation).
#include "scaled_mm_sm90.cuh"

FP8KERN_SM90_INSTANTIATE(float, CfgStreamK128x128, run_fp32_streamk128x128)
