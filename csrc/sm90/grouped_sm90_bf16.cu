// sm90 grouped kernels (MoE experts), block and row/col scales: bf16 output, 128x128x128 cooperative tiles.
#include "grouped_sm90.cuh"

FP8KERN_SM90_GROUPED_INSTANTIATE(cutlass::bfloat16_t, run_grouped_bf16)
