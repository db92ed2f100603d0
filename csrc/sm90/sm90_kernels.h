// Launchers of the sm90 kernel instantiations (one .cu file each, so the build parallelizes).
#pragma once

#include <cstddef>

#include "fp8kern/fp8kern.h"

namespace fp8kern::sm90 {

void run_bf16_swap64x32(const GemmProblem& p);
size_t run_bf16_swap64x32_workspace(const GemmProblem& p);
void run_bf16_swap64x64(const GemmProblem& p);
size_t run_bf16_swap64x64_workspace(const GemmProblem& p);
void run_bf16_streamk128x128(const GemmProblem& p);
size_t run_bf16_streamk128x128_workspace(const GemmProblem& p);
void run_bf16_tile128x128(const GemmProblem& p);
size_t run_bf16_tile128x128_workspace(const GemmProblem& p);
void run_fp16_swap64x32(const GemmProblem& p);
size_t run_fp16_swap64x32_workspace(const GemmProblem& p);
void run_fp16_swap64x64(const GemmProblem& p);
size_t run_fp16_swap64x64_workspace(const GemmProblem& p);
void run_fp16_streamk128x128(const GemmProblem& p);
size_t run_fp16_streamk128x128_workspace(const GemmProblem& p);
void run_fp16_tile128x128(const GemmProblem& p);
size_t run_fp16_tile128x128_workspace(const GemmProblem& p);
void run_fp32_swap64x32(const GemmProblem& p);
size_t run_fp32_swap64x32_workspace(const GemmProblem& p);
void run_fp32_swap64x64(const GemmProblem& p);
size_t run_fp32_swap64x64_workspace(const GemmProblem& p);
void run_fp32_streamk128x128(const GemmProblem& p);
size_t run_fp32_streamk128x128_workspace(const GemmProblem& p);
void run_fp32_tile128x128(const GemmProblem& p);
size_t run_fp32_tile128x128_workspace(const GemmProblem& p);
void run_block_bf16_streamk128x128(const BlockGemmProblem& p);
size_t run_block_bf16_streamk128x128_workspace(const BlockGemmProblem& p);
void run_block_bf16_tile128x128(const BlockGemmProblem& p);
size_t run_block_bf16_tile128x128_workspace(const BlockGemmProblem& p);
void run_block_bf16_swap128x32(const BlockGemmProblem& p);
size_t run_block_bf16_swap128x32_workspace(const BlockGemmProblem& p);
void run_block_fp16_streamk128x128(const BlockGemmProblem& p);
size_t run_block_fp16_streamk128x128_workspace(const BlockGemmProblem& p);
void run_block_fp16_tile128x128(const BlockGemmProblem& p);
size_t run_block_fp16_tile128x128_workspace(const BlockGemmProblem& p);
void run_block_fp16_swap128x32(const BlockGemmProblem& p);
size_t run_block_fp16_swap128x32_workspace(const BlockGemmProblem& p);
void run_block_fp32_streamk128x128(const BlockGemmProblem& p);
size_t run_block_fp32_streamk128x128_workspace(const BlockGemmProblem& p);
void run_block_fp32_tile128x128(const BlockGemmProblem& p);
size_t run_block_fp32_tile128x128_workspace(const BlockGemmProblem& p);
void run_block_fp32_swap128x32(const BlockGemmProblem& p);
size_t run_block_fp32_swap128x32_workspace(const BlockGemmProblem& p);
void run_grouped_bf16(const GroupedGemmProblem& p);
size_t run_grouped_bf16_workspace(const GroupedGemmProblem& p);
void run_grouped_fp16(const GroupedGemmProblem& p);
size_t run_grouped_fp16_workspace(const GroupedGemmProblem& p);
void run_grouped_fp32(const GroupedGemmProblem& p);
size_t run_grouped_fp32_workspace(const GroupedGemmProblem& p);

}  // namespace fp8kern::sm90
