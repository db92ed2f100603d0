"""Model GEMM shapes (N, K) = (out_features, in_features) of real FP8 checkpoints, shared by benchmarks and tests."""

SUITES = {
    # Llama-3.1-8B: fused qkv, o_proj, fused gate_up, down_proj
    "llama8b": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)],
    # Llama-3.3-70B: fused qkv, o_proj, fused gate_up, down_proj
    "llama70b": [(10240, 8192), (8192, 8192), (57344, 8192), (8192, 28672)],
    # DeepSeek-V3 dense/MLA projections (128x128 block-scaled checkpoints)
    "deepseek": [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)],
    # Grok-2: 64 q / 8 kv heads of 128 (qkv), o_proj, shared MLP 32768, experts 16384
    "grok2": [(10240, 8192), (8192, 8192), (32768, 8192), (8192, 32768), (16384, 8192), (8192, 16384)],
}

M_VALUES = [1, 16, 64, 128, 256, 1024, 4096, 16384]
QUICK_M = [1, 16, 128, 4096]
