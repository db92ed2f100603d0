"""Small problems through every kernel path, for compute-sanitizer (memcheck / racecheck): quantization kernels and
the sm89 scaled_mm families (per-token and block-scaled) on any sm_89+ GPU, the sm90 families on Hopper (forced with
set_backend, since unverified families do not run by default), the grouped MoE kernels among them. Each shape runs
with the config select_config picks (every output dtype) and then with every config of the family's tables forced
(bf16), so every kernel is reached.
PyTorch's caching allocator is switched off: memcheck sees only whole cudaMalloc allocations, so an overrun inside a
cached segment would otherwise go unreported."""

import os

os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")

import torch

import fp8kern
from fp8kern import _backend

families = [f for f in _backend.compiled_families()
            if (f == "sm90" and torch.cuda.get_device_capability() == (9, 0)) or f == "sm89"]
# Naming a family runs the unverified kernels, the quantization kernels included (else the reference would run).
fp8kern.set_backend(families[0] if families else "auto")
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

for family in families:
    fp8kern.set_backend(family)
    layouts = (("token", "channel"), ("tensor", "tensor"), ("group", "block"))
    for M, N, K in ((1, 8, 16), (3, 130, 200), (33, 256, 512), (70, 7, 40), (130, 264, 1000), (300, 260, 272),
                    (128, 256, 2048)):  # the last one runs sm90's stream-K config
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        for act, wg in layouts:
            xq, xs = fp8kern.quantize(x, act)
            wq, ws = fp8kern.quantize_weight(w, wg)
            for out_dtype in (torch.bfloat16, torch.float16, torch.float32):
                bias = torch.randn(N, device="cuda", dtype=out_dtype)
                fp8kern.scaled_mm(xq, wq, xs, ws, out_dtype=out_dtype, bias=bias)
            query = family + "_block" if act == "group" else family
            bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
            for config in range(len(_backend._C.gemm_configs(query))):
                fp8kern.ops.gemm_launch._config_override[query] = config
                try:
                    fp8kern.scaled_mm(xq, wq, xs, ws, bias=bias)
                    if act == "token":
                        fp8kern.scaled_mm(xq, wq, xs, ws, fast_accum=True)
                finally:
                    fp8kern.ops.gemm_launch._config_override.pop(query, None)
if "sm90" in families:  # the grouped MoE kernels: empty groups, ragged tiles, offsets past the rows (clamped)
    fp8kern.set_backend("sm90")
    G, N, K = 5, 264, 400
    wq, ws = zip(*(fp8kern.quantize_weight(torch.randn(N, K, device="cuda"), "block") for _ in range(G)))
    wq, ws = torch.stack(wq), torch.stack(ws)
    xq, xs = fp8kern.quantize(torch.randn(70, K, device="cuda"), "group")
    for offs in ((0, 0, 3, 3, 69, 69), (0, 1, 2, 3, 4, 70), (-5, 0, 0, 0, 40, 500)):
        for out_dtype in (torch.bfloat16, torch.float16, torch.float32):
            y = torch.empty(70, N, device="cuda", dtype=out_dtype)
            fp8kern.grouped_block_mm(xq, xs, wq, ws, torch.tensor(offs, device="cuda"), y)
            fp8kern.grouped_scaled_mm(xq, torch.rand(70, device="cuda"), wq, torch.rand(G, N, device="cuda"),
                                      torch.tensor(offs, device="cuda"), y)
torch.cuda.synchronize()
print("sanitize_smoke: done")
