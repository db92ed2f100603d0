"""torchao Float8 checkpoints saved with safetensors (transformers' TorchAoConfig with
Float8DynamicActivationFloat8WeightConfig, torchao >= 0.15): FP8 weights with dynamic FP8 activations, per row, per
tensor or in 128x128 blocks.

config.json: quantization_config = {"quant_method": "torchao", "quant_type": {"default": {"_type":
"Float8DynamicActivationFloat8WeightConfig", "_data": {"activation_dtype": float8_e4m3fn, "weight_dtype":
float8_e4m3fn, "granularity": [activation, weight] (or one for both), ...}}}, "modules_to_not_convert": [...] | null}.
Granularities: {"_type": "PerRow"} (activations per token, weights per output channel), {"_type": "PerTensor"}, or
{"_type": "PerBlock", "_data": {"block_size": [1, 128]}} for activations with [128, 128] for weights.
Tensors: '<module>._weight_qdata' e4m3 [N, K] and '<module>._weight_scale' float32 ([N, 1] per row, [1, 1] per tensor,
[N / 128, K / 128] per block), real = qdata * scale; biases and unquantized weights under their plain names. Each
shard's metadata holds a JSON description per original weight name ('_type': 'Float8Tensor'), checked against the
tensors. Which Linears torchao quantized is read from the tensors (torchao leaves some in high precision).
"""

from __future__ import annotations

import json

from .common import FP8_HEADER_DTYPES, CheckpointFormat, LayerSpec, choose_scheme, unsupported

_CONFIG = "Float8DynamicActivationFloat8WeightConfig"
_E4M3 = "float8_e4m3fn"


def _granularity(g: dict, role: str) -> str:
    """torchao granularity JSON -> fp8kern granularity ('token'/'group' for activations, 'channel'/'block' for
    weights, 'tensor')."""
    kind = g.get("_type") if isinstance(g, dict) else g
    if kind == "PerRow" and (g.get("_data") or {}).get("dim", -1) in (-1, 1):
        return "token" if role == "activation" else "channel"
    if kind == "PerTensor":
        return "tensor"
    if kind == "PerBlock":
        block = list((g.get("_data") or {}).get("block_size") or [])
        if block == ([1, 128] if role == "activation" else [128, 128]):
            return "group" if role == "activation" else "block"
    raise unsupported(f"torchao {role} granularity", g, "fp8kern reads PerRow, PerTensor, or PerBlock [1, 128] "
                      "activations with [128, 128] weights")


class TorchAO(CheckpointFormat):
    name = "torchao"
    quant_method = "torchao"
    suffixes = {"_weight_qdata": "weight", "_weight_scale": "weight_scale"}

    def __init__(self, config, header):
        super().__init__(config, header)
        quant_type = self.qconfig.get("quant_type")
        if not isinstance(quant_type, dict) or set(quant_type) != {"default"}:
            raise unsupported("torchao quantization_config.quant_type", quant_type if not isinstance(quant_type, dict)
                              else sorted(quant_type), "fp8kern reads one 'default' config for every Linear")
        cfg = quant_type["default"]
        kind = cfg.get("_type") if isinstance(cfg, dict) else cfg
        if kind != _CONFIG:
            raise unsupported("torchao quant_type", kind, f"fp8kern reads {_CONFIG} (FP8 weights and activations); "
                              "torchao's INT4 / INT8 / MX / NVFP4 configs are not supported")
        data = cfg.get("_data") or {}
        for field in ("activation_dtype", "weight_dtype"):
            dtype = (data.get(field) or {}).get("_data", _E4M3)
            if dtype != _E4M3:
                raise unsupported(f"torchao {_CONFIG}.{field}", dtype, f"expected {_E4M3}")
        gran = data.get("granularity") or {"_type": "PerTensor"}  # torchao's default
        act, weight = gran if isinstance(gran, list) else (gran, gran)
        act, weight = _granularity(act, "activation"), _granularity(weight, "weight")
        if (act == "group") != (weight == "block"):
            raise unsupported("torchao granularity (activation, weight)", (act, weight),
                              "block weights go with 1x128 activation groups")
        scheme = "block128" if weight == "block" else choose_scheme(weight, act, True, "torchao")
        self.spec = LayerSpec(scheme, weight)
        old = sorted(k for k in header if k.endswith((".weight:qdata", ".weight:scale")))
        if old:
            raise unsupported("torchao tensor naming", old[0], "this is the naming of torchao < 0.15; load the model "
                              "with that torchao and save it again with torchao >= 0.15")
        self._check_metadata()

    def _check_metadata(self) -> None:
        """Each shard's metadata describes the weights it holds as Float8Tensor: a tensor torchao wrote otherwise
        is refused instead of read by the wrong rule."""
        for shard, meta in (getattr(self.header, "metadata", None) or {}).items():
            for key, info in self.header.items():
                if info.shard != shard or not key.endswith("._weight_qdata"):
                    continue
                name = key[: -len("._weight_qdata")] + ".weight"
                if name not in meta:
                    continue  # torchao writes it; a checkpoint whose metadata was stripped is read by the tensors
                try:
                    kind = json.loads(meta[name]).get("_type")
                except (ValueError, AttributeError):
                    kind = meta[name]
                if kind != "Float8Tensor":
                    raise unsupported(f"torchao metadata of {name} in {shard}", kind, "expected 'Float8Tensor'")

    def layer_spec(self, module, class_names=("Linear",)):
        return self.spec

    def quantized_modules(self):
        return {key[: -len("._weight_qdata")]: info.shape for key, info in self.header.items()
                if key.endswith("._weight_qdata") and info.dtype in FP8_HEADER_DTYPES and len(info.shape) == 2}
