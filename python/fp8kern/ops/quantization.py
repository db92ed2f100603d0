"""Quantization: fp8kern.quantize (activations; the fused CUDA kernel, or the reference), fp8kern.quantize_weight
(weights, once, with torch ops) and as_rows. quantize is registered with torch.library so it traces under
torch.compile; eager calls skip the dispatcher."""

from __future__ import annotations

import math

import torch

from .. import _backend, reference
from .._constants import BLOCK, DTYPE_CODE, E4M3, E8M0, MIN_SCALE
from .validation import check_values, validate_quantize, validate_quantize_weight


def quantize(x: torch.Tensor, granularity: str = "token", group_size: int = BLOCK, scale: torch.Tensor | None = None,
             scale_ub: float | None = None, scale_format: str = "fp32"):
    """Quantize activations x [..., K] (bf16, fp16 or fp32) to float8_e4m3fn. Returns (x_fp8, scale).

    granularity: 'token' (one scale per row, scale shape [..., 1]), 'tensor' (one scale, shape [1]) or 'group'
    (one per group_size columns, shape [..., ceil(K / group_size)]; the last group may be partial).
    Dynamic (scale=None): scale = amax / 448 over the segment (amax first clamped to scale_ub if given), at least
    2**-126 so an all-zero row gets a finite scale; scale_format='ue8m0' rounds it up to a power of two and
    returns float8_e8m0fnu scales. Static: pass fp32 `scale` in the shape above (or (M,) for token).
    x_fp8 = saturate(round(x * (1 / scale))) to +-448 (the reciprocal rounded to fp32 once), round to nearest
    even; never NaN from overflow.
    On CUDA (sm_89 and newer) this is one fused kernel; elsewhere the reference (fp8kern.reference.quantize).
    Under CUDA graph capture pass a static `scale` as a CUDA tensor (a Python float would need a host copy).
    """
    x2, scale, scale_ub, scale_shape = validate_quantize(x, granularity, group_size, scale, scale_ub, scale_format)
    if torch.compiler.is_compiling():
        q2, s = torch.ops.fp8kern.quantize(x2, granularity, group_size, scale, scale_ub, scale_format)
    else:
        q2, s = _quantize_impl(x2, granularity, group_size, scale, scale_ub, scale_format)
    if scale is not None:
        return (q2 if x.dim() == 2 else q2.view(x.shape)), scale
    if x.dim() == 2 and granularity != "tensor":  # the kernel's scale grid is the documented (M, 1) or (M, G)
        return q2, s
    return q2.view(x.shape), s.reshape(scale_shape)


def _quantize_impl(x2: torch.Tensor, granularity: str, group_size: int, scale: torch.Tensor | None,
                   scale_ub: float | None, scale_format: str):
    """Validated 2-D x [M, K] -> (q [M, K] contiguous, scale [M or 1, ceil(K / group) or 1])."""
    M, K = x2.shape
    grid = (M, -(-K // group_size)) if granularity == "group" else (M, 1) if granularity == "token" else (1, 1)
    ue8m0 = scale_format == "ue8m0"
    q = torch.empty((M, K), dtype=E4M3, device=x2.device)
    if scale is not None:
        scale = scale.reshape(grid)
        if _backend.value_checks_on(x2.device):
            check_values(scale, "scale")
    if M == 0:
        s = torch.full(grid, MIN_SCALE, dtype=torch.float32, device=x2.device)
        return q, (scale if scale is not None else (s.to(E8M0) if ue8m0 else s))

    if x2.device.type == "cpu" and _backend.cpu_quant_available():
        return _quantize_cpu(x2, q, granularity, group_size, scale, scale_ub, ue8m0, grid)
    use_kernel = _backend.quant_kernels_available(x2.device)
    if _backend._state["print_config"]:
        _backend.note_path("quantize", (M, K, granularity, str(x2.dtype), "dynamic" if scale is None else "static"),
                           "cuda kernel" if use_kernel else f"reference ({x2.device.type})")
    if not use_kernel:
        why = _backend.quant_fallback_reason(x2.device) if x2.device.type == "cuda" else None
        if why:
            _backend.warn_once("quant-ref", f"fp8kern: {why}")
        q2, s = reference.quantize(x2, granularity, group_size, scale, scale_ub, scale_format)
        q.copy_(q2)
        return q, s.reshape(grid)

    if scale is not None:
        kind, s_out = "static", scale
        s_rs, s_cs = (scale.stride(0) if grid[0] > 1 else 0), (scale.stride(1) if grid[1] > 1 else 0)
    else:
        kind = granularity
        s_out = torch.empty(grid, dtype=E8M0 if ue8m0 else torch.float32, device=x2.device)
        s_rs, s_cs = (grid[1] if grid[0] > 1 else 0), 1
    # Without groups the scale's column stride is 0 and the group size unused; a group wider than K is the row.
    gs = min(group_size, K) if granularity == "group" else 1
    ws = torch.empty(1, dtype=torch.int32, device=x2.device) if kind == "tensor" else None
    index = x2.device.index  # the binding makes this device current for the launch
    _backend._C.quantize(kind, index, x2.data_ptr(), DTYPE_CODE[x2.dtype], M, K, x2.stride(0),
                         q.data_ptr(), q.stride(0), s_out.data_ptr(), DTYPE_CODE[s_out.dtype], s_rs, s_cs, gs,
                         scale_ub if scale_ub is not None else 0.0, ws.data_ptr() if ws is not None else 0,
                         _backend.current_stream(index))
    return q, s_out


_CPU_KIND = {"token": 0, "group": 1, "tensor": 2}


def _quantize_cpu(x2, q, granularity, group_size, scale, scale_ub, ue8m0, grid):
    """The CPU family's quantization (fp8kern._cpu; bit for bit the reference's) into q; returns (q, scale)."""
    M, K = x2.shape
    if scale is not None:
        kind, s_out = 3, scale.float() if scale.dtype != torch.float32 else scale
        s_rs, s_cs = (s_out.stride(0) if grid[0] > 1 else 0), (s_out.stride(1) if grid[1] > 1 else 0)
    else:
        kind = _CPU_KIND[granularity]
        s_out = torch.empty(grid, dtype=E8M0 if ue8m0 else torch.float32)
        s_rs, s_cs = (grid[1] if grid[0] > 1 else 0), 1
    gs = min(group_size, K) if granularity == "group" else 1
    if _backend._state["print_config"]:
        _backend.note_path("quantize", (M, K, granularity, str(x2.dtype), "dynamic" if scale is None else "static"),
                           f"cpu ({_backend.cpu_isa()})")
    _backend._cpu.quantize(kind, x2.data_ptr(), DTYPE_CODE[x2.dtype], M, K, x2.stride(0), q.data_ptr(), q.stride(0),
                           s_out.data_ptr(), ue8m0 and scale is None, s_rs, s_cs, gs,
                           scale_ub if scale_ub is not None else 0.0, torch.get_num_threads())
    return q, (scale if scale is not None else s_out)


@torch.library.custom_op("fp8kern::quantize", mutates_args=())
def _quantize_op(x2: torch.Tensor, granularity: str, group_size: int, scale: torch.Tensor | None,
                 scale_ub: float | None, scale_format: str) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = _quantize_impl(x2, granularity, group_size, scale, scale_ub, scale_format)
    return q, (s.clone() if scale is not None else s)  # a custom op may not return an alias of an input


@_quantize_op.register_fake
def _(x2, granularity, group_size, scale, scale_ub, scale_format):
    M, K = x2.shape
    grid = {"token": (M, 1), "tensor": (1, 1), "group": (M, math.ceil(K / group_size))}[granularity]
    s_dtype = E8M0 if scale_format == "ue8m0" and scale is None else torch.float32
    return x2.new_empty((M, K), dtype=E4M3), x2.new_empty(grid, dtype=s_dtype)


def quantize_weight(w: torch.Tensor, granularity: str = "channel", block_size=(BLOCK, BLOCK), scale_format: str = "fp32"):
    """Quantize a weight w [N, K] (bf16, fp16 or fp32) to float8_e4m3fn, once, with torch ops on w's device.

    granularity: 'channel' (scale [N, 1]), 'tensor' (scale [1]) or 'block' (scale [ceil(N/bn), ceil(K/bk)] for
    block_size (bn, bk), default 128x128; edge blocks may be partial). scale_format='ue8m0' gives power-of-two
    float8_e8m0fnu scales. Returns (w_fp8, scale), ready for fp8kern.scaled_mm as b and scale_b.
    """
    validate_quantize_weight(w, granularity, block_size, scale_format)
    return reference.quantize_weight(w, granularity, tuple(block_size), scale_format)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """Activations [..., K] as [M, K] with a contiguous last dim, copying only when no such view exists (a linear
    layer accepts any input layout; fp8kern.quantize itself never copies and says so instead)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 or x2.shape[-1] == 1 else x2.contiguous()
