"""from_pretrained: build a transformers model without weight memory, swap its quantized Linears for Fp8Linear, and
stream the safetensors shards straight into it (FP8 weights and scales are copied, never dequantized)."""

from __future__ import annotations

import contextlib
import copy
import os
import re
import warnings

import torch
from torch import nn

from ..nn import Fp8Linear
from ..reference import E4M3
from .common import (CheckpointFormat, LayerSpec, TensorInfo, fp8_modules, progress, read_config, read_header,
                     require)
from .compressed_tensors import CompressedTensors
from .fp8_block import Fp8Block
from .grok2 import Grok2
from .quark import Quark

# Grok-2 first: it is recognised by tensor names, whatever quantization_config the config carries.
FORMATS: dict[str, type[CheckpointFormat]] = {f.name: f for f in (Grok2, CompressedTensors, Fp8Block, Quark)}


def _detect(config: dict, header: dict[str, TensorInfo]) -> str:
    for name, cls in FORMATS.items():
        if cls.matches(config, header):
            return name
    qc = config.get("quantization_config")
    if qc is None:
        raise ValueError("unsupported checkpoint: config.json has no quantization_config and no tensor is named "
                         "'*.weight.scale' (Grok-2 FP8), so this is not an FP8 checkpoint fp8kern knows; formats "
                         f"read: {sorted(FORMATS)}")
    raise ValueError(f"unsupported checkpoint: quantization_config.quant_method is {qc.get('quant_method')!r}; "
                     f"fp8kern reads {sorted(FORMATS)} (compressed-tensors float-quantized, quant_method 'fp8' "
                     "128x128 blocks, AMD Quark FP8, Grok-2 FP8)")


def open_format(path: str, format: str = "auto") -> tuple[dict, dict[str, TensorInfo], CheckpointFormat]:
    """(config, header, format object) of the checkpoint directory path; format='auto' detects it."""
    config = read_config(path)
    header = read_header(path)
    if format == "auto":
        format = _detect(config, header)
    elif format not in FORMATS:
        raise ValueError(f"format={format!r}, expected 'auto' or one of {sorted(FORMATS)}")
    return config, header, FORMATS[format](config, header)


def detect_format(path: str) -> str:
    """The name of the FP8 checkpoint format in directory path: one of FORMATS' keys; ValueError naming what was
    found when it is none of them."""
    return _detect(read_config(path), read_header(path))


@contextlib.contextmanager
def _parameters_on_meta():
    """Create parameters on the meta device but buffers for real: non-persistent buffers (rotary inv_freq) are
    computed in __init__ and never stored in a checkpoint, so they must not be lost to meta."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _class_names(module: nn.Module) -> tuple:
    return tuple(c.__name__ for c in type(module).__mro__)


def _swap_linears(model: nn.Module, fmt: CheckpointFormat, header, dtype,
                  ignore=()) -> dict[str, tuple[Fp8Linear, LayerSpec]]:
    """Replace each nn.Linear whose weight the checkpoint stores in FP8 by a meta Fp8Linear of its spec (FP8
    weights the model class ignores, `ignore` patterns, are left to the loading loop, which skips them)."""
    stored = {m: shape for m, shape in fp8_modules(header).items()
              if not any(p.search(f"{m}.weight") for p in ignore)}
    swapped = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name not in stored:
            continue
        spec = fmt.layer_spec(name, _class_names(module))
        if spec is None:
            raise ValueError(f"checkpoint stores {name}.weight as float8_e4m3fn but its quantization_config excludes "
                             f"{name} (ignore / exclude / modules_to_not_convert); the config and tensors disagree")
        if stored[name] != (module.out_features, module.in_features):
            raise ValueError(f"checkpoint tensor {name}.weight has shape {stored[name]}, expected "
                             f"{(module.out_features, module.in_features)} for the model built from config.json")
        fp8 = Fp8Linear(module.in_features, module.out_features, module.bias is not None, device="meta", dtype=dtype,
                        **spec.fp8linear_kwargs())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, fp8)
        swapped[name] = (fp8, spec)
    unplaced = sorted(set(stored) - set(swapped))
    if unplaced:
        raise ValueError(f"checkpoint stores FP8 weights for modules that are not nn.Linear in the model built from "
                         f"config.json: {unplaced}. fp8kern runs FP8 nn.Linear layers; MoE experts that this "
                         "transformers version fuses into 3-D parameters are not supported yet")
    return swapped


def _assign(model: nn.Module, key: str, value: torch.Tensor) -> None:
    """Put value in place of the (meta) parameter or buffer called key, checking its shape."""
    parent, _, attr = key.rpartition(".")
    module = model.get_submodule(parent) if parent else model
    old = module._parameters.get(attr) if attr in module._parameters else module._buffers.get(attr)
    if old is not None and tuple(old.shape) != tuple(value.shape):
        raise ValueError(f"checkpoint tensor for {key!r} has shape {tuple(value.shape)}, expected {tuple(old.shape)}")
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else False)
    else:
        module._buffers[attr] = value


def _model_key(key: str, fmt: CheckpointFormat, swapped) -> tuple[str, str] | None:
    """(module, Fp8Linear buffer) when key is a quantized tensor of a swapped module, else None."""
    hit = fmt.split(key)
    return hit if hit is not None and hit[0] in swapped else None


def from_pretrained(path: str, *, format: str = "auto", device=None, dtype: torch.dtype = torch.bfloat16):
    """Load an FP8 Hugging Face checkpoint directory into a transformers model whose quantized Linears are
    fp8kern Fp8Linear layers; returns the model in eval mode on device (default cpu).

    format: 'auto' (detect, see detect_format) or one of 'compressed-tensors', 'fp8', 'quark', 'grok2'.
    dtype: dtype of everything that is not FP8 (embeddings, norms, excluded Linears, biases) and of the outputs.
    FP8 weights and scales are copied as stored (converted only to fp8kern's real = fp8 * scale convention, e.g.
    Grok-2's inverse scales); weight-only checkpoints get dynamically quantized activations.
    Raises ValueError for unsupported formats, and for missing or unexpected tensors, naming them.
    """
    transformers = require("transformers")
    safe_open = require("safetensors").safe_open
    config, header, fmt = open_format(path, format)
    device = torch.device(device if device is not None else "cpu")

    # Without quantization_config, transformers' own quantizers stay out of the way.
    cfg_dict = copy.deepcopy(config)
    cfg_dict.pop("quantization_config", None)
    hf_config = transformers.AutoConfig.for_model(**cfg_dict)
    with _parameters_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    # The model class's own loading rules, as transformers applies them: tensors it ignores (e.g. DeepSeek-V3's
    # multi-token-prediction layer) and modules kept in fp32 (_keep_in_fp32_modules when loading in fp16,
    # _keep_in_fp32_modules_strict in fp16 or bf16, e.g. MoE routers' correction biases).
    ignore = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    fp32_names = set(getattr(model, "_keep_in_fp32_modules_strict", None) or []) \
        if dtype in (torch.float16, torch.bfloat16) else set()
    if dtype == torch.float16:
        fp32_names |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    keep_fp32 = re.compile("|".join(re.escape(m) for m in sorted(fp32_names))) if fp32_names else None
    swapped = _swap_linears(model, fmt, header, dtype, ignore)

    expected = set(model.state_dict().keys())
    loaded, unexpected, kv_scales, ignored = set(), [], [], []
    for shard in progress(sorted({i.shard for i in header.values()}), desc=f"Loading {fmt.name} checkpoint"):
        with safe_open(os.path.join(path, shard), framework="pt", device="cpu") as f:
            for key in f.keys():
                hit = _model_key(key, fmt, swapped)
                if hit is not None:
                    module, buffer = hit
                    target = f"{module}.{buffer}"
                    value = _fp8_tensor(fmt, *swapped[module], buffer, f.get_tensor(key), key)
                elif key in expected:
                    target, value = key, f.get_tensor(key)
                    if value.is_floating_point():
                        value = value.to(torch.float32 if keep_fp32 and keep_fp32.search(key) else dtype)
                elif fmt.kv_cache_scale(key):
                    kv_scales.append(key)
                    continue
                elif any(p.search(key) for p in ignore):
                    ignored.append(key)
                    continue
                else:
                    unexpected.append(key)
                    continue
                _assign(model, target, value.to(device))
                loaded.add(target)
    if unexpected:
        raise ValueError(f"checkpoint {path!r} has {len(unexpected)} tensor(s) that fit nothing in the "
                         f"{type(model).__name__} built from config.json ({fmt.name} format): {sorted(unexpected)}")
    if ignored:
        warnings.warn(f"{type(model).__name__} does not use {len(ignored)} checkpoint tensor(s) such as "
                      f"{ignored[0]!r}; skipped them as transformers does", stacklevel=2)
    if kv_scales:
        warnings.warn(f"fp8kern keeps the KV cache in {dtype}: ignored {len(kv_scales)} KV-cache scale tensor(s) "
                      f"such as {kv_scales[0]!r}", stacklevel=2)
    loaded |= _tie_embeddings(model, hf_config, loaded)
    missing = sorted(expected - loaded)
    if missing:
        names = [f"{k} (checkpoint tensor {fmt.checkpoint_key(*k.rsplit('.', 1))})"
                 if k.rsplit(".", 1)[0] in swapped else k for k in missing]
        raise ValueError(f"checkpoint {path!r} lacks {len(missing)} tensor(s) the model needs: {names}")
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if leftover:
        raise ValueError(f"no checkpoint tensor filled {leftover}; they are still on the meta device")
    return model.to(device).eval()


def _fp8_tensor(fmt: CheckpointFormat, layer: Fp8Linear, spec: LayerSpec, buffer: str, raw: torch.Tensor,
                key: str) -> torch.Tensor:
    """A stored tensor of a quantized module, as the Fp8Linear buffer it fills."""
    if buffer == "weight":
        if raw.dtype != E4M3:
            raise ValueError(f"checkpoint tensor {key!r} has dtype {raw.dtype}, expected torch.float8_e4m3fn")
        return raw
    if buffer == "weight_scale":
        return fmt.weight_scale(raw, spec, layer.out_features, layer.in_features, key)
    if layer.dynamic:
        raise ValueError(f"checkpoint tensor {key!r} is a static activation scale, but its layer loads as scheme "
                         f"{layer.scheme!r} (dynamic activations) per the quantization_config")
    return fmt.input_scale(raw, key)


def _tie_embeddings(model: nn.Module, hf_config, loaded: set) -> set:
    """With tie_word_embeddings the checkpoint omits the output embedding: share the input embedding's weight.
    Returns the key it filled (empty when nothing was tied)."""
    text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    if not getattr(text_config, "tie_word_embeddings", False):
        return set()
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or isinstance(out, Fp8Linear):
        return set()
    out_key = next((f"{n}.weight" for n, m in model.named_modules() if m is out), None)
    if out_key is None or out_key in loaded or "weight" not in getattr(inp, "_parameters", {}):
        return set()
    in_key = next(f"{n}.weight" for n, m in model.named_modules() if m is inp)
    if in_key not in loaded:
        return set()
    out.weight = inp.weight
    return {out_key}
