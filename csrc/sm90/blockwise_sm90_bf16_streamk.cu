// sm90 block-scaled kernel: bf16 output, 128x128x128 cooperative tile, stream-K scheduler.
#include "blockwise_sm90.cuh"

FP8KERN_SM90_BLOCK_INSTANTIATE(cutlass::bfloat16_t, BlockCfgStreamK128x128, run_block_bf16_streamk128x128)
