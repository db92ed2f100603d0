// sm89 block-scaled kernels with fp16 output, every tile config (also built for sm_90a for testing on Hopper).
#include "blockwise_sm89.cuh"

FP8KERN_SM89_BLOCK_INSTANTIATE(__half, run_block_fp16)
