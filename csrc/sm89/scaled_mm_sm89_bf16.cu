// sm89 per-tensor / per-token x per-channel kernels with bf16 output, every tile config (also built for sm_90a for
// testing on Hopper).
#include "scaled_mm_sm89.cuh"

FP8KERN_SM89_INSTANTIATE(cutlass::bfloat16_t, run_bf16)
