"""Pure-PyTorch reference implementations: the CPU path of fp8kern and the oracle every kernel is tested against.

Every function here states its math in plain torch ops on any device. The CUDA kernels follow the same steps
(`csrc/quant/quant_common.cuh` mirrors `scale_from_amax`), so where the math allows they agree bit for bit.
"""

from __future__ import annotations

import math

import torch

# The oracle stands alone: it imports nothing of fp8kern but these constants, never the code it judges.
from ._constants import BLOCK, E4M3, E4M3_MAX, E8M0, MIN_SCALE

__all__ = [
    "E4M3_MAX", "MIN_SCALE", "scale_from_amax", "activation_amax", "quantize", "quantize_weight", "dequantize", "expand_scale",
    "scaled_mm",
]


def _round_up_pow2(s: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= s, exactly (frexp, not log2): s = m * 2**e with m in [0.5, 1)."""
    m, e = torch.frexp(s)
    pow2 = torch.ldexp(torch.ones_like(s), torch.where(m == 0.5, e - 1, e))
    return torch.where(torch.isfinite(s), pow2, s)


def scale_from_amax(amax: torch.Tensor, scale_ub: float | None = None, ue8m0: bool = False) -> torch.Tensor:
    """fp32 scale for an fp32 amax: min(amax, scale_ub) / 448, floored at MIN_SCALE, optionally rounded up to a
    power of two (UE8M0). NaN propagates (a NaN input gives a NaN scale, never a silently finite one)."""
    amax = amax.float()
    if scale_ub is not None:
        amax = torch.clamp(amax, max=float(scale_ub))
    # A tensor divisor: CUDA's division by a Python scalar multiplies by its reciprocal, which can differ from the
    # correctly rounded quotient (what the kernels and the CPU compute) by one ulp.
    s = torch.clamp(amax / torch.full_like(amax, E4M3_MAX), min=MIN_SCALE)
    return _round_up_pow2(s) if ue8m0 else s


def _to_e4m3(v: torch.Tensor) -> torch.Tensor:
    """Round to nearest even, saturating to +-448 (NaN stays NaN)."""
    return torch.clamp(v, -E4M3_MAX, E4M3_MAX).to(E4M3)


def _apply(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q = e4m3(x * (1 / scale)) with scale broadcast against x; the reciprocal is rounded once, as in the kernels."""
    return _to_e4m3(x.float() * torch.reciprocal(scale.float()))


def _amax(x: torch.Tensor, dim=None, keepdim=False) -> torch.Tensor:
    a = x.float().abs()
    return a.amax() if dim is None else a.amax(dim=dim, keepdim=keepdim)


def quantize(x: torch.Tensor, granularity: str = "token", group_size: int = BLOCK, scale: torch.Tensor | None = None,
             scale_ub: float | None = None, scale_format: str = "fp32"):
    """Activation quantization of x [M, K] (2-D) to e4m3. Returns (q [M, K], scale).

    token: scale [M, 1]; tensor: scale [1]; group: scale [M, ceil(K / group_size)] (last group may be partial).
    With `scale` given (static), x is divided by it (broadcast by the same layout) and returned as given.
    scale_format "ue8m0" rounds dynamic scales up to powers of two and returns them as float8_e8m0fnu.
    """
    if x.dim() != 2:
        raise ValueError(f"reference.quantize expects a 2-D x, got shape {tuple(x.shape)}")
    M, K = x.shape
    group_size = min(group_size, max(K, 1))  # a group wider than the row is the row (and needs no padding)
    ue8m0 = scale_format == "ue8m0"
    if scale is not None:
        return _apply(x, expand_scale(scale.float().reshape(_scale_grid(scale, M, K, granularity, group_size)),
                                      M, K, *_block_of(granularity, M, K, group_size))), scale
    s = scale_from_amax(activation_amax(x, granularity, group_size), scale_ub, ue8m0)
    q = _apply(x, expand_scale(s, M, K, 1, group_size) if granularity == "group" else s)
    return q, (s.to(E8M0) if ue8m0 else s)


def activation_amax(x: torch.Tensor, granularity: str = "token", group_size: int = BLOCK) -> torch.Tensor:
    """fp32 amax of x [M, K] on the grid of its dynamic scales: [M, 1] per token, [1] per tensor (0 when x is
    empty), [M, ceil(K / group_size)] per group (the last group may be partial)."""
    M, K = x.shape
    if granularity == "token":
        return _amax(x, dim=1, keepdim=True)
    if granularity == "tensor":
        return _amax(x).reshape(1) if x.numel() else torch.zeros(1, device=x.device)
    if granularity == "group":
        G = math.ceil(K / group_size)
        return _amax(torch.nn.functional.pad(x.float(), (0, G * group_size - K)).reshape(M, G, group_size), dim=2)
    raise ValueError(f"granularity={granularity!r}, expected 'token', 'tensor' or 'group'")


def _block_of(granularity: str, M: int, K: int, group_size: int):
    return {"token": (1, max(K, 1)), "tensor": (max(M, 1), max(K, 1)), "group": (1, group_size)}[granularity]


def _scale_grid(scale: torch.Tensor, M: int, K: int, granularity: str, group_size: int):
    return {"token": (M, 1), "tensor": (1, 1), "group": (M, math.ceil(K / group_size))}[granularity]


def quantize_weight(w: torch.Tensor, granularity: str = "channel", block_size=(BLOCK, BLOCK), scale_format: str = "fp32"):
    """Weight quantization of w [N, K] to e4m3. Returns (q [N, K], scale).

    channel: scale [N, 1]; tensor: scale [1]; block: scale [ceil(N / bn), ceil(K / bk)] for block_size (bn, bk),
    partial edge blocks take the amax of the elements they hold.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_weight expects a 2-D weight [N, K], got shape {tuple(w.shape)}")
    if granularity in ("channel", "tensor"):
        return quantize(w, "token" if granularity == "channel" else "tensor", scale_format=scale_format)
    if granularity != "block":
        raise ValueError(f"granularity={granularity!r}, expected 'channel', 'tensor' or 'block'")
    bn, bk = block_size
    N, K = w.shape
    gn, gk = math.ceil(N / bn), math.ceil(K / bk)
    wp = torch.nn.functional.pad(w.float(), (0, gk * bk - K, 0, gn * bn - N))
    amax = wp.abs().reshape(gn, bn, gk, bk).amax(dim=(1, 3))
    ue8m0 = scale_format == "ue8m0"
    s = scale_from_amax(amax, ue8m0=ue8m0)
    q = _apply(w, expand_scale(s, N, K, bn, bk))
    return q, (s.to(E8M0) if ue8m0 else s)


def expand_scale(scale: torch.Tensor, rows: int, cols: int, row_block: int, col_block: int) -> torch.Tensor:
    """fp32 [rows, cols] tensor holding, at (r, c), scale[r // row_block, c // col_block] (scale is 2-D)."""
    s = scale.float()
    if s.dim() != 2:
        s = s.reshape(-1, 1) if s.numel() != 1 else s.reshape(1, 1)
    return s.repeat_interleave(row_block, dim=0)[:rows].repeat_interleave(col_block, dim=1)[:, :cols]


def dequantize(q: torch.Tensor, scale: torch.Tensor, block_size=None) -> torch.Tensor:
    """fp32 value of q [R, C] e4m3 with a per-tensor ([1] or scalar), per-row ([R] / [R, 1]) or block scale.

    Block scales [ceil(R / br), ceil(C / bc)] need block_size=(br, bc); without it a 2-D scale of another shape
    is an error, since its block edges could not be known.
    """
    R, C = q.shape
    if scale.numel() == 1:
        return q.float() * scale.float().reshape(1, 1)
    if block_size is None:
        if scale.numel() == R and (scale.dim() == 1 or scale.shape == (R, 1)):
            return q.float() * scale.float().reshape(R, 1)
        raise ValueError(f"dequantize: scale shape {tuple(scale.shape)} fits neither per-tensor nor per-row for q "
                         f"{tuple(q.shape)}; pass block_size=(rows, cols) for a block scale")
    br, bc = block_size
    if tuple(scale.shape) != (math.ceil(R / br), math.ceil(C / bc)):
        raise ValueError(f"dequantize: block scale has shape {tuple(scale.shape)}, expected "
                         f"{(math.ceil(R / br), math.ceil(C / bc))} for q {tuple(q.shape)} and block_size {block_size}")
    return q.float() * expand_scale(scale, R, C, br, bc)


def _block_from_shape(scale: torch.Tensor, rows: int, K: int, name: str) -> tuple:
    """(row, col) edge of the block one scale covers in operand `name` ('a' [M, K] or 'b' [N, K]), read from the
    scale's shape: one scale, one per row, or one per 1x128 group of a / 128x128 block of b. A shape that fits two
    readings (one row, or K <= 128) gives the same numbers under both."""
    if scale.numel() == 1:
        return rows, K
    if tuple(scale.shape) in ((rows,), (rows, 1)):
        return 1, K
    block = (1, BLOCK) if name == "a" else (BLOCK, BLOCK)
    if tuple(scale.shape) == (math.ceil(rows / block[0]), math.ceil(K / BLOCK)):
        return block
    raise ValueError(f"reference.scaled_mm: scale_{name} of shape {tuple(scale.shape)} fits no layout for {name} of "
                     f"shape ({rows}, {K})")


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
              out_dtype: torch.dtype = torch.bfloat16, bias: torch.Tensor | None = None, layout=None) -> torch.Tensor:
    """D = (a * scale_a) @ (b * scale_b).T (+ bias), dequantized operands multiplied with fp32 accumulation.

    a [M, K] and b [N, K] are e4m3. layout (an fp8kern.Layout, or anything with the attributes a in 'tensor' |
    'token' | 'group' and b in 'tensor' | 'channel' | 'block') says how each scale broadcasts; without one each
    scale's block is read from its shape.
    """
    M, K = a.shape
    N = b.shape[0]
    if layout is None:
        a_block, b_block = _block_from_shape(scale_a, M, K, "a"), _block_from_shape(scale_b, N, K, "b")
    else:
        a_block = {"tensor": (M, K), "token": (1, K), "group": (1, BLOCK)}[layout.a]
        b_block = {"tensor": (N, K), "channel": (1, K), "block": (BLOCK, BLOCK)}[layout.b]
    a_deq = a.float() * expand_scale(scale_a, M, K, *a_block)
    b_deq = b.float() * expand_scale(scale_b, N, K, *b_block)
    d = a_deq @ b_deq.t()
    if bias is not None:
        d = d + bias.float()
    return d.to(out_dtype)
