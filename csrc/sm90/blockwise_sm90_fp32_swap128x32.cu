// sm90 block-scaled kernel: fp32 output, swapped A/B, 128 (weights) x 32 (tokens) x 128 cooperative tile, stream-K.
#include "blockwise_sm90.cuh"

FP8KERN_SM90_BLOCK_INSTANTIATE(float, BlockCfgSwap128x32, run_block_fp32_swap128x32)
