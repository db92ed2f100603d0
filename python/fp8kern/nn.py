"""Fp8Linear, a drop-in nn.Linear holding an e4m3 weight, and quantize_model to convert a model in place."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from . import ops
from .reference import BLOCK, E4M3, E8M0

# scheme -> (activation granularity, dynamic activations?, default weight granularity, allowed weight granularities)
SCHEMES = {
    "dynamic_per_token": ("token", True, "channel", ("channel", "tensor")),
    "dynamic_per_tensor": ("tensor", True, "tensor", ("tensor", "channel")),
    "static_per_tensor": ("tensor", False, "tensor", ("tensor", "channel")),
    "block128": ("group", True, "block", ("block",)),
}


def _scale_shape(granularity: str, out_features: int, in_features: int) -> tuple:
    return {"channel": (out_features, 1), "tensor": (1,),
            "block": (math.ceil(out_features / BLOCK), math.ceil(in_features / BLOCK))}[granularity]


class Fp8Linear(nn.Module):
    """y = x @ W.T + b with W stored as float8_e4m3fn and a scale, activations quantized on the fly.

    scheme: 'dynamic_per_token' (per-token activations, per-channel weights: llm-compressor FP8_DYNAMIC),
    'dynamic_per_tensor', 'static_per_tensor' (a calibrated input_scale: AMD Quark, FP8 static) or 'block128'
    (1x128 activation groups x 128x128 weight blocks: DeepSeek-V3, Qwen3-FP8). weight_granularity overrides the
    scheme's weight scale layout ('channel' or 'tensor'; 'block' for block128).
    forward accepts any leading dims and bf16/fp16/fp32 input, returns the input's dtype, and never synchronizes
    with the host, so it runs under torch.compile and CUDA graph capture.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scheme: str = "dynamic_per_token", *,
                 weight_granularity: str | None = None, scale_format: str = "fp32", fast_accum: bool = False,
                 device=None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
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
        if dtype not in ops.OUT_DTYPES:
            raise TypeError(f"dtype={dtype}, expected torch.bfloat16, torch.float16 or torch.float32")
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
        dtype = w.dtype if w.dtype in ops.OUT_DTYPES else torch.bfloat16
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme, device=w.device, dtype=dtype,
                **kwargs)
        q, s = ops.quantize_weight(w if w.dtype in ops.INPUT_DTYPES else w.float(), m.weight_granularity,
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

    # Buffers whose dtype is part of the format: model.to(dtype) / .half() / .bfloat16() move them but keep the
    # dtype (e4m3 and e8m0 count as floating point, so nn.Module would convert them and break forward).
    _FIXED_DTYPE = ("weight", "weight_scale", "input_scale")

    def _apply(self, fn, recurse=True):
        fixed = {id(b) for name, b in self._buffers.items() if name in self._FIXED_DTYPE and b is not None}

        def keep_dtype(t):
            if id(t) not in fixed:
                return fn(t)
            probe = fn(t.new_empty(0))  # what fn does, without converting the data when only the device may change
            return t.to(device=probe.device) if probe.dtype != t.dtype else fn(t)

        return super()._apply(keep_dtype, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Fp8Linear: input has {x.shape[-1]} features in the last dim, expected {self.in_features}")
        if x.dtype not in ops.OUT_DTYPES:
            raise TypeError(f"Fp8Linear: input dtype {x.dtype}, expected bfloat16, float16 or float32")
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

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={self.scheme}, weight={self.weight_granularity}")


@dataclass
class ConversionReport:
    """What quantize_model replaced and what it left alone, with the reason."""

    replaced: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"fp8kern.quantize_model: replaced {len(self.replaced)} Linear layers, skipped {len(self.skipped)}"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _skip_reason(name: str, module: nn.Linear, skip) -> str | None:
    for pattern in skip:
        if name == pattern or name.split(".")[-1] == pattern or fnmatch.fnmatch(name, pattern):
            return f"matches skip pattern {pattern!r}"
    if module.weight.device.type == "meta":
        return "weight is on the meta device (load the weights first)"
    if module.weight.dtype not in ops.INPUT_DTYPES:
        return f"weight dtype {module.weight.dtype} is not bfloat16, float16 or float32"
    return None


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
    """Replace every eligible nn.Linear of model with an Fp8Linear, in place; returns what was replaced and skipped.

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
        why = next((w for w in (_skip_reason(n, model.get_submodule(n), skip) for n in aliases) if w), None)
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
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, converted)
            report.replaced.append(name)
    return report
