"""torch's own FP8 GEMM as a path of fp8kern.scaled_mm, for GPUs (and layouts) fp8kern has no verified kernel for:
which layouts torch runs where (unsupported_reason, the one statement of that rule), and the glue that meets its
operand, scale and alignment rules so the caller keeps fp8kern's semantics (any M, N, K >= 1, b row-major [N, K],
bias of the output dtype, out= views, every scale dtype).

- per-tensor and per-token x per-channel: torch._scaled_mm (TensorWise / RowWise scaling), on sm_89 and newer GPUs
  and on the CPU. A per-tensor scale mixed with a per-row one is repeated along its dimension (RowWise needs both).
  On a GPU, K and N are padded to multiples of 16 (cuBLASLt's rule): zero columns of a and b, zero rows of b (their
  outputs are dropped). A bias with a float32 output is added after the GEMM in float32 (cuBLASLt takes none there).
- block-scaled 1x128 x 128x128: torch.nn.functional.scaled_mm with BlockWise1x128 x BlockWise128x128 scaling, which
  torch runs on sm_90 only, from torch 2.9 built with CUDA 12.9 (cuBLAS). Its documented scale layouts: a's scales
  [M, K/128] outer-dim-major (stride (1, M)), b's scales [round_up(K/128, 4), N/128] (stride (1, that first dim)),
  K a multiple of 128. blockwise_args builds them.
"""

from __future__ import annotations

import torch

from .. import _backend
from .._constants import BLOCK

# Whether the block-wise glue below has run on an sm_90 GPU against the reference (tests/test_gpu_scaled_mm.py's
# torch-path tests). Until then backend 'auto' does not choose it (block layouts take the dequantizing path) and
# FP8KERN_BACKEND=torch runs it with a warning.
BLOCKWISE_GLUE_VERIFIED = False

_F_SCALED_MM = getattr(torch.nn.functional, "scaled_mm", None)
_SCALING = getattr(torch.nn.functional, "ScalingType", None)


def _cuda_version() -> tuple:
    try:
        return tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    except ValueError:
        return (0, 0)


def _rule(device: torch.device, block: bool, forced: bool) -> str | None:
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no FP8 GEMM (torch._scaled_mm)"
    if device.type == "cpu":
        return "torch's CPU FP8 GEMM has no block-wise scaling" if block else None
    if device.type != "cuda":
        return f"torch's FP8 GEMM does not run on {device.type} tensors"
    if torch.version.hip is not None:
        return "torch's FP8 GEMM on ROCm takes float8_e4m3fnuz operands, not float8_e4m3fn"
    arch = _backend.device_arch(device)
    if arch < 89:
        return f"sm_{arch} has no FP8 tensor cores (torch's FP8 GEMM needs sm_89 or newer)"
    if not block:
        return None
    if arch != 90:
        return f"torch's block-wise FP8 GEMM runs on sm_90 only (this GPU is sm_{arch})"
    if _F_SCALED_MM is None or _SCALING is None or _cuda_version() < (12, 9):
        return (f"torch's block-wise FP8 GEMM needs torch >= 2.9 built with CUDA >= 12.9 (this is torch "
                f"{torch.__version__}, CUDA {torch.version.cuda})")
    if not BLOCKWISE_GLUE_VERIFIED and not forced:
        return ("fp8kern's arguments for torch's block-wise FP8 GEMM have not been run on a GPU yet "
                "(FP8KERN_BACKEND=torch runs them)")
    return None


# (device type, index, block?, out dtype, bias?, forced?) -> reason or None; also holds torch's own refusals.
_reasons: dict = {}


def unsupported_reason(device: torch.device, block: bool, out_dtype: torch.dtype, has_bias: bool,
                       forced: bool = False) -> str | None:
    """Why torch's FP8 GEMM does not take this problem here (None: it does). forced: FP8KERN_BACKEND=torch, which
    also runs glue not yet run on a GPU. Asked on every call on a GPU without a verified fp8kern family: cached."""
    key = (device.type, device.index, block, out_dtype, has_bias, forced)
    try:
        return _reasons[key]
    except KeyError:
        why = _reasons[key] = _rule(device, block, forced)
        return why


def refuse(device: torch.device, block: bool, out_dtype: torch.dtype, has_bias: bool, error: Exception) -> None:
    """torch raised for a problem the rule said it runs (its limits vary by version and GPU): remember it, so this
    kind of problem takes the next path from now on, and say so once."""
    why = f"torch refused it ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    _reasons[(device.type, device.index, block, out_dtype, has_bias, False)] = why
    _backend.warn_once(f"torch-refused-{block}-{out_dtype}-{has_bias}",
                       f"fp8kern: torch's FP8 GEMM {why}; such calls take the dequantizing path from now on")


def run(a, b, scale_a, scale_b, out_dtype, bias, layout, fast_accum, out):
    """The problem (validated, non-empty) through torch's FP8 GEMM; the result written into `out` when given."""
    y = _blockwise(a, b, scale_a, scale_b, out_dtype, bias) if layout.a == "group" else \
        _rowwise(a, b, scale_a, scale_b, out_dtype, bias, layout, fast_accum)
    if out is not None:
        return out.copy_(y)
    return y if y.is_contiguous() else y.contiguous()


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _pad2(t: torch.Tensor, rows: int, cols: int, value: float = 0.0) -> torch.Tensor:
    """t [R, C] grown to [rows, cols], new entries = value (t itself when nothing grows)."""
    if tuple(t.shape) == (rows, cols):
        return t
    p = torch.full((rows, cols), value, dtype=t.dtype, device=t.device)
    p[:t.shape[0], :t.shape[1]] = t
    return p


def _rowwise(a, b, scale_a, scale_b, out_dtype, bias, layout, fast_accum):
    M, K = a.shape
    N = b.shape[0]
    align = 16 if a.is_cuda else 1  # cuBLASLt: K and N multiples of 16
    Kp, Np = _round_up(K, align), _round_up(N, align)
    a = _pad2(a, M, Kp)
    b = _pad2(b, Np, Kp)
    if layout.a == "tensor" and layout.b == "tensor":  # TensorWise: two single-element scales
        sa, sb = scale_a.reshape(()), scale_b.reshape(())
    else:  # RowWise: [M, 1] and [1, N] float32, contiguous
        sa = scale_a.reshape(M, 1) if layout.a == "token" else scale_a.reshape(1, 1).expand(M, 1)
        sb = scale_b.reshape(1, N) if layout.b == "channel" else scale_b.reshape(1, 1).expand(1, N)
        sa, sb = sa.contiguous(), _pad2(sb, 1, Np, 1.0).contiguous()
    fused = bias if bias is not None and out_dtype is not torch.float32 else None
    if fused is not None and Np != N:
        fused = _pad2(fused.reshape(1, N), 1, Np).reshape(Np)
    y = torch._scaled_mm(a, b.t(), sa, sb, bias=fused, out_dtype=out_dtype, use_fast_accum=bool(fast_accum))
    if Np != N:
        y = y[:, :N]
    return y if bias is None or fused is not None else y + bias


def blockwise_args(a, b, scale_a, scale_b):
    """(a, b, scale_a, scale_b) as torch's block-wise GEMM takes them: a [Mp, Kp] and b [Np, Kp] padded with zeros to
    Kp = 128 * ceil(K/128), Mp and Np to multiples of 16; scale_a float32 [Mp, K/128] with stride (1, Mp) (padded rows
    1.0); scale_b float32 [round_up(K/128, 4), ceil(N/128)] with stride (1, its first dim), the transpose of fp8kern's
    [ceil(N/128), ceil(K/128)] with its K blocks padded by 1.0 to a multiple of 4 (they scale no data)."""
    M, K = a.shape
    N = b.shape[0]
    kb, nb = -(-K // BLOCK), -(-N // BLOCK)
    Mp, Np, Kp = _round_up(M, 16), _round_up(N, 16), kb * BLOCK
    L4 = _round_up(kb, 4)
    sa = _pad2(scale_a.float(), Mp, kb, 1.0).t().contiguous().t()
    sb = _pad2(scale_b.float(), nb, L4, 1.0).contiguous().t()
    return _pad2(a, Mp, Kp), _pad2(b, Np, Kp), sa, sb


def _blockwise(a, b, scale_a, scale_b, out_dtype, bias):
    if _F_SCALED_MM is None or _SCALING is None:
        raise NotImplementedError(f"torch {torch.__version__} has no torch.nn.functional.scaled_mm (block-wise FP8)")
    M, N = a.shape[0], b.shape[0]
    a_p, b_p, sa, sb = blockwise_args(a, b, scale_a, scale_b)
    # A bias is added to the float32 result before the one rounding to out_dtype, as fp8kern's kernels add it.
    y = _F_SCALED_MM(a_p, b_p.t(), sa, _SCALING.BlockWise1x128, sb, _SCALING.BlockWise128x128,
                     output_dtype=torch.float32 if bias is not None else out_dtype)[:M, :N]
    return y if bias is None else (y + bias.float()).to(out_dtype)
