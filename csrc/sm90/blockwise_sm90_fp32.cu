// sm90 block-scaled kernel: fp32 output, 128x128x128 cooperative tile, 1x2 cluster.
#include "blockwise_sm90.cuh"

FP8KERN_SM90_BLOCK_INSTANTIATE(float, BlockCfg128x128, run_block_fp32_tile128x128)
