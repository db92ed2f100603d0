"""fp8kern.block_fp8_linear: a linear layer over a 128x128-block-scaled weight as two launches (group quantization,
then the block-scaled GEMM)."""

from __future__ import annotations

import torch

from .gemm import scaled_mm
from .quantization import as_rows, quantize
from .validation import validate_block_linear


def block_fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None = None, *, act_scale_format: str = "fp32") -> torch.Tensor:
    """y = x @ W.T (+ bias) for a weight quantized in 128x128 blocks (DeepSeek-V3, Qwen3-FP8, FP8_BLOCK checkpoints).

    x: [..., K] bfloat16, float16 or float32. weight: [N, K] float8_e4m3fn. weight_scale: [ceil(N/128), ceil(K/128)]
    (fp32, bf16, fp16 or float8_e8m0fnu), multiplied into the weight (the checkpoints' weight_scale_inv).
    bias: [N] or None, any float dtype (cast to x's dtype). Returns [..., N] in x's dtype.

    The activations are quantized per 1x128 group (fp8kern.quantize(x, 'group'), the fused kernel on a GPU) and the
    block-scaled GEMM applies both scales in its mainloop: two launches, no host synchronization, and the group
    scales feed the GEMM in the layout the quantizer writes. act_scale_format='ue8m0' rounds the activation scales
    up to powers of two, as DeepSeek-V3's UE8M0 recipe does; the default fp32 scales are more accurate.
    """
    validate_block_linear(x, weight, weight_scale, bias)
    lead = x.shape[:-1]
    q, s = quantize(as_rows(x), "group", scale_format=act_scale_format)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    y = scaled_mm(q, weight, s, weight_scale, out_dtype=x.dtype, bias=bias)
    return y.reshape(*lead, weight.shape[0])
