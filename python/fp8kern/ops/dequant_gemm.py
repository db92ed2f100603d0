"""The dequantizing path of fp8kern.scaled_mm, for GPUs with no FP8 GEMM (Ampere, Turing) and layouts no FP8 GEMM
here runs: the FP8 weight stays in memory as it is, and each call dequantizes it on the fly into the output dtype, a
slice of rows at a time, then multiplies with the device's ordinary GEMM in that dtype.

Extra memory per call: the activations in the output dtype ([M, K]) plus one weight slice of at most CHUNK_BYTES
(its float32 product and its copy in the output dtype) and that slice's output. Every layout and scale dtype; no
host synchronization (captures in CUDA graphs).

Numerics: each operand element is dequantized in float32 (x * scale, one rounding) and rounded once to the output
dtype (relative error u: 2^-8 bfloat16, 2^-11 float16, 2^-24 float32), then the GEMM accumulates in float32 (cuBLAS
and the CPU's GEMMs; torch may let cuBLAS reduce 16-bit GEMMs in reduced precision, see
torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction) and rounds once to the output dtype, the bias
added before or after that rounding. So |D - exact| <= (2u + u^2) S + gamma_K S + u |D| (+ u S with a bias), with
S = sum_k |a_k b_k| of the dequantized operands: about a bfloat16 GEMM's error, where fp8kern's FP8 kernels and
torch's FP8 GEMM keep the operands exact and err only in accumulation and the output rounding.
"""

from __future__ import annotations

import torch

from .._constants import BLOCK

# Bytes of float32 weight dequantized at a time (a multiple of 128 rows, at least 128).
CHUNK_BYTES = 64 << 20


def run(a, b, scale_a, scale_b, out_dtype, bias, layout, out):
    """The problem (validated, non-empty) by dequantizing; the result written into `out` when given."""
    M, K = a.shape
    N = b.shape[0]
    rows = max(BLOCK, CHUNK_BYTES // (4 * K) // BLOCK * BLOCK)
    a_deq = torch.empty((M, K), dtype=out_dtype, device=a.device)
    for r0 in range(0, M, rows):
        a_deq[r0:r0 + rows] = _dequantize_rows(a, scale_a, layout.a, r0, min(r0 + rows, M), out_dtype)
    y = out
    if y is None and N > rows:
        y = torch.empty((M, N), dtype=out_dtype, device=a.device)
    for n0 in range(0, N, rows):
        n1 = min(n0 + rows, N)
        w = _dequantize_rows(b, scale_b, layout.b, n0, n1, out_dtype)
        part = a_deq @ w.t() if bias is None else torch.addmm(bias[n0:n1], a_deq, w.t())
        if y is None:
            return part  # one slice: the whole result
        y[:, n0:n1] = part
    return y


def _dequantize_rows(q: torch.Tensor, scale: torch.Tensor, kind: str, r0: int, r1: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """Rows r0:r1 of an e4m3 operand [R, K] times their scales, in float32, rounded once to dtype. kind: 'tensor',
    'token' / 'channel' (one scale per row), 'group' (one per row and 128 of K) or 'block' (one per 128x128 block;
    r0 is then a multiple of 128)."""
    K = q.shape[1]
    x = q[r0:r1].float()
    if kind == "tensor":
        s = scale.float().reshape(1, 1)
    elif kind in ("token", "channel"):
        s = scale.reshape(-1, 1)[r0:r1].float()
    elif kind == "group":
        s = scale[r0:r1].float().repeat_interleave(BLOCK, dim=1)[:, :K]
    else:
        s = scale[r0 // BLOCK:-(-r1 // BLOCK)].float().repeat_interleave(BLOCK, dim=0)[:r1 - r0]
        s = s.repeat_interleave(BLOCK, dim=1)[:, :K]
    return (x * s).to(dtype)
