// sm89 block-scaled kernels with bf16 output, every tile config (also built for sm_90a for testing on Hopper).
#include "blockwise_sm89.cuh"

FP8KERN_SM89_BLOCK_INSTANTIATE(__nv_bfloat16, run_block_bf16)
