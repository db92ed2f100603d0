"""Launch of the compiled CPU family (fp8kern._cpu, csrc/cpu/) for one validated, non-empty problem on CPU tensors:
the binding's arguments, the output buffer and the thread count.

Scales reach the kernels as fp32: block scales of another dtype (bf16, fp16, UE8M0) are converted, exactly, with a
small copy; per-tensor / per-token / per-channel scales are read as flat vectors. Operand rows may have any stride
(K contiguous); a view whose K is not contiguous is copied. The result is written into `out` directly (any row
stride); a bias of another dtype than the output is cast first.

Scale values (finite and > 0) are checked by the binding as it reads them, before anything is computed: a scan of the
scales in C++, against ~20 us per scale tensor for the same check in torch ops. A bad one raises the message
validation.check_values gives on every other path.

Threads: torch.get_num_threads() of the calling thread, the caller included (csrc/cpu/thread_pool.h says why this
never oversubscribes the machine next to torch's own pool).
"""

from __future__ import annotations

import torch

from .. import _backend
from .._constants import DTYPE_CODE
from .layout import _BLOCK_LAYOUT
from .validation import check_values


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t [R, C] with C contiguous (stride 1) and a row stride the kernels accept."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _ld(t: torch.Tensor) -> int:
    """Row stride as the kernels read it (a one-row tensor's stride is whatever torch says: pass its width)."""
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def run(a, b, scale_a, scale_b, out_dtype, bias, layout, out):
    M, K = a.shape
    N = b.shape[0]
    a, b = _rows(a), _rows(b)
    block = layout is _BLOCK_LAYOUT
    d = out
    if d is None or d.stride(-1) != 1:
        d = torch.empty((M, N), dtype=out_dtype)
    if bias is not None and (bias.dtype != out_dtype or not bias.is_contiguous()):
        bias = bias.to(out_dtype).contiguous()
    if block:
        sa = scale_a if scale_a.dtype is torch.float32 and scale_a.stride(-1) == 1 else scale_a.float().contiguous()
        sb = scale_b if scale_b.dtype is torch.float32 and scale_b.stride(-1) == 1 else scale_b.float().contiguous()
        lds_a, lds_b = _ld(sa), _ld(sb)
    else:
        sa = scale_a if scale_a.is_contiguous() else scale_a.reshape(-1).contiguous()
        sb = scale_b if scale_b.is_contiguous() else scale_b.reshape(-1).contiguous()
        lds_a = lds_b = 0
    bad = _backend._cpu.scaled_mm(a.data_ptr(), b.data_ptr(), d.data_ptr(), M, N, K, _ld(a), _ld(b), _ld(d),
                                  DTYPE_CODE[out_dtype], bias.data_ptr() if bias is not None else 0,
                                  sa.data_ptr(), layout.a == "token", sb.data_ptr(), layout.b == "channel", block,
                                  lds_a, lds_b, torch.get_num_threads(), True)
    if bad:
        refuse_scale(bad, scale_a, scale_b)
    if out is not None and d is not out:
        out.copy_(d)
        return out
    return d


def row_gemms(q, s, weight, scale, counts, out, layout, e0: int, r0: int) -> bool:
    """gemm_launch.row_gemms for the CPU family: group e's counts[e] rows of q times weight[e] into the same rows of
    out, from group e0 and row r0 on, one binding call per group with addresses computed, no tensor view per call.
    Returns False, running nothing, where an operand is not laid out for that (the caller then runs the groups one
    by one). Scale values are checked by the binding, per group; a bad one raises check_values' message for it."""
    rows, K = q.shape
    G, N = weight.shape[0], weight.shape[1]
    block = layout is _BLOCK_LAYOUT
    if (not (q.is_contiguous() and weight.is_contiguous() and s.is_contiguous() and scale.is_contiguous())
            or out.stride(1) != 1 or s.dtype is not torch.float32 or scale.dtype is not torch.float32):
        return False
    isz, ldd, dcode = out.element_size(), out.stride(0), DTYPE_CODE[out.dtype]
    qp, wp, dp, sp, wsp = q.data_ptr(), weight.data_ptr(), out.data_ptr(), s.data_ptr(), scale.data_ptr()
    kb = -(-K // 128)
    per_row = s.numel() == rows and layout.a != "tensor"
    a_step = kb * 4 if block else (4 if per_row else 0)
    w_step = scale.stride(0) * 4
    lds = kb if block else 0
    threads = torch.get_num_threads()
    mm = _backend._cpu.scaled_mm
    r = r0
    for e in range(e0, G):
        c = counts[e]
        if c:
            bad = mm(qp + r * K, wp + e * N * K, dp + r * ldd * isz, c, N, K, K, K, ldd, dcode, 0, sp + r * a_step,
                     per_row, wsp + e * w_step, layout.b == "channel", block, lds, lds, threads, True)
            if bad:
                refuse_scale(bad, s[r:r + c] if per_row or block else s, scale[e])
        r += c
    return True


def refuse_scale(bad: int, scale_a, scale_b) -> None:
    """Raise for the scale the binding found bad (1: scale_a, 2: scale_b) with validation.check_values' message."""
    name, scale = ("scale_a", scale_a) if bad == 1 else ("scale_b", scale_b)
    check_values(scale, name)  # raises, naming the values
    raise ValueError(f"{name} holds non-finite or non-positive values; scales must be finite and > 0")
