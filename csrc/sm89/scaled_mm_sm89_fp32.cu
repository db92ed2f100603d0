// sm89 per-tensor / per-token x per-channel kernels with fp32 output, every tile config (also built for sm_90a for
// testing on Hopper).
#include "scaled_mm_sm89.cuh"

FP8KERN_SM89_INSTANTIATE(float, run_fp32)
