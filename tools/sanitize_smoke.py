"""Small quantization problems through every kernel path, for compute-sanitizer (memcheck / racecheck)."""

import torch

import fp8kern

for dtype in (torch.bfloat16, torch.float16, torch.float32):
    for M, K in ((1, 1), (3, 7), (5, 128), (4, 300), (2, 20000)):
        big = torch.randn(M, K + 9, dtype=dtype, device="cuda")
        for x in (big[:, :K].contiguous(), big[:, 1:K + 1]):  # aligned (vector) and misaligned (scalar) paths
            for g in ("token", "tensor", "group"):
                for fmt in ("fp32", "ue8m0"):
                    fp8kern.quantize(x, g, scale_format=fmt)
            fp8kern.quantize(x, "group", group_size=100)
            fp8kern.quantize(x, "token", scale=torch.full((M,), 0.01, device="cuda"))
            fp8kern.quantize(x, "group", scale=torch.full((M, -(-K // 128)), 0.01, device="cuda"))
torch.cuda.synchronize()
print("sanitize_smoke: done")
