// sm90 grouped kernels (MoE experts), block and row/col scales: fp32 output, 128x128x128 cooperative tiles.
#include "grouped_sm90.cuh"

FP8KERN_SM90_GROUPED_INSTANTIATE(float, run_grouped_fp32)
