"""fp8kern.scaled_mm: the API, then validation (ops/validation.py), then the path (gemm_path): a compiled family
(ops/gemm_launch.py), torch's FP8 GEMM (ops/torch_gemm.py), the dequantizing GEMM (ops/dequant_gemm.py) or the
reference. Registered with torch.library so it traces under torch.compile; eager calls skip the dispatcher to keep
host overhead low."""

from __future__ import annotations

import torch

from .. import _backend, reference
from . import cpu_gemm, dequant_gemm, torch_gemm
from . import gemm_launch
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
    """Validated, non-empty problem -> result (written into `out` when given), on the path gemm_path picks."""
    # Value checks live here, not in validation, because they read data (a host sync, and untraceable).
    device = a.device
    block = layout is _BLOCK_LAYOUT
    path = gemm_path(device, block, out_dtype, bias is not None)
    if path != "cpu" and _backend.value_checks_on(device):  # the CPU family checks them as it reads them
        check_values(scale_a, "scale_a")
        check_values(scale_b, "scale_b")
    if _backend._state["print_config"]:
        M, K = a.shape
        N = b.shape[0]
        _backend.note_path("scaled_mm", (M, N, K, layout.name, str(out_dtype)),
                           path_label(path, device, block, out_dtype, bias is not None, M, N, K))
    if path == "cpu":
        return cpu_gemm.run(a, b, scale_a, scale_b, out_dtype, bias, layout, out)
    if path is None:
        result = reference.scaled_mm(a, b, scale_a, scale_b, out_dtype, bias, layout)
        return out.copy_(result) if out is not None else result
    if path == "torch":
        try:
            return torch_gemm.run(a, b, scale_a, scale_b, out_dtype, bias, layout, fast_accum, out)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError) as e:  # torch's limits vary by version and GPU
            if _backend._state["backend"] == "torch":
                raise RuntimeError(f"FP8KERN_BACKEND=torch: torch's FP8 GEMM refused this problem ({e}); unset "
                                   "FP8KERN_BACKEND for the best path this GPU has") from e
            torch_gemm.refuse(device, block, out_dtype, bias is not None, e)
            path = "dequant"
    if path == "dequant":
        if device.type == "cuda" and _backend._state["backend"] == "auto":
            _warn_dequant_once(device, block, out_dtype, bias is not None)
        return dequant_gemm.run(a, b, scale_a, scale_b, out_dtype, bias, layout, out)
    return run_gemm(path, a, b, scale_a, scale_b, out_dtype, bias, layout, fast_accum, out)


def row_gemms(q, s, weight, scale, counts: list, out, layout: Layout, fast_accum: bool, e0: int, r0: int) -> bool:
    """Fp8Experts' per-expert GEMMs after the first, validated one (group e0 on, from row r0), launched from
    addresses on the path gemm_path picks (cpu_gemm.row_gemms, gemm_launch.row_gemms). False, running nothing, where
    that path or the operands need the one-at-a-time loop: other paths, GPU value checks, FP8KERN_PRINT_CONFIG."""
    if _backend._state["print_config"]:
        return False
    device = q.device
    path = gemm_path(device, layout is _BLOCK_LAYOUT, out.dtype, False)
    if path == "cpu":
        return cpu_gemm.row_gemms(q, s, weight, scale, counts, out, layout, e0, r0)
    if path in _backend.FAMILY_ARCH and not _backend.value_checks_on(device):
        return gemm_launch.row_gemms(path, q, s, weight, scale, counts, out, layout, fast_accum, e0, r0)
    return False


def gemm_path(device: torch.device, block: bool, out_dtype: torch.dtype, has_bias: bool) -> str | None:
    """The path a scaled_mm problem takes: 'sm90' / 'sm89' (a compiled GPU family), 'cpu' (the compiled CPU family),
    'torch' (torch's FP8 GEMM), 'dequant' (dequantize, then the ordinary GEMM) or None (the reference).

    Backend 'auto' prefers, on a CUDA device: a verified fp8kern family for it, else torch's FP8 GEMM where it runs
    this layout (torch_gemm.unsupported_reason), else the dequantizing path (warned once, naming the cost); on the CPU
    the CPU family (the reference where fp8kern._cpu is not built). 'reference', 'sm90', 'sm89' take what they name
    (a family that cannot run here is an error), the CPU then taking the reference; 'cpu' takes the CPU family (an
    error on a CUDA device or without the family); 'torch' and 'dequant' take their path on any device ('torch'
    raises for a layout torch does not run here)."""
    backend = _backend._state["backend"]
    if backend == "cpu" or (backend == "auto" and device.type == "cpu"):
        why = _backend.cpu_family_reason() if device.type == "cpu" else f"the tensors are on {device}"
        if why is None and (backend == "cpu" or "cpu" in _backend.VERIFIED_FAMILIES):
            return "cpu"
        if backend == "cpu":
            raise NotImplementedError(f"FP8KERN_BACKEND=cpu: the CPU kernel family cannot run this call: {why}. "
                                      "Unset FP8KERN_BACKEND (or fp8kern.set_backend('auto')) for the best path here")
        return None
    if backend == "dequant":
        return "dequant"
    if backend == "torch":
        why = torch_gemm.unsupported_reason(device, block, out_dtype, has_bias, forced=True)
        if why is not None:
            raise NotImplementedError(f"FP8KERN_BACKEND=torch: {why}. Unset FP8KERN_BACKEND (or "
                                      "fp8kern.set_backend('auto')) for the best path this device has")
        if block and not torch_gemm.BLOCKWISE_GLUE_VERIFIED and device.type == "cuda":
            _backend.warn_once("torch-blockwise-unverified", "fp8kern: the arguments fp8kern builds for torch's "
                               "block-wise FP8 GEMM have not been run on a GPU yet (running them because "
                               "FP8KERN_BACKEND=torch)")
        return "torch"
    family = _backend.compiled_family(device)
    if family is not None or backend != "auto" or device.type != "cuda":
        return family
    return "torch" if torch_gemm.unsupported_reason(device, block, out_dtype, has_bias) is None else "dequant"


def _warn_dequant_once(device: torch.device, block: bool, out_dtype: torch.dtype, has_bias: bool) -> None:
    """Backend 'auto' put a GPU on the dequantizing path: say so once per kind of layout, with the reason and cost."""
    key = f"dequant-{block}"
    if key in _backend._state["warned"]:
        return
    why = torch_gemm.unsupported_reason(device, block, out_dtype, has_bias)
    _backend.warn_once(key, f"fp8kern: {_backend.device_label(device)} runs "
                       f"{'block-scaled' if block else 'per-tensor / per-channel'} FP8 GEMMs by dequantizing the weight "
                       f"on each call ({why}): the FP8 weight stays in memory, each call makes a dequantized copy in "
                       "slices and runs the GPU's 16-bit (or fp32) GEMM, so expect about bf16 GEMM speed plus a pass "
                       "over the weight, not FP8 speed, and a bf16 GEMM's rounding (docs/layouts.md)")


def describe_paths(device: torch.device, out_dtype: torch.dtype = torch.bfloat16) -> dict:
    """{layout: the path scaled_mm takes for it on device under the current backend, and why}, for fp8kern.info()
    and the benchmark. Asks without warning (the warnings a call would give stay due)."""
    warned = set(_backend._state["warned"])
    paths = {}
    try:
        for name, block in (("tensor", False), ("token_channel", False), ("block", True)):
            try:
                path = gemm_path(device, block, out_dtype, False)
                paths[name] = path_label(path, device, block, out_dtype, False, 4096, 4096, 4096)
            except NotImplementedError as e:
                paths[name] = f"error: {e}"
    finally:
        _backend._state["warned"] = warned
    return paths


def path_label(path, device, block, out_dtype, has_bias, M, N, K) -> str:
    """What FP8KERN_PRINT_CONFIG=1 and fp8kern.info() say a path is."""
    if path is None:
        return f"reference ({device.type})"
    if path == "cpu":
        return f"cpu ({_backend.cpu_isa()}, {torch.get_num_threads()} threads)"
    if path == "torch":
        return "torch.nn.functional.scaled_mm (block-wise)" if block else "torch._scaled_mm"
    if path == "dequant":
        why = (torch_gemm.unsupported_reason(device, block, out_dtype, has_bias)
               if _backend._state["backend"] == "auto" else None)
        return "dequantize + GEMM" + (f" ({why})" if why else "")
    return f"{path} {config_label(path, block, M, N, K, device)}"
