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
    a_ptr, b_ptr = a.data_ptr(), b.data_ptr()
    # TMA also needs 16-byte aligned bases: a view with a storage offset is copied like a short K, and so is an
    # operand whose rows are not K apart (scaled_mm refuses one; the custom ops' callers are not validated).
    if k_run != K or a_ptr % 16 or not a.is_contiguous():
        a = _pad_cols(a, k_run)
        a_ptr = a.data_ptr()
    if k_run != K or b_ptr % 16 or not b.is_contiguous():
        b = _pad_cols(b, k_run)
        b_ptr = b.data_ptr()
    align = 16 // out_dtype.itemsize
    device = a.device
    index = device.index
    ld = -(-N // align) * align  # the output's row stride the kernels accept: whole 16-byte units
    d = out
    if d is None or (M > 1 and d.stride(0) % align) or d.data_ptr() % 16:
        d = torch.empty((M, ld), dtype=out_dtype, device=device)
        ldd = ld
        if ld != N:
            d = d[:, :N]
    else:
        ldd = d.stride(0) if M > 1 else ld
    # a and b are contiguous or padded copies: rows k_run apart. (A one-row operand is contiguous whatever its row
    # stride says; the kernels read only its row 0.)
    lda = ldb = k_run
    bias_ptr = bias.data_ptr() if bias is not None else 0
    if block:
        sa = scale_a if scale_a.dtype is torch.float32 and scale_a.is_contiguous() else scale_a.float().contiguous()
        sb = scale_b if scale_b.dtype is torch.float32 and scale_b.is_contiguous() else scale_b.float().contiguous()
        launch(family, True, index, a_ptr, b_ptr, d.data_ptr(), M, N, k_run, lda, ldb, ldd,
               DTYPE_CODE[out_dtype], sa.data_ptr(), False, sb.data_ptr(), False, bias_ptr, fast_accum)
    else:
        # Per-tensor, per-token and per-channel scales are read as flat vectors: a contiguous tensor of any of their
        # shapes ((), (1,), (M,), (M, 1), ...) already is one.
        sa = scale_a if scale_a.is_contiguous() else scale_a.reshape(-1).contiguous()
        sb = scale_b if scale_b.is_contiguous() else scale_b.reshape(-1).contiguous()
        launch(family, False, index, a_ptr, b_ptr, d.data_ptr(), M, N, k_run, lda, ldb, ldd,
               DTYPE_CODE[out_dtype], sa.data_ptr(), layout.a == "token", sb.data_ptr(), layout.b == "channel",
               bias_ptr, fast_accum)
    if out is not None:
        return out if d is out else out.copy_(d)
    return d if ld == N else d.contiguous()


def launch(family: str, block: bool, index: int, a: int, b: int, d: int, M: int, N: int, K: int, lda: int, ldb: int,
           ldd: int, d_code: int, scale_a: int, a_vector: bool, scale_b: int, b_vector: bool, bias: int,
           fast_accum: bool, stream: int | None = None, quantize: tuple | None = None) -> None:
    """One launch of a compiled GEMM family from addresses, on the current stream, with its workspace: the bindings'
    argument orders, stated once (run_gemm, row_gemms and the linear plans launch through here). Block-scaled
    launches read fp32 scales [M, ceil(K/128)] and [ceil(N/128), ceil(K/128)] and ignore the vector flags. stream:
    the current stream's handle where the caller already has it. quantize: (kind, x, x dtype code, x row stride,
    scale row stride, group size, per-tensor scratch) to quantize x [M, K] into a (row stride K) and scale_a (fp32;
    the static scale for kind 'static') in the same binding call, first (fp8kern._C.linear)."""
    if stream is None:
        stream = _backend.current_stream(index)
    if block:
        args = (family, index, a, b, d, M, N, K, lda, ldb, ldd, d_code, scale_a, scale_b, bias,
                _config_override.get(family + "_block", -1))
    else:
        args = (family, index, a, b, d, M, N, K, lda, ldb, ldd, d_code, scale_a, a_vector, scale_b, b_vector, bias,
                bool(fast_accum), _config_override.get(family, -1))
    ws = _launch_workspace(args, block, fast_accum)
    if quantize is not None:
        kind, x, x_code, x_rs, s_rs, group, scratch = quantize
        _backend._C.linear(kind, index, x, x_code, M, K, x_rs, a, scale_a, s_rs, group, scratch, family, block, b, d, N,
                           ldb, ldd, d_code, a_vector, scale_b, b_vector, bias, bool(fast_accum), args[-1],
                           ws.data_ptr(), ws.numel(), stream)
    elif block:
        _backend._C.scaled_mm_block(*args, ws.data_ptr(), ws.numel(), stream)
    else:
        _backend._C.scaled_mm(*args, ws.data_ptr(), ws.numel(), stream)


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


def row_gemms(family, q, s, weight, scale, counts, out, layout, fast_accum, e0: int, r0: int) -> bool:
    """The GEMMs of consecutive row ranges against one weight each (Fp8Experts' per-expert path), from group e0 and
    row r0 on: group e's counts[e] rows of q (scales s, per row or one per-tensor value; per 1x128 group when
    block-scaled) times weight[e] (scale[e]) into the same rows of out. The problems are validated by the caller
    (the first group's went through scaled_mm); the binding's arguments are computed from addresses, with no tensor
    view per launch. Returns False, launching nothing, where an operand needs what run_gemm does per call (padding K,
    aligning an address, converting scales): the caller then runs the groups one by one."""
    rows, K = q.shape
    G, N = weight.shape[0], weight.shape[1]
    block = layout is _BLOCK_LAYOUT
    isz = out.element_size()
    if (_k_run(family, block, K) != K or not (q.is_contiguous() and weight.is_contiguous() and s.is_contiguous()
                                              and scale.is_contiguous() and out.stride(1) == 1)
            or q.data_ptr() % 16 or weight.data_ptr() % 16 or out.data_ptr() % 16 or (out.stride(0) * isz) % 16
            or s.dtype is not torch.float32 or scale.dtype is not torch.float32):
        return False
    index = q.device.index
    dcode, ldd = DTYPE_CODE[out.dtype], out.stride(0)
    qp, wp, dp, sp, wsp = q.data_ptr(), weight.data_ptr(), out.data_ptr(), s.data_ptr(), scale.data_ptr()
    kb = -(-K // 128)
    a_step = kb * 4 if block else (4 if s.numel() == rows else 0)  # scale bytes per row of q
    w_step = scale.stride(0) * 4
    per_row = layout.a == "token"
    r = r0
    for e in range(e0, G):
        c = counts[e]
        if c:
            launch(family, block, index, qp + r * K, wp + e * N * K, dp + r * ldd * isz, c, N, K, K, K, ldd, dcode,
                   sp + r * a_step, per_row, wsp + e * w_step, True, 0, fast_accum)
        r += c
    return True
