"""fp8kern.scaled_mm: the API, then validation (ops/validation.py), then dispatch to the reference or a compiled
family (ops/gemm_launch.py). Registered with torch.library so it traces under torch.compile; eager calls skip the
dispatcher to keep host overhead low."""

from __future__ import annotations

import torch

from .. import _backend, reference
from .gemm_launch import config_label, run_gemm
from .layout import _BLOCK_LAYOUT, Layout, infer_layout
from .validation import as_scale, check_values, validate_scaled_mm


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a, scale_b, *, out_dtype: torch.dtype = torch.bfloat16,
              bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
              fast_accum: bool = False) -> torch.Tensor:
    """D[m, n] = scale_a(m, k) * scale_b(n, k) * sum_k a[m, k] b[n, k] (+ bias[n]), computed in fp32 and returned
    as out_dtype, with the layout read from the scale shapes (docs/layouts.md).

    a: [M, K] float8_e4m3fn, row-major. b: [N, K] float8_e4m3fn, row-major (the nn.Linear weight layout).
    scale_a: () / (1,) per-tensor, (M,) / (M, 1) per-token, or (M, ceil(K/128)) per-1x128-group.
    scale_b: () / (1,) per-tensor, (N,) / (N, 1) per-channel, or (ceil(N/128), ceil(K/128)) per-128x128-block.
    Scales are float32; block scales may also be bfloat16, float16 or float8_e8m0fnu (UE8M0). A Python float is
    accepted as a per-tensor scale (it is copied to the device on each call).
    out: optional [M, N] tensor of dtype out_dtype (row stride allowed) that receives the result.
    fast_accum: let the tensor cores accumulate the whole K in their reduced-precision accumulator (faster, less
    accurate at large K); the default promotes partial sums to fp32 every 128 of K (every 64 or 128 on Ada).
    Block-scaled kernels always promote, applying the scales, and ignore it.
    """
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"a must be a torch.Tensor, got {type(a).__name__}")
    scale_a = as_scale(scale_a, "scale_a", a.device)
    scale_b = as_scale(scale_b, "scale_b", a.device)
    layout = validate_scaled_mm(a, b, scale_a, scale_b, out_dtype, bias, out)
    M, N = a.shape[0], b.shape[0]
    if torch.compiler.is_compiling():
        if out is not None:
            torch.ops.fp8kern.scaled_mm_out(a, b, scale_a, scale_b, out_dtype, bias, fast_accum, out)
            return out
        return torch.ops.fp8kern.scaled_mm(a, b, scale_a, scale_b, out_dtype, bias, fast_accum)
    if M == 0 or N == 0:
        return out if out is not None else torch.empty((M, N), dtype=out_dtype, device=a.device)
    return scaled_mm_impl(a, b, scale_a, scale_b, out_dtype, bias, layout, fast_accum, out)


@torch.library.custom_op("fp8kern::scaled_mm", mutates_args=())
def _scaled_mm_op(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                  out_dtype: torch.dtype, bias: torch.Tensor | None, fast_accum: bool) -> torch.Tensor:
    if a.shape[0] == 0 or b.shape[0] == 0:
        return torch.empty((a.shape[0], b.shape[0]), dtype=out_dtype, device=a.device)
    return scaled_mm_impl(a, b, scale_a, scale_b, out_dtype, bias, infer_layout(a, b, scale_a, scale_b), fast_accum)


@_scaled_mm_op.register_fake
def _(a, b, scale_a, scale_b, out_dtype, bias, fast_accum):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


@torch.library.custom_op("fp8kern::scaled_mm_out", mutates_args=("out",))
def _scaled_mm_out_op(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                      out_dtype: torch.dtype, bias: torch.Tensor | None, fast_accum: bool, out: torch.Tensor) -> None:
    if a.shape[0] and b.shape[0]:
        scaled_mm_impl(a, b, scale_a, scale_b, out_dtype, bias, infer_layout(a, b, scale_a, scale_b), fast_accum, out)


@_scaled_mm_out_op.register_fake
def _(a, b, scale_a, scale_b, out_dtype, bias, fast_accum, out):
    return None


def scaled_mm_impl(a, b, scale_a, scale_b, out_dtype, bias, layout: Layout, fast_accum: bool = False,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Validated, non-empty problem -> result (written into `out` when given)."""
    # Value checks live here, not in validation, because they read data (a host sync, and untraceable).
    device = a.device
    if _backend.value_checks_on(device):
        check_values(scale_a, "scale_a")
        check_values(scale_b, "scale_b")
    family = _backend.gemm_family(device)
    if _backend._state["print_config"]:
        M, K = a.shape
        N = b.shape[0]
        what = (f"{family} {config_label(family, layout is _BLOCK_LAYOUT, M, N, K, device)}" if family
                else f"reference ({device.type})")
        _backend.note_path("scaled_mm", (M, N, K, layout.name, str(out_dtype)), what)
    if family is None:
        result = reference.scaled_mm(a, b, scale_a, scale_b, out_dtype, bias, layout)
        return out.copy_(result) if out is not None else result
    return run_gemm(family, a, b, scale_a, scale_b, out_dtype, bias, layout, fast_accum, out)
