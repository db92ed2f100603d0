// sm90 grouped block-scaled kernel (MoE experts): fp32 output, 128x128x128 cooperative tile.
#include "grouped_block_sm90.cuh"

FP8KERN_SM90_GROUPED_INSTANTIATE(float, run_grouped_block_fp32)
