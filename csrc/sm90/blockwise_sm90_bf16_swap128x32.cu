// sm90 block-scaled kernel: bf16 output, swapped A/B, 128 (weights) x 32 (tokens) x 128 cooperative tile, stream-K.
#include "blockwise_sm90.cuh"

FP8KERN_SM90_BLOCK_INSTANTIATE(cutlass::bfloat16_t, BlockCfgSwap128x32, run_block_bf16_swap128x32)
