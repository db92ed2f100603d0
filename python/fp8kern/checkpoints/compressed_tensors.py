"""compressed-tensors 'float-quantized' checkpoints (llm-compressor FP8, FP8_DYNAMIC, FP8_BLOCK, weight-only FP8).

config.json: quantization_config = {"quant_method": "compressed-tensors", "format": "float-quantized",
"config_groups": {name: {"targets": [...], "weights": {...}, "input_activations": {...} | null, "format"?}},
"ignore": [...]}. Targets and ignore entries are class names ('Linear'), exact module names, or regexes with a
're:' prefix matched from the start of the name (compressed-tensors' own rule). Tensors: '<module>.weight' e4m3,
'<module>.weight_scale' (real = fp8 * scale), '<module>.input_scale' for static activations.

A weight-only group (input_activations null) loads as scheme 'dynamic_per_token' ('block128' for block weights):
fp8kern's GEMM takes FP8 on both sides, so it quantizes the activations dynamically at run time.
"""

from __future__ import annotations

import re

from .common import CheckpointFormat, LayerSpec, choose_scheme, unsupported

_FP8_FORMATS = ("float-quantized", "naive-quantized")
_WEIGHT_STRATEGY = {"channel": "channel", "tensor": "tensor", "block": "block"}


def _matches(name: str, class_names, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target in class_names


class CompressedTensors(CheckpointFormat):
    name = "compressed-tensors"
    quant_method = "compressed-tensors"

    def __init__(self, config, header):
        super().__init__(config, header)
        groups = self.qconfig.get("config_groups") or {}
        if not groups:
            raise unsupported("compressed-tensors quantization_config.config_groups", groups,
                              "expected at least one group with FP8 weights")
        self.groups = {name: (g, self._group_spec(name, g)) for name, g in groups.items()}
        self.ignore = list(self.qconfig.get("ignore") or [])

    def _group_spec(self, name: str, group: dict) -> LayerSpec:
        where = f"compressed-tensors config_groups[{name!r}]"
        fmt = group.get("format") or self.qconfig.get("format")
        if fmt not in _FP8_FORMATS:
            raise unsupported(f"{where} format", fmt, f"fp8kern reads {_FP8_FORMATS}")
        w = group.get("weights") or {}
        if (w.get("type"), w.get("num_bits")) != ("float", 8):
            raise unsupported(f"{where} weights type/num_bits", (w.get("type"), w.get("num_bits")),
                              "fp8kern reads FP8 weights: type 'float', num_bits 8")
        if w.get("symmetric") is False or w.get("dynamic"):
            raise unsupported(f"{where} weights (symmetric, dynamic)", (w.get("symmetric"), w.get("dynamic")),
                              "expected symmetric static weights")
        gran = _WEIGHT_STRATEGY.get(w.get("strategy"))
        if gran is None:
            raise unsupported(f"{where} weights strategy", w.get("strategy"), "expected 'channel', 'tensor' or 'block'")
        if gran == "block" and list(w.get("block_structure") or []) != [128, 128]:
            raise unsupported(f"{where} weights block_structure", w.get("block_structure"), "expected [128, 128]")
        a = group.get("input_activations")
        if a is None:
            return LayerSpec(choose_scheme(gran, None, True, where), gran)
        if (a.get("type"), a.get("num_bits")) != ("float", 8):
            raise unsupported(f"{where} input_activations type/num_bits", (a.get("type"), a.get("num_bits")),
                              "expected FP8 activations (type 'float', num_bits 8) or null")
        act = a.get("strategy")
        if act == "group" and a.get("group_size") not in (None, 128):
            raise unsupported(f"{where} input_activations group_size", a.get("group_size"), "expected 128")
        return LayerSpec(choose_scheme(gran, act, bool(a.get("dynamic")), where), gran)

    def kv_cache_scale(self, key):
        return bool(self.qconfig.get("kv_cache_scheme")) and key.endswith((".k_scale", ".v_scale"))

    def layer_spec(self, module, class_names=("Linear",)):
        if any(_matches(module, class_names, t) for t in self.ignore):
            return None
        for group, spec in self.groups.values():
            if any(_matches(module, class_names, t) for t in group.get("targets") or []):
                return spec
        return None
