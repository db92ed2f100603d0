"""Launch of a compiled GEMM family for one validated problem: the binding's arguments, the padding TMA and cp.async
need (stated costs), the output buffer, the CUTLASS workspace, and the name of the config a problem runs with."""

from __future__ import annotations

import torch

from .. import _backend
from .._constants import DTYPE_CODE
from .layout import _BLOCK_LAYOUT


def run_gemm(family, a, b, scale_a, scale_b, out_dtype, bias, layout, fast_accum, out):
    """Launch a compiled family. Shapes TMA cannot address directly are padded here, at a stated cost:
    K % 16 != 0 (or K < 128 for block-scaled) copies a and b with zero columns appended; an output whose row stride
    is not a multiple of 16 bytes (N not a multiple of 8 for 16-bit outputs, 4 for fp32, or such an `out` view) is
    computed into a buffer with a padded row stride (the kernel writes only the N real columns) and copied.
    Block-scaled scales that are not fp32 row-major are converted (a small copy).
    Runs on every eager call: the common case (aligned shapes, contiguous scales, no `out`) allocates only the
    result and makes few tensor queries."""
    M, K = a.shape
    N = b.shape[0]
    block = layout is _BLOCK_LAYOUT
    k_run = _k_run(family, block, K)
    # TMA also needs 16-byte aligned bases: a view with a storage offset is copied like a short K.
    if k_run != K or a.data_ptr() % 16:
        a = _pad_cols(a, k_run)
    if k_run != K or b.data_ptr() % 16:
        b = _pad_cols(b, k_run)
    align = 16 // out_dtype.itemsize
    index = a.device.index
    d = out
    if d is None or (M > 1 and d.stride(0) % align) or d.data_ptr() % 16:
        ld = -(-N // align) * align
        d = torch.empty((M, ld), dtype=out_dtype, device=a.device)
        if ld != N:
            d = d[:, :N]
    ldd = d.stride(0) if M > 1 else -(-N // align) * align
    # A one-row operand is contiguous whatever its row stride says (torch ignores strides of size-1 dims), and the
    # kernels read only its row 0: pass a stride they accept.
    lda = a.stride(0) if M > 1 else k_run
    ldb = b.stride(0) if N > 1 else k_run
    stream = _backend.current_stream(index)
    bias_ptr = bias.data_ptr() if bias is not None else 0
    if block:
        sa = scale_a if scale_a.dtype is torch.float32 and scale_a.is_contiguous() else scale_a.float().contiguous()
        sb = scale_b if scale_b.dtype is torch.float32 and scale_b.is_contiguous() else scale_b.float().contiguous()
        args = (family, index, a.data_ptr(), b.data_ptr(), d.data_ptr(), M, N, k_run, lda, ldb, ldd,
                DTYPE_CODE[out_dtype], sa.data_ptr(), sb.data_ptr(), bias_ptr,
                _config_override.get(family + "_block", -1))
        ws = _launch_workspace(args, block, fast_accum)
        _backend._C.scaled_mm_block(*args, ws.data_ptr(), ws.numel(), stream)
    else:
        # Per-tensor, per-token and per-channel scales are read as flat vectors: a contiguous tensor of any of their
        # shapes ((), (1,), (M,), (M, 1), ...) already is one.
        sa = scale_a if scale_a.is_contiguous() else scale_a.reshape(-1).contiguous()
        sb = scale_b if scale_b.is_contiguous() else scale_b.reshape(-1).contiguous()
        args = (family, index, a.data_ptr(), b.data_ptr(), d.data_ptr(), M, N, k_run, lda, ldb, ldd,
                DTYPE_CODE[out_dtype], sa.data_ptr(), layout.a == "token", sb.data_ptr(), layout.b == "channel",
                bias_ptr, bool(fast_accum), _config_override.get(family, -1))
        ws = _launch_workspace(args, block, fast_accum)
        _backend._C.scaled_mm(*args, ws.data_ptr(), ws.numel(), stream)
    if out is not None:
        return out if d is out else out.copy_(d)
    return d if d.is_contiguous() else d.contiguous()


# Config forced per query family ('sm90', 'sm89', 'sm90_block', 'sm89_block') instead of select_config's choice:
# for tests that run every config of a table, and for tuning. Empty in normal use.
_config_override: dict = {}


def _k_run(family: str, block: bool, K: int) -> int:
    """K as the kernels see it: padded with zero columns to a multiple of 16 (and to 128 for Hopper's block kernel,
    whose TMA tiles need it). Zero columns add nothing and keep ceil(K/128)."""
    return max(-(-K // 16) * 16, 128 if block and family == "sm90" else 16)


def config_label(family: str, block: bool, M: int, N: int, K: int, device: torch.device) -> str:
    """Name of the config a problem runs with on a device (the forced one when _config_override names one)."""
    query = family + "_block" if block else family
    forced = _config_override.get(query)
    if forced is not None:
        return _backend._C.gemm_configs(query)[forced]
    return _backend.config_name(query, M, N, _k_run(family, block, K), _backend.sm_count(device))


# Workspace bytes per problem shape for sm90 (stream-K needs some; the size depends on the shape, dtype, accumulation
# mode, config and the device's SM count), so the size query runs once per shape.
_ws_bytes: dict = {}


# Workspace handed to CUTLASS kernels, one buffer per device, allocated on first use (before any graph capture), for
# kernels that need at most a small fixed workspace (launch checks the size; stream-K gets its own per call).
_WORKSPACE_BYTES = 1 << 20
_workspaces: dict = {}


def _workspace(index: int) -> torch.Tensor:
    ws = _workspaces.get(index)
    if ws is None:
        ws = _workspaces[index] = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=torch.device("cuda", index))
    return ws


def _launch_workspace(args: tuple, block: bool, fast_accum: bool) -> torch.Tensor:
    """Workspace for a launch with these binding arguments (family, device, a, b, d, M, N, K, ..., config). sm90's
    stream-K configs reduce partial tiles in a per-problem workspace: it comes from the caching allocator on the
    current stream, so it is never shared with a kernel on another stream and is part of a captured graph's pool."""
    family, index, _a, _b, _d, M, N, K, _lda, _ldb, _ldd, d_dtype = args[:12]
    if family != "sm90":
        return _workspace(index)
    key = (block, index, M, N, K, d_dtype, bool(fast_accum), args[-1])  # args[-1]: the config index
    need = _ws_bytes.get(key)
    if need is None:
        if len(_ws_bytes) > 4096:
            _ws_bytes.clear()
        query = _backend._C.block_workspace_size if block else _backend._C.gemm_workspace_size
        need = _ws_bytes[key] = query(*args)
    return torch.empty(need, dtype=torch.uint8, device=torch.device("cuda", index)) if need else _workspace(index)


def _pad_cols(t: torch.Tensor, cols: int) -> torch.Tensor:
    """t [R, C] -> [R, cols] with zero columns appended (zeros add nothing to the K sum)."""
    p = torch.zeros((t.shape[0], cols), dtype=t.dtype, device=t.device)
    p[:, :t.shape[1]] = t
    return p
