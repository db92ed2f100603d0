"""Tensor-facing operations: argument validation with errors that name the fix, layout inference, output
allocation, and dispatch to the compiled kernels or the reference. Registered with torch.library so the ops
trace under torch.compile; eager calls skip the dispatcher to keep host overhead low."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import _backend, reference
from .reference import BLOCK, E4M3, E8M0

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BLOCK_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, E8M0)
# dtype codes of the compiled module (csrc/include/fp8kern/fp8kern.h, enum DType)
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, E4M3: 3, E8M0: 4}
_FP32_MAX = torch.finfo(torch.float32).max
_FP32_TRUE_MIN = 2.0 ** -149  # smallest positive (subnormal) fp32


@dataclass(frozen=True)
class Layout:
    """How scale_a and scale_b broadcast. a: 'tensor' | 'token' | 'group' (1x128); b: 'tensor' | 'channel' |
    'block' (128x128). 'group' and 'block' come together (the block-scaled layout)."""

    a: str
    b: str

    @property
    def name(self) -> str:
        """'tensor', 'token_channel' (any mix of per-tensor, per-token and per-channel) or 'block'."""
        if self.a == "group":
            return "block"
        return "tensor" if (self.a, self.b) == ("tensor", "tensor") else "token_channel"

    def a_block(self, M: int, K: int):
        return {"tensor": (M, K), "token": (1, K), "group": (1, BLOCK)}[self.a]

    def b_block(self, N: int, K: int):
        return {"tensor": (N, K), "channel": (1, K), "block": (BLOCK, BLOCK)}[self.b]


def _shape(t) -> tuple:
    return tuple(t.shape)


_BLOCK_LAYOUT = Layout("group", "block")  # infer_layout returns this instance: the hot path tests `is _BLOCK_LAYOUT`
# (scale_a per-tensor?, scale_b per-tensor?) -> layout; per-tensor wins where a shape fits two (same numbers).
_PLAIN_LAYOUTS = {(ta, tb): Layout("tensor" if ta else "token", "tensor" if tb else "channel")
                  for ta in (False, True) for tb in (False, True)}


def infer_layout(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor) -> Layout:
    """The layout given by the scale shapes (a [M, K], b [N, K]); raises ValueError when they fit none.

    Shapes that fit two layouts (M=1, or K <= 128) mean the same numbers in both, so either choice is right.
    """
    M, K = a.shape
    N = b.shape[0]
    sa, sb = scale_a.shape, scale_b.shape
    # The common calls decide in a few comparisons (this runs on every call: host overhead).
    na, nb = len(sa), len(sb)
    a_tensor = na <= 2 and scale_a.numel() == 1
    b_tensor = nb <= 2 and scale_b.numel() == 1
    a_token = (na == 1 and sa[0] == M) or (na == 2 and sa[1] == 1 and sa[0] == M)
    b_channel = (nb == 1 and sb[0] == N) or (nb == 2 and sb[1] == 1 and sb[0] == N)
    G, GN = -(-K // BLOCK), -(-N // BLOCK)
    a_group = na == 2 and sa[0] == M and sa[1] == G
    b_block = nb == 2 and sb[0] == GN and sb[1] == G
    if a_group and b_block:  # first: where shapes also fit a plain layout, block allows more scale dtypes
        return _BLOCK_LAYOUT
    if (a_tensor or a_token) and (b_tensor or b_channel):
        return _PLAIN_LAYOUTS[a_tensor, b_tensor]
    sa, sb = tuple(sa), tuple(sb)
    if not (a_tensor or a_token or a_group):
        raise ValueError(
            f"scale_a has shape {sa}, which fits no layout for a of shape (M, K)=({M}, {K}); expected () or (1,) "
            f"per-tensor, ({M},) or ({M}, 1) per-token, or ({M}, {G}) per-1x128-group (block-scaled)")
    if not (b_tensor or b_channel or b_block):
        hint = (" (torch._scaled_mm's rowwise (1, N) scale_b: pass scale_b.reshape(-1))"
                if sb == (1, N) and N > 1 else "")
        raise ValueError(
            f"scale_b has shape {sb}, which fits no layout for b of shape (N, K)=({N}, {K}); expected () or (1,) "
            f"per-tensor, ({N},) or ({N}, 1) per-channel, or ({GN}, {G}) per-128x128-block{hint}")
    if b_tensor or b_channel:
        raise ValueError(
            f"scale_a of shape {sa} is per-1x128-group (block-scaled) but scale_b of shape {sb} is not per-128x128-"
            f"block; the block-scaled layout needs scale_b of shape ({GN}, {G})")
    raise ValueError(
        f"scale_b of shape {sb} is per-128x128-block but scale_a of shape {sa} is not per-1x128-group; the "
        f"block-scaled layout needs scale_a of shape ({M}, {G}) (fp8kern.quantize(x, granularity='group'))")


def _as_scale(s, name: str, device: torch.device) -> torch.Tensor:
    if isinstance(s, torch.Tensor):
        return s
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        return torch.tensor(float(s), dtype=torch.float32, device=device)
    raise TypeError(f"{name} must be a torch.Tensor (or a Python float for a per-tensor scale), got {type(s).__name__}")


def _check_values(s: torch.Tensor, name: str) -> None:
    """Scales must be finite and > 0: a NaN, inf, zero or negative scale poisons or flips the result."""
    v = s.detach().float().reshape(-1)
    bad = ~(torch.isfinite(v) & (v > 0))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"{name} holds {int(bad.sum())} non-finite or non-positive value(s) (first at flat index {i}: "
                         f"{float(v[i])}); scales must be finite and > 0")


def _check_fp8_operand(t, name: str, shape_doc: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != E4M3:
        raise TypeError(f"{name} has dtype {t.dtype}, expected torch.float8_e4m3fn; quantize it with "
                        f"{'fp8kern.quantize' if name == 'a' else 'fp8kern.quantize_weight'}")
    if t.dim() != 2:
        raise ValueError(f"{name} has shape {_shape(t)}, expected 2-D {shape_doc}"
                         + ("; flatten leading dims with a.reshape(-1, a.shape[-1])" if name == "a" else ""))


def _validate_mm(a, b, scale_a, scale_b, out_dtype, bias, out) -> Layout:
    """All checks that read no tensor data; returns the layout. Written for host overhead: each check is a cheap
    test on the common path, and the message is built only when it fails."""
    _check_fp8_operand(a, "a", "[M, K]")
    _check_fp8_operand(b, "b", "[N, K] (the nn.Linear weight layout)")
    M, K = a.shape
    N, Kb = b.shape
    if Kb != K:
        raise ValueError(f"a has K={K} columns but b has shape {_shape(b)}; expected b of shape (N, {K}) "
                         f"(row-major [N, K]; for a [K, N] weight pass w.t().contiguous())")
    if K == 0:
        raise ValueError("a and b have K=0 columns; expected K >= 1")
    if not a.is_contiguous():
        _not_row_major(a, "a")
    if not b.is_contiguous():
        _not_row_major(b, "b")
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
            raise ValueError(f"bias has shape {_shape(bias)}, expected (N,)=({N},)")
        if bias.dtype != out_dtype:
            # The epilogue adds the bias in out_dtype's precision as loaded; a silent conversion would hide a copy.
            raise TypeError(f"bias has dtype {bias.dtype} but out_dtype={out_dtype}; pass bias.to({out_dtype})")
        if not bias.is_contiguous():
            raise ValueError(f"bias has strides {bias.stride()}, expected contiguous; call bias.contiguous()")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
        if _shape(out) != (M, N):
            raise ValueError(f"out has shape {_shape(out)}, expected (M, N)=({M}, {N})")
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


def _not_row_major(t: torch.Tensor, name: str) -> None:
    hint = (" (a transposed view, like torch._scaled_mm's column-major operand: fp8kern takes b as "
            "row-major [N, K], so pass the weight itself or .contiguous())") if t.t().is_contiguous() else ""
    raise ValueError(f"{name} of shape {_shape(t)} has strides {t.stride()}, expected a contiguous row-major "
                     f"tensor{hint}; call {name}.contiguous()")


def _scaled_mm_impl(a, b, scale_a, scale_b, out_dtype, bias, layout: Layout, fast_accum: bool = False,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Validated, non-empty problem -> result (written into `out` when given)."""
    # Value checks live here, not in validation, because they read data (a host sync, and untraceable).
    device = a.device
    if _backend.value_checks_on(device):
        _check_values(scale_a, "scale_a")
        _check_values(scale_b, "scale_b")
    family = _backend.gemm_family(device)
    if _backend._state["print_config"]:
        M, K = a.shape
        N = b.shape[0]
        what = (f"{family} {_config_label(family, layout is _BLOCK_LAYOUT, M, N, K, device)}" if family
                else f"reference ({device.type})")
        _backend.note_path("scaled_mm", (M, N, K, layout.name, str(out_dtype)), what)
    if family is None:
        result = reference.scaled_mm(a, b, scale_a, scale_b, out_dtype, bias, layout)
        return out.copy_(result) if out is not None else result
    return _run_gemm(family, a, b, scale_a, scale_b, out_dtype, bias, layout, fast_accum, out)


# Config forced per query family ('sm90', 'sm89', 'sm90_block', 'sm89_block') instead of select_config's choice:
# for tests that run every config of a table, and for tuning. Empty in normal use.
_config_override: dict = {}


def _k_run(family: str, block: bool, K: int) -> int:
    """K as the kernels see it: padded with zero columns to a multiple of 16 (and to 128 for Hopper's block kernel,
    whose TMA tiles need it). Zero columns add nothing and keep ceil(K/128)."""
    return max(-(-K // 16) * 16, 128 if block and family == "sm90" else 16)


def _config_label(family: str, block: bool, M: int, N: int, K: int, device: torch.device) -> str:
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


def _run_gemm(family, a, b, scale_a, scale_b, out_dtype, bias, layout, fast_accum, out):
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
                _DTYPE_CODE[out_dtype], sa.data_ptr(), sb.data_ptr(), bias_ptr,
                _config_override.get(family + "_block", -1))
        ws = _launch_workspace(args, block, fast_accum)
        _backend._C.scaled_mm_block(*args, ws.data_ptr(), ws.numel(), stream)
    else:
        # Per-tensor, per-token and per-channel scales are read as flat vectors: a contiguous tensor of any of their
        # shapes ((), (1,), (M,), (M, 1), ...) already is one.
        sa = scale_a if scale_a.is_contiguous() else scale_a.reshape(-1).contiguous()
        sb = scale_b if scale_b.is_contiguous() else scale_b.reshape(-1).contiguous()
        args = (family, index, a.data_ptr(), b.data_ptr(), d.data_ptr(), M, N, k_run, lda, ldb, ldd,
                _DTYPE_CODE[out_dtype], sa.data_ptr(), layout.a == "token", sb.data_ptr(), layout.b == "channel",
                bias_ptr, bool(fast_accum), _config_override.get(family, -1))
        ws = _launch_workspace(args, block, fast_accum)
        _backend._C.scaled_mm(*args, ws.data_ptr(), ws.numel(), stream)
    if out is not None:
        return out if d is out else out.copy_(d)
    return d if d.is_contiguous() else d.contiguous()


def grouped_supported(device: torch.device, n: int, k: int, out_dtype: torch.dtype) -> bool:
    """Whether grouped_block_mm / grouped_scaled_mm run on this device as one grouped kernel launch: the sm90 family is
    in use (verified, or chosen with FP8KERN_BACKEND=sm90), K >= 128 and a multiple of 16, and an output row of N
    elements fills whole 16-byte units (TMA). Otherwise they run the groups one GEMM at a time."""
    if k < 128 or k % 16 or (n * out_dtype.itemsize) % 16:
        return False
    try:
        return _backend.gemm_family(device) == "sm90"
    except NotImplementedError:  # a GPU no compiled family runs on: the per-group path raises the reason
        return False


# Workspace bytes of the grouped kernels per (device, block?, groups, N, K, out dtype): their per-group argument
# arrays and CUTLASS's TMA descriptors (per SM).
_grouped_ws_bytes: dict = {}


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


def _describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return f"type {type(t).__name__}"
    strides = "" if t.is_contiguous() else f", non-contiguous strides {t.stride()}"
    return f"shape {_shape(t)}, dtype {t.dtype}{strides}"


def _check_grouped(what, block, a, scale_a, b, scale_b, offsets, out) -> None:
    """Argument checks of the grouped GEMMs that read no tensor data. Cheap on the common path (it runs twice per
    Fp8Experts forward): each message is built only when its check fails."""
    def fail(name, t, expected, exc=ValueError):
        raise exc(f"{what}: {name} has {_describe(t)}, expected {expected}")

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
        if _shape(scale_a) != (rows, kb):
            fail("scale_a", scale_a, f"({rows}, {kb}): one scale per row and 128 of K")
        if _shape(scale_b) != (G, nb, kb):
            fail("scale_b", scale_b, f"({G}, {nb}, {kb}): one scale per group and 128x128 block")
        for name, t in (("scale_a", scale_a), ("scale_b", scale_b)):
            if t.dtype not in BLOCK_SCALE_DTYPES:
                fail(name, t, "float32, bfloat16, float16 or float8_e8m0fnu", TypeError)
    else:
        if _shape(scale_a) not in ((rows,), (rows, 1)):
            fail("scale_a", scale_a, f"({rows},) or ({rows}, 1): one scale per row (repeat a per-tensor scale: "
                                     f"scale.expand({rows}))")
        if _shape(scale_b) not in ((G, N), (G, N, 1)):
            fail("scale_b", scale_b, f"({G}, {N}) or ({G}, {N}, 1): one scale per group and weight row")
        for name, t in (("scale_a", scale_a), ("scale_b", scale_b)):
            if t.dtype is not torch.float32:
                fail(name, t, f"torch.float32; call {name}.float()", TypeError)
    if _shape(offsets) != (G + 1,) or not offsets.is_contiguous():
        fail("offsets", offsets, f"a contiguous ({G + 1},) tensor: group g is rows offsets[g]:offsets[g+1]")
    if offsets.dtype is not torch.int64:
        fail("offsets", offsets, "torch.int64", TypeError)
    if _shape(out) != (rows, N) or not out.is_contiguous():
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


def _check_offsets(what: str, offs: list, rows: int) -> None:
    if offs[0] < 0 or offs[-1] > rows or any(lo > hi for lo, hi in zip(offs, offs[1:])):
        raise ValueError(f"{what}: offsets must be non-decreasing within [0, {rows}], got {offs}")


def _grouped_mm(what, block, a, scale_a, b, scale_b, offsets, out) -> torch.Tensor:
    _check_grouped(what, block, a, scale_a, b, scale_b, offsets, out)
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
    _check_offsets("grouped_block_mm" if block else "grouped_scaled_mm", offs, rows)
    # The layout is stated, not inferred: a one-row slice's scale would also fit per-tensor.
    layout = _BLOCK_LAYOUT if block else Layout("token", "channel")
    sa = scale_a if block else scale_a.reshape(rows, 1)
    sb = scale_b if block else scale_b.reshape(G, N, 1)
    for g, (lo, hi) in enumerate(zip(offs, offs[1:])):
        if hi > lo:
            _scaled_mm_impl(a[lo:hi], b[g], sa[lo:hi], sb[g], out.dtype, None, layout, False, out[lo:hi])


def _grouped_mm_impl(a, scale_a, b, scale_b, offsets, out, block: bool) -> None:
    device = a.device
    rows, K = a.shape
    G, N = b.shape[0], b.shape[1]
    if _backend.value_checks_on(device):
        offs = offsets.tolist()
        _check_offsets("grouped_block_mm" if block else "grouped_scaled_mm", offs, rows)
        # Only rows inside a group are read: the others may hold anything (Fp8Experts' rows routed to no expert).
        _check_values(scale_a[:offs[-1]], "scale_a")
        _check_values(scale_b, "scale_b")
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
            _DTYPE_CODE[d.dtype])
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


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a, scale_b, *, out_dtype: torch.dtype = torch.bfloat16,
              bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
              fast_accum: bool = False) -> torch.Tensor:
    """D[m, n] = scale_a(m, k) * scale_b(n, k) * sum_k a[m, k] b[n, k] (+ bias[n]), computed in fp32 and returned
    as out_dtype, with the layout read from the scale shapes (see README, "Layouts").

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
    scale_a = _as_scale(scale_a, "scale_a", a.device)
    scale_b = _as_scale(scale_b, "scale_b", a.device)
    layout = _validate_mm(a, b, scale_a, scale_b, out_dtype, bias, out)
    M, N = a.shape[0], b.shape[0]
    if torch.compiler.is_compiling():
        if out is not None:
            torch.ops.fp8kern.scaled_mm_out(a, b, scale_a, scale_b, out_dtype, bias, fast_accum, out)
            return out
        return torch.ops.fp8kern.scaled_mm(a, b, scale_a, scale_b, out_dtype, bias, fast_accum)
    if M == 0 or N == 0:
        return out if out is not None else torch.empty((M, N), dtype=out_dtype, device=a.device)
    return _scaled_mm_impl(a, b, scale_a, scale_b, out_dtype, bias, layout, fast_accum, out)


@torch.library.custom_op("fp8kern::scaled_mm", mutates_args=())
def _scaled_mm_op(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                  out_dtype: torch.dtype, bias: torch.Tensor | None, fast_accum: bool) -> torch.Tensor:
    if a.shape[0] == 0 or b.shape[0] == 0:
        return torch.empty((a.shape[0], b.shape[0]), dtype=out_dtype, device=a.device)
    return _scaled_mm_impl(a, b, scale_a, scale_b, out_dtype, bias, infer_layout(a, b, scale_a, scale_b), fast_accum)


@_scaled_mm_op.register_fake
def _(a, b, scale_a, scale_b, out_dtype, bias, fast_accum):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


@torch.library.custom_op("fp8kern::scaled_mm_out", mutates_args=("out",))
def _scaled_mm_out_op(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                      out_dtype: torch.dtype, bias: torch.Tensor | None, fast_accum: bool, out: torch.Tensor) -> None:
    if a.shape[0] and b.shape[0]:
        _scaled_mm_impl(a, b, scale_a, scale_b, out_dtype, bias, infer_layout(a, b, scale_a, scale_b), fast_accum, out)


@_scaled_mm_out_op.register_fake
def _(a, b, scale_a, scale_b, out_dtype, bias, fast_accum, out):
    return None


# ---------------------------------------------------------------------------------------------------------------
# Quantization


def _flatten_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """x [..., K] as a 2-D [M, K] view with unit column stride (a row stride is fine); never copies."""
    if x.dim() == 0:
        raise ValueError(f"{name} is a 0-d tensor, expected at least 1-D [..., K]")
    K = x.shape[-1]
    if K == 0:
        raise ValueError(f"{name} has shape {_shape(x)} with K=0 in the last dim, expected K >= 1")
    if x.dim() == 2 and (x.stride(1) == 1 or K == 1) and (x.stride(0) >= K or x.shape[0] <= 1):
        return x
    try:
        x2 = x.view(-1, K)
    except RuntimeError:
        x2 = None
    if x2 is None or (x2.stride(1) != 1 and K > 1):
        raise ValueError(f"{name} of shape {_shape(x)} has strides {x.stride()}; expected the last dim contiguous and "
                         f"the leading dims flattenable without a copy; call {name}.contiguous()")
    return x2


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """Activations [..., K] as [M, K] with a contiguous last dim, copying only when no such view exists (a linear
    layer accepts any input layout; fp8kern.quantize itself never copies and says so instead)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 or x2.shape[-1] == 1 else x2.contiguous()


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
    x2 = _flatten_rows(x, "x")
    M, K = x2.shape
    if scale is not None or x.dim() != 2 or granularity == "tensor":
        G = -(-K // group_size) if granularity == "group" else 1
        lead = tuple(x.shape[:-1])
        scale_shape = {"token": lead + (1,), "tensor": (1,), "group": lead + (G,)}[granularity]
        grid = {"token": (M, 1), "tensor": (1, 1), "group": (M, G)}[granularity]

    if scale is not None:
        if scale_ub is not None or scale_format != "fp32":
            raise ValueError("scale_ub and scale_format apply to dynamic quantization; with a static `scale` "
                             "leave them at their defaults")
        scale = _as_scale(scale, "scale", x.device)
        if scale.dtype != torch.float32:
            raise TypeError(f"scale has dtype {scale.dtype}, expected torch.float32")
        if scale.device != x.device:
            raise ValueError(f"scale is on {scale.device} but x is on {x.device}")
        allowed = {scale_shape, grid} | ({(M,)} if granularity == "token" else set()) | \
            ({(), (1, 1)} if granularity == "tensor" else set())
        if _shape(scale) not in allowed:
            raise ValueError(f"scale has shape {_shape(scale)}, expected {scale_shape} for granularity="
                             f"{granularity!r} and x of shape {_shape(x)}")
    elif scale_ub is not None:
        if isinstance(scale_ub, torch.Tensor):
            raise TypeError("scale_ub must be a Python float (a tensor would need a device synchronization)")
        # The kernels take it as fp32: it must round to a finite, non-zero fp32 value (0 would mean "no bound").
        if not (isinstance(scale_ub, (int, float)) and _FP32_TRUE_MIN <= scale_ub <= _FP32_MAX):
            raise ValueError(f"scale_ub={scale_ub!r}, expected a float > 0 that fits float32 "
                             f"({_FP32_TRUE_MIN:.3g} to {_FP32_MAX:.4g})")
        scale_ub = float(scale_ub)

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
            _check_values(scale, "scale")
    if M == 0:
        s = torch.full(grid, reference.MIN_SCALE, dtype=torch.float32, device=x2.device)
        return q, (scale if scale is not None else (s.to(E8M0) if ue8m0 else s))

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
    _backend._C.quantize(kind, index, x2.data_ptr(), _DTYPE_CODE[x2.dtype], M, K, x2.stride(0),
                         q.data_ptr(), q.stride(0), s_out.data_ptr(), _DTYPE_CODE[s_out.dtype], s_rs, s_cs, gs,
                         scale_ub if scale_ub is not None else 0.0, ws.data_ptr() if ws is not None else 0,
                         _backend.current_stream(index))
    return q, s_out


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
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in INPUT_DTYPES:
        raise TypeError(f"w has dtype {w.dtype}, expected torch.bfloat16, torch.float16 or torch.float32")
    if w.dim() != 2 or w.shape[1] == 0:
        raise ValueError(f"w has shape {_shape(w)}, expected 2-D [N, K] with K >= 1")
    if granularity not in ("channel", "tensor", "block"):
        raise ValueError(f"granularity={granularity!r}, expected 'channel', 'tensor' or 'block'")
    if scale_format not in ("fp32", "ue8m0"):
        raise ValueError(f"scale_format={scale_format!r}, expected 'fp32' or 'ue8m0'")
    if (not isinstance(block_size, (tuple, list)) or len(block_size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in block_size)):
        raise ValueError(f"block_size={block_size!r}, expected two positive ints such as (128, 128)")
    return reference.quantize_weight(w, granularity, tuple(block_size), scale_format)


# ---------------------------------------------------------------------------------------------------------------
# Block-scaled linear


def block_fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None = None, *, act_scale_format: str = "fp32") -> torch.Tensor:
    """y = x @ W.T (+ bias) for a weight quantized in 128x128 blocks (DeepSeek-V3, Qwen3-FP8, FP8_BLOCK checkpoints).

    x: [..., K] bfloat16, float16 or float32. weight: [N, K] float8_e4m3fn. weight_scale: [ceil(N/128), ceil(K/128)]
    (fp32, bf16, fp16 or float8_e8m0fnu), multiplied into the weight (the checkpoints' weight_scale_inv).
    bias: [N] or None, any float dtype (cast to x's dtype). Returns [..., N] in x's dtype.

    The activations are quantized per 1x128 group (fp8kern.quantize(x, 'group'), the fused kernel on a GPU) and the
    block-scaled GEMM applies both scales in its mainloop: two launches, no host synchronization, and the group
    scales feed the GEMM in the layout the quantizer writes. act_scale_format='ue8m0' rounds the activation scales
    up to powers of two, as DeepSeek-V3's UE8M0 recipe does; the default fp32 scales are more accurate.
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in OUT_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x has dtype {got}, expected bfloat16, float16 or float32 activations")
    _check_fp8_operand(weight, "weight", "[N, K]")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has shape {_shape(x)} but weight has shape {_shape(weight)}; x's last dim must be K="
                         f"{weight.shape[1]}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or not bias.is_floating_point()):
        raise TypeError(f"bias must be a floating-point tensor [N] or None, got {type(bias).__name__}")
    N, K = weight.shape
    want = (-(-N // BLOCK), -(-K // BLOCK))
    if not isinstance(weight_scale, torch.Tensor) or _shape(weight_scale) != want:
        got = _shape(weight_scale) if isinstance(weight_scale, torch.Tensor) else type(weight_scale).__name__
        raise ValueError(f"weight_scale has shape {got}, expected the per-128x128-block shape {want} for weight "
                         f"{_shape(weight)} (fp8kern.quantize_weight(w, 'block'))")
    lead = x.shape[:-1]
    q, s = quantize(as_rows(x), "group", scale_format=act_scale_format)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    y = scaled_mm(q, weight, s, weight_scale, out_dtype=x.dtype, bias=bias)
    return y.reshape(*lead, weight.shape[0])
