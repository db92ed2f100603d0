// sm90 grouped block-scaled kernel (MoE experts): fp16 output, 128x128x128 cooperative tile.
#include "grouped_block_sm90.cuh"

FP8KERN_SM90_GROUPED_INSTANTIATE(cutlass::half_t, run_grouped_block_fp16)
