"""Argument checks of the operations, in the order a call meets them. Everything here but check_values reads no
tensor data (no host synchronization; safe under torch.compile and CUDA graph capture) and is written for host
overhead: each check is a cheap test on the common path, and its message is built only when it fails. Every
message names the argument and the fix."""

from __future__ import annotations

import torch

from .._constants import BLOCK, BLOCK_SCALE_DTYPES, E4M3, INPUT_DTYPES, OUT_DTYPES
from .layout import _BLOCK_LAYOUT, Layout, infer_layout

_FP32_MAX = torch.finfo(torch.float32).max
_FP32_TRUE_MIN = 2.0 ** -149  # smallest positive (subnormal) fp32


def shape_of(t) -> tuple:
    return tuple(t.shape)


def describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return f"type {type(t).__name__}"
    strides = "" if t.is_contiguous() else f", non-contiguous strides {t.stride()}"
    return f"shape {shape_of(t)}, dtype {t.dtype}{strides}"


def as_scale(s, name: str, device: torch.device) -> torch.Tensor:
    if isinstance(s, torch.Tensor):
        return s
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        return torch.tensor(float(s), dtype=torch.float32, device=device)
    raise TypeError(f"{name} must be a torch.Tensor (or a Python float for a per-tensor scale), got {type(s).__name__}")


def check_values(s: torch.Tensor, name: str) -> None:
    """Scales must be finite and > 0: a NaN, inf, zero or negative scale poisons or flips the result."""
    v = s.detach().float().reshape(-1)
    bad = ~(torch.isfinite(v) & (v > 0))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"{name} holds {int(bad.sum())} non-finite or non-positive value(s) (first at flat index {i}: "
                         f"{float(v[i])}); scales must be finite and > 0")


def check_fp8_operand(t, name: str, shape_doc: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != E4M3:
        raise TypeError(f"{name} has dtype {t.dtype}, expected torch.float8_e4m3fn; quantize it with "
                        f"{'fp8kern.quantize' if name == 'a' else 'fp8kern.quantize_weight'}")
    if t.dim() != 2:
        raise ValueError(f"{name} has shape {shape_of(t)}, expected 2-D {shape_doc}"
                         + ("; flatten leading dims with a.reshape(-1, a.shape[-1])" if name == "a" else ""))


def validate_scaled_mm(a, b, scale_a, scale_b, out_dtype, bias, out) -> Layout:
    """All checks that read no tensor data; returns the layout. Written for host overhead: each check is a cheap
    test on the common path, and the message is built only when it fails."""
    check_fp8_operand(a, "a", "[M, K]")
    check_fp8_operand(b, "b", "[N, K] (the nn.Linear weight layout)")
    M, K = a.shape
    N, Kb = b.shape
    if Kb != K:
        raise ValueError(f"a has K={K} columns but b has shape {shape_of(b)}; expected b of shape (N, {K}) "
                         f"(row-major [N, K]; for a [K, N] weight pass w.t().contiguous())")
    if K == 0:
        raise ValueError("a and b have K=0 columns; expected K >= 1")
    if not a.is_contiguous():
        not_row_major(a, "a")
    if not b.is_contiguous():
        not_row_major(b, "b")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype={out_dtype}, expected one of torch.bfloat16, torch.float16, torch.float32")
    layout = infer_layout(a, b, scale_a, scale_b)
    if layout is _BLOCK_LAYOUT:
        for s, name in ((scale_a, "scale_a"), (scale_b, "scale_b")):
            if s.dtype not in BLOCK_SCALE_DTYPES:
                raise TypeError(f"{name} has dtype {s.dtype}, expected float32, bfloat16, float16 or float8_e8m0fnu")
    elif scale_a.dtype is not torch.float32 or scale_b.dtype is not torch.float32:
        s, name = (scale_a, "scale_a") if scale_a.dtype is not torch.float32 else (scale_b, "scale_b")
        raise TypeError(f"{name} has dtype {s.dtype}, expected torch.float32 for the {layout.name} layout "
                        f"(UE8M0 and 16-bit scales are for the block-scaled layout); call {name}.float()")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.dim() != 1 or bias.shape[0] != N:
            raise ValueError(f"bias has shape {shape_of(bias)}, expected (N,)=({N},)")
        if bias.dtype != out_dtype:
            # The epilogue adds the bias in out_dtype's precision as loaded; a silent conversion would hide a copy.
            raise TypeError(f"bias has dtype {bias.dtype} but out_dtype={out_dtype}; pass bias.to({out_dtype})")
        if not bias.is_contiguous():
            raise ValueError(f"bias has strides {bias.stride()}, expected contiguous; call bias.contiguous()")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
        if shape_of(out) != (M, N):
            raise ValueError(f"out has shape {shape_of(out)}, expected (M, N)=({M}, {N})")
        if out.dtype != out_dtype:
            raise TypeError(f"out has dtype {out.dtype} but out_dtype={out_dtype}; they must match")
        if N > 1 and out.stride(1) != 1 or M > 1 and out.stride(0) < N:
            raise ValueError(f"out has strides {out.stride()}, expected row-major rows (stride (ld, 1) with ld >= {N})")
    device = a.device
    if (b.device != device or scale_a.device != device or scale_b.device != device
            or bias is not None and bias.device != device or out is not None and out.device != device):
        for name, t in (("b", b), ("scale_a", scale_a), ("scale_b", scale_b), ("bias", bias), ("out", out)):
            if t is not None and t.device != device:
                raise ValueError(f"{name} is on {t.device} but a is on {device}; all tensors must be on one device")
    return layout


def not_row_major(t: torch.Tensor, name: str) -> None:
    hint = (" (a transposed view, like torch._scaled_mm's column-major operand: fp8kern takes b as "
            "row-major [N, K], so pass the weight itself or .contiguous())") if t.t().is_contiguous() else ""
    raise ValueError(f"{name} of shape {shape_of(t)} has strides {t.stride()}, expected a contiguous row-major "
                     f"tensor{hint}; call {name}.contiguous()")


def validate_quantize(x, granularity, group_size, scale, scale_ub, scale_format):
    """quantize's argument checks (no data read). Returns (x2 [M, K] view, scale as an fp32 tensor or None, scale_ub
    as a float or None, the scale shape quantize returns, or None where the kernel's own (M, 1) / (M, G) grid is
    returned as it is)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}, expected torch.bfloat16, torch.float16 or torch.float32")
    if granularity not in ("token", "tensor", "group"):
        raise ValueError(f"granularity={granularity!r}, expected 'token', 'tensor' or 'group'")
    if scale_format not in ("fp32", "ue8m0"):
        raise ValueError(f"scale_format={scale_format!r}, expected 'fp32' or 'ue8m0'")
    if granularity == "group" and (not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1):
        raise ValueError(f"group_size={group_size!r}, expected a positive int (128 for block-scaled GEMMs)")
    x2 = flatten_rows(x, "x")
    M, K = x2.shape
    scale_shape = None
    if scale is not None or x.dim() != 2 or granularity == "tensor":
        G = -(-K // group_size) if granularity == "group" else 1
        lead = tuple(x.shape[:-1])
        scale_shape = {"token": lead + (1,), "tensor": (1,), "group": lead + (G,)}[granularity]
        grid = {"token": (M, 1), "tensor": (1, 1), "group": (M, G)}[granularity]

    if scale is not None:
        if scale_ub is not None or scale_format != "fp32":
            raise ValueError("scale_ub and scale_format apply to dynamic quantization; with a static `scale` "
                             "leave them at their defaults")
        scale = as_scale(scale, "scale", x.device)
        if scale.dtype != torch.float32:
            raise TypeError(f"scale has dtype {scale.dtype}, expected torch.float32")
        if scale.device != x.device:
            raise ValueError(f"scale is on {scale.device} but x is on {x.device}")
        allowed = {scale_shape, grid} | ({(M,)} if granularity == "token" else set()) | \
            ({(), (1, 1)} if granularity == "tensor" else set())
        if shape_of(scale) not in allowed:
            raise ValueError(f"scale has shape {shape_of(scale)}, expected {scale_shape} for granularity="
                             f"{granularity!r} and x of shape {shape_of(x)}")
    elif scale_ub is not None:
        if isinstance(scale_ub, torch.Tensor):
            raise TypeError("scale_ub must be a Python float (a tensor would need a device synchronization)")
        # The kernels take it as fp32: it must round to a finite, non-zero fp32 value (0 would mean "no bound").
        if not (isinstance(scale_ub, (int, float)) and _FP32_TRUE_MIN <= scale_ub <= _FP32_MAX):
            raise ValueError(f"scale_ub={scale_ub!r}, expected a float > 0 that fits float32 "
                             f"({_FP32_TRUE_MIN:.3g} to {_FP32_MAX:.4g})")
        scale_ub = float(scale_ub)

    return x2, scale, scale_ub, scale_shape


def flatten_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """x [..., K] as a 2-D [M, K] view with unit column stride (a row stride is fine); never copies."""
    if x.dim() == 0:
        raise ValueError(f"{name} is a 0-d tensor, expected at least 1-D [..., K]")
    K = x.shape[-1]
    if K == 0:
        raise ValueError(f"{name} has shape {shape_of(x)} with K=0 in the last dim, expected K >= 1")
    if x.dim() == 2 and (x.stride(1) == 1 or K == 1) and (x.stride(0) >= K or x.shape[0] <= 1):
        return x
    try:
        x2 = x.view(-1, K)
    except RuntimeError:
        x2 = None
    if x2 is None or (x2.stride(1) != 1 and K > 1):
        raise ValueError(f"{name} of shape {shape_of(x)} has strides {x.stride()}; expected the last dim contiguous and "
                         f"the leading dims flattenable without a copy; call {name}.contiguous()")
    return x2


def validate_quantize_weight(w, granularity, block_size, scale_format) -> None:
    """quantize_weight's argument checks."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in INPUT_DTYPES:
        raise TypeError(f"w has dtype {w.dtype}, expected torch.bfloat16, torch.float16 or torch.float32")
    if w.dim() != 2 or w.shape[1] == 0:
        raise ValueError(f"w has shape {shape_of(w)}, expected 2-D [N, K] with K >= 1")
    if granularity not in ("channel", "tensor", "block"):
        raise ValueError(f"granularity={granularity!r}, expected 'channel', 'tensor' or 'block'")
    if scale_format not in ("fp32", "ue8m0"):
        raise ValueError(f"scale_format={scale_format!r}, expected 'fp32' or 'ue8m0'")
    if (not isinstance(block_size, (tuple, list)) or len(block_size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in block_size)):
        raise ValueError(f"block_size={block_size!r}, expected two positive ints such as (128, 128)")


def validate_block_linear(x, weight, weight_scale, bias) -> None:
    """block_fp8_linear's argument checks."""
    if not isinstance(x, torch.Tensor) or x.dtype not in OUT_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x has dtype {got}, expected bfloat16, float16 or float32 activations")
    check_fp8_operand(weight, "weight", "[N, K]")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has shape {shape_of(x)} but weight has shape {shape_of(weight)}; x's last dim must be K="
                         f"{weight.shape[1]}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or not bias.is_floating_point()):
        raise TypeError(f"bias must be a floating-point tensor [N] or None, got {type(bias).__name__}")
    N, K = weight.shape
    want = (-(-N // BLOCK), -(-K // BLOCK))
    if not isinstance(weight_scale, torch.Tensor) or shape_of(weight_scale) != want:
        got = shape_of(weight_scale) if isinstance(weight_scale, torch.Tensor) else type(weight_scale).__name__
        raise ValueError(f"weight_scale has shape {got}, expected the per-128x128-block shape {want} for weight "
                         f"{shape_of(weight)} (fp8kern.quantize_weight(w, 'block'))")


def validate_grouped(what, block, a, scale_a, b, scale_b, offsets, out) -> None:
    """Argument checks of the grouped GEMMs that read no tensor data. Cheap on the common path (it runs twice per
    Fp8Experts forward): each message is built only when its check fails."""
    def fail(name, t, expected, exc=ValueError):
        raise exc(f"{what}: {name} has {describe(t)}, expected {expected}")

    for name, t in (("a", a), ("scale_a", scale_a), ("b", b), ("scale_b", scale_b), ("offsets", offsets),
                    ("out", out)):
        if not isinstance(t, torch.Tensor):
            fail(name, t, "a torch.Tensor", TypeError)
    if a.dim() != 2:
        fail("a", a, "a 2-D [rows, K] tensor")
    rows, K = a.shape
    if b.dim() != 3 or b.shape[2] != K:
        fail("b", b, f"a 3-D [G, N, {K}] tensor (one [N, K] weight per group)")
    G, N = b.shape[0], b.shape[1]
    for name, t in (("a", a), ("b", b)):
        if t.dtype != E4M3:
            fail(name, t, "torch.float8_e4m3fn", TypeError)
        if not t.is_contiguous():
            fail(name, t, f"a contiguous tensor; call {name}.contiguous()")
    kb, nb = -(-K // BLOCK), -(-N // BLOCK)
    if block:
        if shape_of(scale_a) != (rows, kb):
            fail("scale_a", scale_a, f"({rows}, {kb}): one scale per row and 128 of K")
        if shape_of(scale_b) != (G, nb, kb):
            fail("scale_b", scale_b, f"({G}, {nb}, {kb}): one scale per group and 128x128 block")
        for name, t in (("scale_a", scale_a), ("scale_b", scale_b)):
            if t.dtype not in BLOCK_SCALE_DTYPES:
                fail(name, t, "float32, bfloat16, float16 or float8_e8m0fnu", TypeError)
    else:
        if shape_of(scale_a) not in ((rows,), (rows, 1)):
            fail("scale_a", scale_a, f"({rows},) or ({rows}, 1): one scale per row (repeat a per-tensor scale: "
                                     f"scale.expand({rows}))")
        if shape_of(scale_b) not in ((G, N), (G, N, 1)):
            fail("scale_b", scale_b, f"({G}, {N}) or ({G}, {N}, 1): one scale per group and weight row")
        for name, t in (("scale_a", scale_a), ("scale_b", scale_b)):
            if t.dtype is not torch.float32:
                fail(name, t, f"torch.float32; call {name}.float()", TypeError)
    if shape_of(offsets) != (G + 1,) or not offsets.is_contiguous():
        fail("offsets", offsets, f"a contiguous ({G + 1},) tensor: group g is rows offsets[g]:offsets[g+1]")
    if offsets.dtype is not torch.int64:
        fail("offsets", offsets, "torch.int64", TypeError)
    if shape_of(out) != (rows, N) or not out.is_contiguous():
        fail("out", out, f"a contiguous ({rows}, {N}) tensor")
    if out.dtype not in OUT_DTYPES:
        fail("out", out, "torch.bfloat16, torch.float16 or torch.float32", TypeError)
    device = a.device
    if (scale_a.device != device or b.device != device or scale_b.device != device or offsets.device != device
            or out.device != device):
        for name, t in (("scale_a", scale_a), ("b", b), ("scale_b", scale_b), ("offsets", offsets), ("out", out)):
            if t.device != device:
                raise ValueError(f"{what}: {name} is on {t.device} but a is on {device}; all tensors must be on "
                                 "one device")


def check_offsets(what: str, offs: list, rows: int) -> None:
    if offs[0] < 0 or offs[-1] > rows or any(lo > hi for lo, hi in zip(offs, offs[1:])):
        raise ValueError(f"{what}: offsets must be non-decreasing within [0, {rows}], got {offs}")
