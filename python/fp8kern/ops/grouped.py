"""Grouped GEMMs of mixture-of-experts layers (fp8kern.grouped_block_mm, fp8kern.grouped_scaled_mm): one persistent
sm90 kernel launch over every group, with the row ranges read on the device, or else one scaled_mm per non-empty
group. Registered with torch.library so they trace under torch.compile."""

from __future__ import annotations

import torch

from .. import _backend
from .._constants import DTYPE_CODE
from .gemm import scaled_mm_impl
from .layout import _BLOCK_LAYOUT, Layout
from .validation import check_offsets, check_values, validate_grouped


def grouped_block_mm(a: torch.Tensor, scale_a: torch.Tensor, b: torch.Tensor, scale_b: torch.Tensor,
                     offsets: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Block-scaled GEMMs of a mixture-of-experts layer in one launch: for each group (expert) g,
    out[offsets[g]:offsets[g+1]] = the block-scaled product of the same rows of a (scales scale_a) with b[g]
    (scales scale_b[g]), as fp8kern.scaled_mm computes it. Rows outside every range are left as they were.

    a: [rows, K] e4m3 contiguous, rows sorted by group. scale_a: [rows, ceil(K/128)] (1x128 groups).
    b: [G, N, K] e4m3 contiguous. scale_b: [G, ceil(N/128), ceil(K/128)] (fp32, bf16/fp16 or UE8M0; converted to fp32
    on each call otherwise). offsets: [G + 1] int64 on a's device, non-decreasing from 0 to at most rows: read by the
    kernel only, never by the host, so the call neither synchronizes nor stops CUDA graph capture (each range is
    clamped into [0, rows] on the device; wrong offsets give wrong rows, never an out-of-bounds access).
    out: [rows, N] contiguous, bfloat16, float16 or float32. A view whose data does not start on 16 bytes (TMA's
    alignment) is copied for the kernel (out: computed in a copy and copied back).
    With FP8KERN_CHECK_VALUES=1 the offsets and the scales of the rows in a group are checked on the host.
    Where grouped_supported(...) is false (the CPU, other GPUs, small K), it runs one scaled_mm per non-empty group
    instead, reading the offsets on the host (one synchronization).
    """
    return _grouped_mm("grouped_block_mm", True, a, scale_a, b, scale_b, offsets, out)


def grouped_scaled_mm(a: torch.Tensor, scale_a: torch.Tensor, b: torch.Tensor, scale_b: torch.Tensor,
                      offsets: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """grouped_block_mm with a scale per row of a and one per weight row: for each group g and its rows r,
    out[r, n] = scale_a[r] * scale_b[g, n] * sum_k a[r, k] b[g, n, k] (partial sums promoted to fp32 every 128 of K).

    scale_a: [rows] or [rows, 1] fp32 (per-token scales; repeat a per-tensor scale: scale.expand(rows)).
    scale_b: [G, N] or [G, N, 1] fp32 (per-channel; repeat a per-tensor scale along N). Everything else as
    grouped_block_mm.
    """
    return _grouped_mm("grouped_scaled_mm", False, a, scale_a, b, scale_b, offsets, out)


def grouped_supported(device: torch.device, n: int, k: int, out_dtype: torch.dtype) -> bool:
    """Whether grouped_block_mm / grouped_scaled_mm run on this device as one grouped kernel launch: the sm90 family is
    in use (verified, or chosen with FP8KERN_BACKEND=sm90), K >= 128 and a multiple of 16, and an output row of N
    elements fills whole 16-byte units (TMA). Otherwise they run the groups one GEMM at a time."""
    if k < 128 or k % 16 or (n * out_dtype.itemsize) % 16:
        return False
    try:
        return _backend.compiled_family(device) == "sm90"
    except NotImplementedError:  # FP8KERN_BACKEND names a family this GPU cannot run: the per-group path says why
        return False


# Workspace bytes of the grouped kernels per (device, block?, groups, N, K, out dtype): their per-group argument
# arrays and CUTLASS's TMA descriptors (per SM).
_grouped_ws_bytes: dict = {}


def _grouped_mm(what, block, a, scale_a, b, scale_b, offsets, out) -> torch.Tensor:
    validate_grouped(what, block, a, scale_a, b, scale_b, offsets, out)
    rows, K = a.shape
    G, N = b.shape[0], b.shape[1]
    if rows == 0 or G == 0 or N == 0:  # no group has a row or a column to compute
        return out
    if not grouped_supported(a.device, N, K, out.dtype):
        _grouped_mm_per_group(a, scale_a, b, scale_b, offsets, out, block)
        return out
    if torch.compiler.is_compiling():
        torch.ops.fp8kern.grouped_mm_out(a, scale_a, b, scale_b, offsets, out, block)
    else:
        _grouped_mm_impl(a, scale_a, b, scale_b, offsets, out, block)
    return out


def _grouped_mm_per_group(a, scale_a, b, scale_b, offsets, out, block: bool) -> None:
    """The grouped GEMM as one scaled_mm per non-empty group (the reference on the CPU); reads the offsets on the
    host."""
    rows = a.shape[0]
    G, N = b.shape[0], b.shape[1]
    offs = offsets.tolist()
    check_offsets("grouped_block_mm" if block else "grouped_scaled_mm", offs, rows)
    # The layout is stated, not inferred: a one-row slice's scale would also fit per-tensor.
    layout = _BLOCK_LAYOUT if block else Layout("token", "channel")
    sa = scale_a if block else scale_a.reshape(rows, 1)
    sb = scale_b if block else scale_b.reshape(G, N, 1)
    for g, (lo, hi) in enumerate(zip(offs, offs[1:])):
        if hi > lo:
            scaled_mm_impl(a[lo:hi], b[g], sa[lo:hi], sb[g], out.dtype, None, layout, False, out[lo:hi])


def _grouped_mm_impl(a, scale_a, b, scale_b, offsets, out, block: bool) -> None:
    device = a.device
    rows, K = a.shape
    G, N = b.shape[0], b.shape[1]
    if _backend.value_checks_on(device):
        offs = offsets.tolist()
        check_offsets("grouped_block_mm" if block else "grouped_scaled_mm", offs, rows)
        # Only rows inside a group are read: the others may hold anything (Fp8Experts' rows routed to no expert).
        check_values(scale_a[:offs[-1]], "scale_a")
        check_values(scale_b, "scale_b")
    if _backend._state["print_config"]:
        _backend.note_path("grouped_mm", (block, G, rows, N, K, str(out.dtype)),
                           f"sm90 grouped 128x128x128 ({'block' if block else 'row/col'} scales)")
    # TMA needs 16-byte aligned bases: a view that starts elsewhere is copied (out: computed in a copy, copied back).
    a = a if a.data_ptr() % 16 == 0 else a.clone()
    b = b if b.data_ptr() % 16 == 0 else b.clone()
    d = out if out.data_ptr() % 16 == 0 else out.clone()
    sa = scale_a if scale_a.dtype is torch.float32 and scale_a.is_contiguous() else scale_a.float().contiguous()
    sb = scale_b if scale_b.dtype is torch.float32 and scale_b.is_contiguous() else scale_b.float().contiguous()
    index = device.index
    args = (index, block, a.data_ptr(), b.data_ptr(), d.data_ptr(), sa.data_ptr(), sb.data_ptr(),
            offsets.data_ptr(), G, rows, N, K, a.stride(0) if rows > 1 else K, d.stride(0) if rows > 1 else N,
            DTYPE_CODE[d.dtype])
    key = (index, block, G, N, K, d.dtype)
    need = _grouped_ws_bytes.get(key)
    if need is None:
        need = _grouped_ws_bytes[key] = _backend._C.grouped_workspace_size(*args)
    ws = torch.empty(need + 128, dtype=torch.uint8, device=device)  # the kernel wants a 128-byte aligned start
    _backend._C.grouped_mm(*args, -(-ws.data_ptr() // 128) * 128, need, _backend.current_stream(index))
    if d is not out:
        out.copy_(d)


@torch.library.custom_op("fp8kern::grouped_mm_out", mutates_args=("out",))
def _grouped_mm_op(a: torch.Tensor, scale_a: torch.Tensor, b: torch.Tensor, scale_b: torch.Tensor,
                   offsets: torch.Tensor, out: torch.Tensor, block: bool) -> None:
    if a.shape[0] and b.shape[0] and b.shape[1]:
        _grouped_mm_impl(a, scale_a, b, scale_b, offsets, out, block)


@_grouped_mm_op.register_fake
def _(a, scale_a, b, scale_b, offsets, out, block):
    return None
