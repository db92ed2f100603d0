// sm90 block-scaled kernel: fp32 output, 128x128x128 cooperative tile, stream-K scheduler.
#include "blockwise_sm90.cuh"

FP8KERN_SM90_BLOCK_INSTANTIATE(float, BlockCfgStreamK128x128, run_block_fp32_streamk128x128)
