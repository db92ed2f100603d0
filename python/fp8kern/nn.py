"""Fp8Linear, a drop-in nn.Linear holding an e4m3 weight, and quantize_model to convert a model in place."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from . import _backend, ops, reference
from ._constants import BLOCK, E4M3, E8M0, INPUT_DTYPES, OUT_DTYPES
from .ops.gemm import row_gemms, scaled_mm_impl
from .ops.linear_plan import linear_runner

# scheme -> (activation granularity, dynamic activations?, default weight granularity, allowed weight granularities)
SCHEMES = {
    "dynamic_per_token": ("token", True, "channel", ("channel", "tensor")),
    "dynamic_per_tensor": ("tensor", True, "tensor", ("tensor", "channel")),
    "static_per_tensor": ("tensor", False, "tensor", ("tensor", "channel")),
    "block128": ("group", True, "block", ("block",)),
}


def _check_scheme(scheme: str, weight_granularity: str | None, scale_format: str, dtype: torch.dtype):
    """Validated constructor arguments of Fp8Linear / Fp8Experts -> (activation granularity, dynamic?, weight
    granularity)."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r}, expected one of {sorted(SCHEMES)}")
    act, dynamic, w_default, w_allowed = SCHEMES[scheme]
    weight_granularity = weight_granularity or w_default
    if weight_granularity not in w_allowed:
        raise ValueError(f"weight_granularity={weight_granularity!r} does not fit scheme={scheme!r}; expected one "
                         f"of {w_allowed}")
    if scale_format not in ("fp32", "ue8m0"):
        raise ValueError(f"scale_format={scale_format!r}, expected 'fp32' or 'ue8m0'")
    if scale_format == "ue8m0" and scheme != "block128":
        raise ValueError("scale_format='ue8m0' applies to scheme='block128'")
    if dtype not in OUT_DTYPES:
        raise TypeError(f"dtype={dtype}, expected torch.bfloat16, torch.float16 or torch.float32")
    return act, dynamic, weight_granularity


def _scale_shape(granularity: str, out_features: int, in_features: int) -> tuple:
    return {"channel": (out_features, 1), "tensor": (1,),
            "block": (math.ceil(out_features / BLOCK), math.ceil(in_features / BLOCK))}[granularity]


class _FixedDtypeBuffers(nn.Module):
    """Buffers whose dtype is part of the format (_FIXED_DTYPE): model.to(dtype) / .half() / .bfloat16() move them but
    keep their dtype (e4m3 and e8m0 count as floating point, so nn.Module would convert them and break forward)."""

    _FIXED_DTYPE: tuple = ()

    def _apply(self, fn, recurse=True):
        fixed = {id(b) for name, b in self._buffers.items() if name in self._FIXED_DTYPE and b is not None}

        def keep_dtype(t):
            if id(t) not in fixed:
                return fn(t)
            probe = fn(t.new_empty(0))  # what fn does, without converting the data when only the device may change
            return t.to(device=probe.device) if probe.dtype != t.dtype else fn(t)

        return super()._apply(keep_dtype, recurse)


class Fp8Linear(_FixedDtypeBuffers):
    """y = x @ W.T + b with W stored as float8_e4m3fn and a scale, activations quantized on the fly.

    scheme: 'dynamic_per_token' (per-token activations, per-channel weights: llm-compressor FP8_DYNAMIC),
    'dynamic_per_tensor', 'static_per_tensor' (a calibrated input_scale: AMD Quark, FP8 static) or 'block128'
    (1x128 activation groups x 128x128 weight blocks: DeepSeek-V3, Qwen3-FP8). weight_granularity overrides the
    scheme's weight scale layout ('channel' or 'tensor'; 'block' for block128).
    forward accepts any leading dims and bf16/fp16/fp32 input, returns the input's dtype, and never synchronizes
    with the host, so it runs under torch.compile and CUDA graph capture.
    """

    _FIXED_DTYPE = ("weight", "weight_scale", "input_scale")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scheme: str = "dynamic_per_token", *,
                 weight_granularity: str | None = None, scale_format: str = "fp32", fast_accum: bool = False,
                 device=None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        act, dynamic, weight_granularity = _check_scheme(scheme, weight_granularity, scale_format, dtype)
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.weight_granularity, self.scale_format = scheme, weight_granularity, scale_format
        self.act_granularity, self.dynamic, self.fast_accum = act, dynamic, fast_accum
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=E4M3, device=device))
        s_dtype = E8M0 if scale_format == "ue8m0" else torch.float32
        self.register_buffer("weight_scale", torch.ones(_scale_shape(weight_granularity, out_features, in_features),
                                                        dtype=s_dtype, device=device))
        if not dynamic:
            self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32, device=device))
        else:
            self.input_scale = None
        # Inference only: the FP8 GEMM has no backward, so the bias takes no gradient either.
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str = "dynamic_per_token", *, input_scale: float | None = None,
                    **kwargs) -> "Fp8Linear":
        """Quantize an nn.Linear's weight (fp8kern.quantize_weight) into a new Fp8Linear on the same device.
        Static schemes need input_scale (the calibrated activation amax / 448)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        dtype = w.dtype if w.dtype in OUT_DTYPES else torch.bfloat16
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme, device=w.device, dtype=dtype,
                **kwargs)
        q, s = ops.quantize_weight(w if w.dtype in INPUT_DTYPES else w.float(), m.weight_granularity,
                                   scale_format=m.scale_format)
        m.weight.copy_(q)
        m.weight_scale.copy_(s.reshape(m.weight_scale.shape))
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach())
        if not m.dynamic:
            if input_scale is None:
                raise ValueError(f"scheme={scheme!r} needs input_scale (calibrated amax / 448); quantize_model "
                                 "computes it from calibration_data")
            if not (math.isfinite(input_scale) and input_scale > 0):
                raise ValueError(f"input_scale={input_scale!r}, expected a finite float > 0")
            m.input_scale.fill_(input_scale)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Fp8Linear: input has {x.shape[-1]} features in the last dim, expected {self.in_features}")
        if x.dtype not in OUT_DTYPES:
            raise TypeError(f"Fp8Linear: input dtype {x.dtype}, expected bfloat16, float16 or float32")
        if not torch.compiler.is_compiling():
            run = linear_runner(self)  # ops/linear_plan.py: validated and chosen once per set of weights
            if run is not None:
                y = run(x)
                if y is not None:
                    return y
        weight, weight_scale, bias = self.weight, self.weight_scale, self.bias  # each a Module.__getattr__ lookup
        if self.scheme == "block128":
            return ops.block_fp8_linear(x, weight, weight_scale, bias, act_scale_format=self.scale_format)
        flat = x.dim() == 2 and x.stride(1) == 1  # the common [tokens, features] input needs no reshapes
        x2 = x if flat else ops.as_rows(x)
        if self.dynamic:
            q, s = ops.quantize(x2, self.act_granularity, scale_format=self.scale_format)
        else:
            q, s = ops.quantize(x2, "tensor", scale=self.input_scale)
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        y = ops.scaled_mm(q, weight, s, weight_scale, out_dtype=x.dtype, bias=bias, fast_accum=self.fast_accum)
        return y if flat else y.reshape(*x.shape[:-1], self.out_features)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_plan", None)  # holds launch closures; rebuilt on the first forward
        return state

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={self.scheme}, weight={self.weight_granularity}")


# transformers (5.x) keeps a MoE layer's routed experts in one module with 3-D parameters gate_up_proj [E, 2I, H] and
# down_proj [E, H, I], called as experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]). These are
# the layout flags (set by transformers' use_experts_implementation) of the modules Fp8Experts computes like.
_EXPERT_LAYOUT = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
                  "has_post_expert_norm": False}


def is_fused_experts(module: nn.Module) -> bool:
    """Whether module holds MoE experts as 3-D gate_up_proj and down_proj tensors (transformers' fused experts)."""
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == 3 and down.dim() == 3


def fused_experts_unsupported(module: nn.Module) -> str | None:
    """None when Fp8Experts computes what the fused experts module does (y = down(act(gate x) * up x), gate and up
    concatenated along gate_up_proj's rows, no biases), else the reason it does not."""
    flags = {k: getattr(module, k, None) for k in _EXPERT_LAYOUT}
    if flags != _EXPERT_LAYOUT:
        diff = {k: v for k, v in flags.items() if v != _EXPERT_LAYOUT[k]}
        return f"experts layout {diff} (fp8kern runs concatenated [gate; up] experts without bias, {_EXPERT_LAYOUT})"
    gate = getattr(type(module), "_apply_gate", None)
    if getattr(gate, "__name__", None) != "_default_apply_gate" or not callable(getattr(module, "act_fn", None)):
        return "its experts apply a custom gate (fp8kern runs act_fn(gate) * up)"
    E, two_i, H = module.gate_up_proj.shape
    if two_i % 2 or tuple(module.down_proj.shape) != (E, H, two_i // 2):
        return (f"gate_up_proj {tuple(module.gate_up_proj.shape)} and down_proj {tuple(module.down_proj.shape)} are "
                "not [E, 2I, H] and [E, H, I]")
    return None


class Fp8Experts(_FixedDtypeBuffers):
    """The routed experts of a mixture-of-experts layer with e4m3 weights: a drop-in for transformers' fused experts
    module (Qwen2/3-MoE, DeepSeek-V2/V3, Mixtral, GLM-4-MoE, ...), built by from_experts, quantize_model or
    from_pretrained.

    forward(hidden_states [T, H], top_k_index [T, k] (int), top_k_weights [T, k]) -> [T, H] in hidden_states' dtype:
    out[t] = sum_j top_k_weights[t, j] * down_e(act_fn(gate_e x_t) * up_e x_t) with e = top_k_index[t, j]; the index
    num_experts stands for no expert (transformers' expert-parallel padding) and adds nothing.

    The gate and up projections of an expert are one GEMM over gate_up_weight [E, 2 * I', H], gate rows first and up
    rows from I' (I' = I, or I rounded up to a multiple of 128 for block scales so that each projection has its own
    128-row blocks; the rows between are zero). Activations are quantized as the scheme says (Fp8Linear's schemes),
    once per projection for all tokens; static schemes use each expert's input scale (for gate_up, the larger of the
    gate's and up's). Weight scales are per channel ('tensor' scales are stored per channel, the same numbers) or
    per 128x128 block.

    On Hopper (the sm90 family; K = H and I at least 128 and multiples of 16) each projection runs as one grouped
    kernel launch over all experts (fp8kern.grouped_block_mm for block scales, grouped_scaled_mm for the others), with
    the per-expert row ranges computed and read on the device: no host synchronization, so the layer can be captured
    in a CUDA graph. There an index outside [0, num_experts] cannot raise without a host read: its token's output
    row is NaN (FP8KERN_CHECK_VALUES=1 checks and raises instead). Set `grouped = False` to run one GEMM per expert
    instead (fast_accum=True with per-channel or per-tensor weights does too: the grouped kernels always promote).
    Every other case runs one GEMM per active expert and projection, reading the number of tokens per expert on the
    host (one synchronization) to size them: the layer then cannot be captured in a CUDA graph, and torch.compile
    breaks its graph there.

    block_offset (block scales only; fp8kern.parallel's tensor-parallel experts): None for whole experts; for a
    shard of the whole experts' intermediate rows [r0, r1), r0 % 128, where its rows start in a 128-row block of
    the whole grid. The gate and up rows are then stored unpadded (I' = I, scale rows ceil((block_offset + I) / 128)
    each) and their GEMMs cut where the whole grid's blocks end; the down projection's input is front-padded with
    block_offset zero columns, in down_weight [E, H, block_offset + I] and in the activations, so that its 1x128
    groups are the whole grid's. Such a layer runs one GEMM per expert and cut (not the grouped kernels).
    """

    _FIXED_DTYPE = ("gate_up_weight", "gate_up_scale", "down_weight", "down_scale", "gate_up_input_scale",
                    "down_input_scale")

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, scheme: str = "dynamic_per_token",
                 *, act_fn=None, weight_granularity: str | None = None, scale_format: str = "fp32",
                 fast_accum: bool = False, block_offset: int | None = None, device=None,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        for name, v in (("num_experts", num_experts), ("hidden_size", hidden_size),
                        ("intermediate_size", intermediate_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r}, expected a positive int")
        act, dynamic, weight_granularity = _check_scheme(scheme, weight_granularity, scale_format, dtype)
        if act_fn is not None and not callable(act_fn):
            raise TypeError(f"act_fn must be callable (the experts' activation, e.g. nn.SiLU()), got {type(act_fn)}")
        E, H, I = num_experts, hidden_size, intermediate_size
        block = weight_granularity == "block"
        if block_offset is not None and (not block or not isinstance(block_offset, int)
                                         or not 0 <= block_offset < BLOCK):
            raise ValueError(f"block_offset={block_offset!r}, expected None, or an int in [0, {BLOCK}) with block "
                             "scales")
        Ip = -(-I // BLOCK) * BLOCK if block and block_offset is None else I
        self.num_experts, self.hidden_size, self.intermediate_size, self.padded_intermediate = E, H, I, Ip
        self.block_offset = block_offset
        pad = block_offset or 0  # the down projection's leading zero columns
        # Scale rows of the gate (and of the up) projection: block rows of the whole grid the rows touch.
        self.scale_blocks = -(-(pad + I) // BLOCK) if block else I
        self.scheme, self.weight_granularity, self.scale_format = scheme, weight_granularity, scale_format
        self.act_granularity, self.dynamic, self.fast_accum = act, dynamic, fast_accum
        self.act_fn = act_fn if act_fn is not None else nn.SiLU()
        s_dtype = E8M0 if scale_format == "ue8m0" else torch.float32
        gran = "block" if block else "channel"
        self.register_buffer("gate_up_weight", torch.zeros(E, 2 * Ip, H, dtype=E4M3, device=device))
        gu_scale = (2 * self.scale_blocks, -(-H // BLOCK)) if block else (2 * Ip, 1)
        self.register_buffer("gate_up_scale", torch.ones((E,) + gu_scale, dtype=s_dtype, device=device))
        self.register_buffer("down_weight", torch.zeros(E, H, pad + I, dtype=E4M3, device=device))
        self.register_buffer("down_scale", torch.ones((E,) + _scale_shape(gran, H, pad + I), dtype=s_dtype,
                                                      device=device))
        if not dynamic:
            self.register_buffer("gate_up_input_scale", torch.ones(E, dtype=torch.float32, device=device))
            self.register_buffer("down_input_scale", torch.ones(E, dtype=torch.float32, device=device))
        else:
            self.gate_up_input_scale = self.down_input_scale = None
        # On Hopper both projections run as one grouped launch each (see the class docstring); False runs one GEMM
        # per active expert, as every other case does.
        self.grouped = True
        # Set by fp8kern.parallel where the down projection's dynamic input scale depends on other ranks' data: a
        # callable taking this rank's amax on the scale grid (fp32 [1] per tensor, [rows, 1] per token, [rows, G]
        # per 1x128 group) and returning the amax one device would see. Per tensor it is called on every forward,
        # rows or not (expert parallel: another rank's rows wait for it); per token or group only with rows, which
        # then are the same rows on every rank (tensor parallel).
        self.amax_reduce = None
        # Tensor-parallel experts: the down projection's output and the combination kept in fp32, unrounded, for the
        # fp32 sum over the ranks; forward then returns fp32.
        self.partial_sums = False

    def projection(self, expert: int, role: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, weight_scale) views of one expert's 'gate', 'up' or 'down' projection, in Fp8Linear's layout
        ([N, K] e4m3; (N, 1) per channel or (ceil(N/128), ceil(K/128)) per block; with a block_offset the gate and up
        scales have ceil((block_offset + I) / 128) rows and down is [H, block_offset + I], its first block_offset
        columns zero): loaders fill them in place."""
        I, Ip = self.intermediate_size, self.padded_intermediate
        if role == "down":
            return self.down_weight[expert], self.down_scale[expert]
        if role not in ("gate", "up"):
            raise ValueError(f"role={role!r}, expected 'gate', 'up' or 'down'")
        up = role == "up"
        w = self.gate_up_weight[expert, Ip * up:Ip * up + I]
        G = self.scale_blocks
        return w, self.gate_up_scale[expert, G * up:G * up + G]

    @classmethod
    def from_experts(cls, experts: nn.Module, scheme: str = "dynamic_per_token", *,
                     input_scales: torch.Tensor | None = None, **kwargs) -> "Fp8Experts":
        """Quantize a transformers fused experts module (fp8kern.quantize_weight per expert and projection) into a
        new Fp8Experts on the same device. Static schemes need input_scales [E, 2]: each expert's activation scale
        (calibrated amax / 448) for the gate_up and the down projection."""
        if not isinstance(experts, nn.Module) or not is_fused_experts(experts):
            raise TypeError("experts must be a fused experts module with 3-D gate_up_proj [E, 2I, H] and down_proj "
                            f"[E, H, I] (transformers >= 5 MoE layers), got {type(experts).__name__}")
        why = fused_experts_unsupported(experts)
        if why:
            raise ValueError(f"cannot convert {type(experts).__name__}: {why}")
        gu = experts.gate_up_proj.detach()
        E, two_i, H = gu.shape
        I = two_i // 2
        dtype = gu.dtype if gu.dtype in OUT_DTYPES else torch.bfloat16
        m = cls(E, H, I, scheme, act_fn=experts.act_fn, device=gu.device, dtype=dtype, **kwargs)
        down = experts.down_proj.detach()
        wgran = m.weight_granularity
        with torch.no_grad():
            for e in range(E):
                for role, w in (("gate", gu[e, :I]), ("up", gu[e, I:]), ("down", down[e])):
                    q, s = ops.quantize_weight(w if w.dtype in INPUT_DTYPES else w.float(), wgran,
                                               scale_format=m.scale_format)
                    wq, ws = m.projection(e, role)
                    wq.copy_(q)
                    ws.copy_(s.reshape(-1, 1).expand(ws.shape) if wgran == "tensor" else s.reshape(ws.shape))
            if not m.dynamic:
                if input_scales is None:
                    raise ValueError(f"scheme={scheme!r} needs input_scales [E, 2] (calibrated amax / 448 of each "
                                     "expert's gate_up and down inputs)")
                s = torch.as_tensor(input_scales, dtype=torch.float32)
                if tuple(s.shape) != (E, 2) or not bool((torch.isfinite(s) & (s > 0)).all()):
                    raise ValueError(f"input_scales has shape {tuple(s.shape)} or values that are not finite and > 0;"
                                     f" expected ({E}, 2) positive scales")
                m.gate_up_input_scale.copy_(s[:, 0])
                m.down_input_scale.copy_(s[:, 1])
        return m

    def _gate_up_cuts(self) -> tuple:
        """(weight rows, scale rows) of each GEMM call over gate_up_weight: all at once for whole experts; for a
        shard (block_offset) the gate and the up rows apart, each cut where the whole grid's first block ends."""
        if self.block_offset is None:
            return ((slice(None), slice(None)),)
        I, Ip, G = self.intermediate_size, self.padded_intermediate, self.scale_blocks
        head = (BLOCK - self.block_offset) % BLOCK  # rows in the first block, when it is shared with another shard
        cuts = []
        for r, b in ((0, 0), (Ip, G)):  # gate, up
            if 0 < head < I:
                cuts += [(slice(r, r + head), slice(b, b + 1)), (slice(r + head, r + I), slice(b + 1, b + G))]
            else:
                cuts.append((slice(r, r + I), slice(b, b + G)))
        return tuple(cuts)

    def _gemms(self, q: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, counts: list,
               out: torch.Tensor, cuts=((slice(None), slice(None)),)) -> None:
        """out[rows of e] = expert e's GEMM of q's rows of e (rows sorted by expert, counts[e] of them); cuts: the
        (weight rows, scale rows) of each call (_gate_up_cuts), whose outputs are the same columns of out."""
        per_row = not (self.dynamic and self.act_granularity == "tensor")  # else s is the one (1,) scale
        # Host cost per expert matters (prefill runs every expert): the first GEMM goes through scaled_mm's full
        # validation; the others differ from it only in row count and expert index, so they take the validated
        # path directly, with the layout these operands always have (stated, not inferred: a one-row slice's
        # scale shape also fits per-tensor, which would be wrong for the next expert's rows).
        if self.weight_granularity == "block":
            layout = ops._BLOCK_LAYOUT
        else:
            layout = ops.Layout("token" if per_row else "tensor", "channel")
        compiling = torch.compiler.is_compiling()  # then every GEMM goes through scaled_mm (its custom op)
        whole = cuts == ((slice(None), slice(None)),)
        first = True
        r = 0
        for e, c in enumerate(counts):
            if c:
                a, sa = q[r:r + c], (s[r:r + c] if per_row else s)
                for rows, blocks in cuts:
                    w, sw, d = weight[e, rows], scale[e, blocks], out[r:r + c, rows]
                    if first or compiling:
                        ops.scaled_mm(a, w, sa, sw, out_dtype=out.dtype, out=d, fast_accum=self.fast_accum)
                        first = False
                        # Whole experts: the rest from addresses, one launch each, where the path and operands
                        # allow it (ops/gemm.py: row_gemms).
                        if whole and not compiling and row_gemms(q, s, weight, scale, counts, out, layout,
                                                                 self.fast_accum, e + 1, r + c):
                            return
                    else:
                        scaled_mm_impl(a, w, sa, sw, out.dtype, None, layout, self.fast_accum, d)
            r += c

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        x = hidden_states
        E, H, I, Ip = self.num_experts, self.hidden_size, self.intermediate_size, self.padded_intermediate
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != H:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"Fp8Experts: hidden_states has shape {got}, expected [tokens, {H}]")
        if x.dtype not in OUT_DTYPES:
            raise TypeError(f"Fp8Experts: hidden_states dtype {x.dtype}, expected bfloat16, float16 or float32")
        T = x.shape[0]
        for name, t in (("top_k_index", top_k_index), ("top_k_weights", top_k_weights)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != T or t.device != x.device:
                got = f"{tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"Fp8Experts: {name} is {got}, expected [{T}, top_k] on {x.device}")
        if top_k_index.shape != top_k_weights.shape:
            raise ValueError(f"Fp8Experts: top_k_index {tuple(top_k_index.shape)} and top_k_weights "
                             f"{tuple(top_k_weights.shape)} differ in shape")
        if top_k_index.is_floating_point() or top_k_index.is_complex() or top_k_index.dtype == torch.bool:
            raise TypeError(f"Fp8Experts: top_k_index has dtype {top_k_index.dtype}, expected an integer dtype")
        k = top_k_index.shape[1]
        flat = top_k_index.reshape(-1).long()
        if self._grouped_runs(x):
            return self._forward_grouped(x, flat, k, top_k_weights)
        # Bins: 0 below range, 1..E the experts, E + 1 the no-expert index E, E + 2 above range. The one host read.
        bins = torch.bincount(flat.clamp(-1, E + 1) + 1, minlength=E + 3).tolist()
        if bins[0] or bins[E + 2]:
            raise ValueError(f"Fp8Experts: top_k_index holds {bins[0] + bins[E + 2]} value(s) outside [0, "
                             f"{E}] (num_experts={E}; {E} means no expert)")
        counts = bins[1:E + 1]
        rows = sum(counts)
        acc = torch.float32 if self.partial_sums else x.dtype  # the dtype of the down GEMM and the combination
        out = torch.zeros(x.shape, dtype=acc, device=x.device)
        if rows == 0:
            if self._reduces_amax() and self.act_granularity == "tensor":  # another rank's reduction waits for it
                self.amax_reduce(torch.zeros(1, dtype=torch.float32, device=x.device))
            return out
        sel = torch.argsort(flat, stable=True)[:rows]  # (token, slot) pairs grouped by expert; no-expert ones last
        token = sel // k
        if self.dynamic:
            q, s = ops.quantize(ops.as_rows(x), self.act_granularity, scale_format=self.scale_format)
            q = q[token]
            if self.act_granularity != "tensor":
                s = s[token]
        else:
            expert = flat[sel]
            q, s = ops.quantize(ops.as_rows(x)[token], "token", scale=self.gate_up_input_scale[expert])
        gate_up = torch.empty((rows, 2 * Ip), dtype=x.dtype, device=x.device)
        self._gemms(q, s, self.gate_up_weight, self.gate_up_scale, counts, gate_up, self._gate_up_cuts())
        h = self.act_fn(gate_up[:, :I]) * gate_up[:, Ip:Ip + I]
        if self.block_offset:  # the 1x128 groups of the whole grid (the padding is zero: it adds nothing)
            h = torch.nn.functional.pad(h, (self.block_offset, 0))
        if self._reduces_amax():
            q, s = self._quantize_reduced(h)
        elif self.dynamic:
            q, s = ops.quantize(h, self.act_granularity, scale_format=self.scale_format)
        else:
            q, s = ops.quantize(h, "token", scale=self.down_input_scale[expert])
        y = torch.empty((rows, H), dtype=acc, device=x.device)
        self._gemms(q, s, self.down_weight, self.down_scale, counts, y)
        weights = top_k_weights.reshape(-1)[sel]
        return out.index_add_(0, token, (y * weights[:, None]).to(acc))

    def _grouped_runs(self, x: torch.Tensor) -> bool:
        """Whether forward runs the grouped kernels: self.grouped, promoted accumulation (the grouped kernels have no
        fast mode; block scales always promote), and both projections supported (ops.grouped_supported)."""
        H, I, Ip = self.hidden_size, self.intermediate_size, self.padded_intermediate
        return (self.grouped and self.block_offset is None
                and (self.weight_granularity == "block" or not self.fast_accum)
                and x.shape[0] > 0
                and ops.grouped_supported(x.device, 2 * Ip, H, x.dtype)
                and ops.grouped_supported(x.device, H, I, x.dtype))

    def _reduces_amax(self) -> bool:
        return self.amax_reduce is not None and self.dynamic

    def _quantize_reduced(self, h: torch.Tensor):
        """Dynamic quantization of h [rows, K] with its amax reduced by amax_reduce (the dynamic scale rule)."""
        gran = self.act_granularity
        ue8m0 = self.scale_format == "ue8m0"
        s = reference.scale_from_amax(self.amax_reduce(reference.activation_amax(h.detach(), gran)), None, ue8m0)
        q, _ = ops.quantize(h, gran, scale=s)
        return q, (s.to(E8M0) if ue8m0 else s)

    def _forward_grouped(self, x: torch.Tensor, flat: torch.Tensor, k: int, top_k_weights: torch.Tensor):
        """Both projections as one grouped launch each, with the per-expert row ranges computed and read on the
        device only: no host synchronization, so the layer can be captured in a CUDA graph. All T * k (token, slot)
        rows are carried at a static size; those routed to no expert sort last, past every expert's range, and are
        dropped when the rows are combined."""
        E, H, I, Ip = self.num_experts, self.hidden_size, self.intermediate_size, self.padded_intermediate
        T, rows = x.shape[0], flat.numel()
        valid = (flat >= 0) & (flat <= E)
        if not torch.compiler.is_compiling() and _backend.value_checks_on(x.device):  # FP8KERN_CHECK_VALUES=1
            bad = int((~valid).sum())
            if bad:
                raise ValueError(f"Fp8Experts: top_k_index holds {bad} value(s) outside [0, {E}] (num_experts={E}; "
                                 f"{E} means no expert)")
        key = torch.where(valid, flat, E)
        sorted_key, order = torch.sort(key, stable=True)
        # Expert g's rows start at the first sorted key >= g (torch.bincount would read its input's max on the host).
        offsets = torch.searchsorted(sorted_key, torch.arange(E + 1, device=x.device))
        routed = torch.arange(rows, device=x.device) < offsets[E]
        token = order // k
        block = self.weight_granularity == "block"
        mm = ops.grouped_block_mm if block else ops.grouped_scaled_mm
        # Static schemes' scale per row (rows routed nowhere: any, dropped).
        expert = None if self.dynamic else sorted_key.clamp(max=E - 1)

        def quantize(h, input_scale, gathered: bool):
            """Activation rows (in sorted order, or per token when not gathered) -> (q, s) in sorted row order, s as
            the grouped kernel takes it: [rows, ceil(K/128)] per group, else one per row."""
            if not self.dynamic:
                return ops.quantize(h if gathered else h[token], "token", scale=input_scale[expert])
            if gathered and (self.act_granularity == "tensor" or self._reduces_amax()):
                h = torch.where(routed[:, None], h, 0)  # rows never computed must not enter an amax
            if gathered and self._reduces_amax():
                q, s = self._quantize_reduced(h)
                return q, (s.expand(rows) if self.act_granularity == "tensor" else s)
            q, s = ops.quantize(h, self.act_granularity, scale_format=self.scale_format)
            if not gathered:
                q = q[token]
                s = s if self.act_granularity == "tensor" else s[token]
            return q, (s.expand(rows) if self.act_granularity == "tensor" else s)

        # Rows past offsets[E] are never written by the GEMMs: what they hold is dropped at the end.
        q, s = quantize(ops.as_rows(x), self.gate_up_input_scale, gathered=False)
        gate_up = torch.empty((rows, 2 * Ip), dtype=x.dtype, device=x.device)
        mm(q, s, self.gate_up_weight, self.gate_up_scale, offsets, gate_up)
        h = self.act_fn(gate_up[:, :I]) * gate_up[:, Ip:Ip + I]
        q, s = quantize(h, self.down_input_scale, gathered=True)
        acc = torch.float32 if self.partial_sums else x.dtype
        y = torch.empty((rows, H), dtype=acc, device=x.device)
        mm(q, s, self.down_weight, self.down_scale, offsets, y)
        weights = top_k_weights.reshape(-1)[order]
        # Rows routed nowhere (never computed: they hold anything) are summed into a scratch row T, sliced off.
        dest = torch.where(routed, token, T)
        out = x.new_zeros((T + 1, H), dtype=acc).index_add_(0, dest, (y * weights[:, None]).to(acc))[:T]
        # An index outside [0, E] cannot raise here without a host read: its token's row becomes NaN instead.
        return out.masked_fill_((~valid).view(T, k).any(1, keepdim=True), float("nan"))

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, intermediate_size="
                f"{self.intermediate_size}, scheme={self.scheme}, weight={self.weight_granularity}"
                + (f", block_offset={self.block_offset}" if self.block_offset is not None else ""))


@dataclass
class ConversionReport:
    """What quantize_model replaced and what it left alone, with the reason."""

    replaced: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"fp8kern.quantize_model: replaced {len(self.replaced)} Linear layers, skipped {len(self.skipped)}"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _skip_reason(name: str, weight: torch.Tensor, skip) -> str | None:
    for pattern in skip:
        if name == pattern or name.split(".")[-1] == pattern or fnmatch.fnmatch(name, pattern):
            return f"matches skip pattern {pattern!r}"
    if weight.device.type == "meta":
        return "weight is on the meta device (load the weights first)"
    if weight.dtype not in INPUT_DTYPES:
        return f"weight dtype {weight.dtype} is not bfloat16, float16 or float32"
    return None


def _experts_skip_reason(name: str, module: nn.Module, skip, scheme: str) -> str | None:
    why = _skip_reason(name, module.gate_up_proj, skip) or fused_experts_unsupported(module)
    if why is None and not SCHEMES[scheme][1]:
        why = (f"scheme={scheme!r} needs calibrated input scales per expert, which quantize_model does not measure "
               "for MoE experts (Fp8Experts.from_experts takes them); dynamic schemes convert them")
    return why


@torch.no_grad()
def _calibrate(model: nn.Module, names: list[str], data) -> dict[str, float]:
    """Static per-tensor input scales: amax over the calibration batches of each layer's input, / 448. Layers the
    batches never reach get no entry (a guessed scale would ruin them)."""
    amax = {}
    modules = dict(model.named_modules())

    def record(n, x):
        v = x.detach().abs().amax().float().cpu()
        amax[n] = torch.maximum(amax[n], v) if n in amax else v

    hooks = [modules[n].register_forward_pre_hook(lambda mod, args, n=n: record(n, args[0])) for n in names]
    try:
        for batch in data:
            model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
    finally:
        for h in hooks:
            h.remove()
    return {n: max(float(v) / 448.0, 2.0**-126) for n, v in amax.items()}


def quantize_model(model: nn.Module, scheme: str = "dynamic_per_token", skip=("lm_head",), *, calibration_data=None,
                   **kwargs) -> ConversionReport:
    """Replace every eligible nn.Linear of model with an Fp8Linear, and every MoE experts module that transformers
    holds as 3-D tensors with an Fp8Experts, in place; returns what was replaced and skipped (with the reason).

    skip: names or glob patterns (full dotted name or last component) to leave in high precision.
    calibration_data: for scheme='static_per_tensor', an iterable of model inputs (a tensor, or a tuple of args)
    run through the unquantized model to measure each layer's input amax.
    Other keyword arguments go to Fp8Linear (weight_granularity, scale_format, fast_accum).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r}, expected one of {sorted(SCHEMES)}")
    if isinstance(skip, str):
        skip = (skip,)
    report = ConversionReport()
    # Every name of every Linear: a module shared under two names (tied or aliased) is converted once and the one
    # Fp8Linear set under both names.
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Linear) and not isinstance(module, Fp8Linear):
            names.setdefault(id(module), []).append(name)
    targets = []
    for aliases in names.values():
        why = next((w for w in (_skip_reason(n, model.get_submodule(n).weight, skip) for n in aliases) if w), None)
        if why:
            report.skipped.update({n: why for n in aliases})
        else:
            targets.append(aliases)
    scales = {}
    if not SCHEMES[scheme][1]:
        if calibration_data is None:
            raise ValueError(f"scheme={scheme!r} needs calibration_data to measure the static input scales")
        scales = _calibrate(model, [aliases[0] for aliases in targets], calibration_data)
    for aliases in targets:
        if not SCHEMES[scheme][1] and aliases[0] not in scales:
            report.skipped.update({n: "calibration_data never reached it (no input amax to set its static scale)"
                                   for n in aliases})
            continue
        converted = Fp8Linear.from_linear(model.get_submodule(aliases[0]), scheme,
                                          input_scale=scales.get(aliases[0]), **kwargs)
        for name in aliases:
            _set_submodule(model, name, converted)
            report.replaced.append(name)
    # MoE experts held as 3-D tensors (transformers' fused experts modules) become Fp8Experts.
    for name, module in list(model.named_modules()):
        if not is_fused_experts(module):
            continue
        why = _experts_skip_reason(name, module, skip, scheme)
        if why:
            report.skipped[name] = why
            continue
        _set_submodule(model, name, Fp8Experts.from_experts(module, scheme, **kwargs))
        report.replaced.append(name)
    return report


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
