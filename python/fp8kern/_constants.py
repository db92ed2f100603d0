"""Numbers and dtypes every part of fp8kern agrees on, stated once. Imports nothing of fp8kern, so the reference
(the test oracle) can depend on this module alone."""

import torch

E4M3 = torch.float8_e4m3fn
E8M0 = torch.float8_e8m0fnu  # UE8M0: power-of-two scales
E4M3_MAX = 448.0
# Floor of dynamic scales (2**-126, the smallest normal fp32): an all-zero segment gets a finite positive scale.
MIN_SCALE = 2.0**-126
BLOCK = 128  # block edge of the block-scaled GEMM layout (1x128 activations, 128x128 weights)

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # GEMM outputs (and the activations a linear layer takes)
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what quantize / quantize_weight accept
BLOCK_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, E8M0)
# dtype codes of the compiled module (csrc/include/fp8kern/fp8kern.h, enum DType)
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, E4M3: 3, E8M0: 4}
