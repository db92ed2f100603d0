// sm90 block-scaled kernel: fp16 output, swapped A/B, 128 (weights) x 32 (tokens) x 128 cooperative tile, stream-K.
#include "blockwise_sm90.cuh"

FP8KERN_SM90_BLOCK_INSTANTIATE(cutlass::half_t, BlockCfgSwap128x32, run_block_fp16_swap128x32)
