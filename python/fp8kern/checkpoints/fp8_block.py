"""quant_method 'fp8' checkpoints: 128x128 blocks (DeepSeek-V3, Qwen3-FP8, transformers' FineGrainedFP8), or per
tensor / per channel without weight_block_size (AutoFP8, vLLM's offline FP8: e.g. neuralmagic's *-FP8 models).

Block: quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme":
"dynamic", "scale_fmt"?: "ue8m0", "modules_to_not_convert"?: [...] | null}. Tensors: '<module>.weight' e4m3 [N, K]
and '<module>.weight_scale_inv' [ceil(N/128), ceil(K/128)] in float32, bfloat16, float16 or float8_e8m0fnu. Despite
its name weight_scale_inv multiplies: real = fp8 * weight_scale_inv. Layers load as scheme 'block128', with
scale_format 'ue8m0' (power-of-two activation scales too, as DeepSeek-V3.1 computes them) when scale_fmt is 'ue8m0'
or the stored scales are float8_e8m0fnu.

INT4-FP8 (the Grok-1 INT4-FP8 export): per tensor as below, with some '<module>.weight' INT4-packed in int32 beside
'<module>.weight_scale' (per tensor) and '<module>.weight_scale1' (per channel); see int4_fp8.py. They load as
per-channel e4m3 weights.

Per tensor: quantization_config = {"quant_method": "fp8", "activation_scheme": "static" | "dynamic",
"ignored_layers"?: [...]}. Tensors: '<module>.weight' e4m3, '<module>.weight_scale' float32 (one value, or one per
output channel), real = fp8 * weight_scale, and for static activations '<module>.input_scale' (early AutoFP8
checkpoints: '<module>.act_scale'); transformers' FineGrainedFP8 without weight_block_size names them
'weight_scale_inv' (a scalar that multiplies, like the block one) and 'activation_scale'. scale_fmt 'float'
(transformers' default) means fp32 scales. Layers load as 'static_per_tensor', or for dynamic activations (no stored
activation scale, so any dynamic granularity is faithful) 'dynamic_per_token', fp8kern's more accurate one.
"""

from __future__ import annotations

import re

import math

from . import int4_fp8
from .common import CheckpointFormat, LayerSpec, choose_scheme, unsupported


_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"


def _not_converted(module: str, entry: str) -> bool:
    """Whether a modules_to_not_convert entry names module, by transformers' rule: a regex matched from the start
    of the name up to a module boundary ('model.layers.1' is not 'model.layers.11'; 'mlp.gate' names the MoE
    router, not 'mlp.gate_proj'), or a plain suffix of the name ('lm_head')."""
    try:
        if re.match(rf"(?:{entry}){_BOUNDARY}", module):
            return True
    except re.error:
        pass
    return module.endswith(entry)


class Fp8Block(int4_fp8.Int4Fp8Weights, CheckpointFormat):
    name = "fp8"
    quant_method = "fp8"
    suffixes = {"weight": "weight", "weight_scale_inv": "weight_scale"}
    # AutoFP8 / vLLM names, and transformers' FineGrainedFP8 per-tensor names (weight_scale_inv, activation_scale).
    _PER_TENSOR_SUFFIXES = {"weight": "weight", "weight_scale": "weight_scale", "input_scale": "input_scale",
                            "act_scale": "input_scale", "weight_scale_inv": "weight_scale",
                            "activation_scale": "input_scale"}

    def __init__(self, config, header):
        super().__init__(config, header)
        q = self.qconfig
        block = q.get("weight_block_size")
        self.block = block is not None
        if self.block and list(block) != [128, 128]:
            raise unsupported("quant_method 'fp8' weight_block_size", block, "fp8kern reads 128x128 block-scaled "
                              "FP8, or per-tensor / per-channel FP8 without weight_block_size")
        act = q.get("activation_scheme", "dynamic")
        if act not in ("dynamic", "static"):
            raise unsupported("quant_method 'fp8' activation_scheme", act, "expected 'dynamic' or 'static'")
        if self.block and act != "dynamic":
            raise unsupported("quant_method 'fp8' activation_scheme with weight_block_size", act,
                              "block-scaled checkpoints need dynamic activations")
        self.static = act == "static"
        if q.get("scale_fmt") not in (None, "float", "ue8m0") or (q.get("scale_fmt") == "ue8m0" and not self.block):
            raise unsupported("quant_method 'fp8' scale_fmt", q.get("scale_fmt"),
                              "expected 'float' (transformers' default), 'ue8m0' (with weight_block_size) or absent")
        if not self.block:
            self.suffixes = self._PER_TENSOR_SUFFIXES
        self.skip = list(q.get("modules_to_not_convert") or q.get("ignored_layers") or [])
        self.ue8m0 = q.get("scale_fmt") == "ue8m0"
        packed = int4_fp8.packed_modules(header)
        for module in packed:  # INT4-FP8 as the Grok-1 export stores it, per tensor only
            if self.block or not any(f"{module}.{s}" in header for s in int4_fp8.CHANNEL_SCALE_SUFFIXES):
                raise unsupported("quant_method 'fp8' weight storage", f"int32-packed {module}.weight",
                                  "INT4 weights are read only as INT4-FP8: without weight_block_size, beside a "
                                  "per-tensor weight_scale and a per-channel weight_scale1 (or weight_scale_2)")
        if packed:
            self.suffixes = {**self.suffixes, **{s: "weight_scale" for s in int4_fp8.CHANNEL_SCALE_SUFFIXES}}

    def layer_spec(self, module, class_names=("Linear",)):
        if any(_not_converted(module, s) for s in self.skip):
            return None
        if self.block:
            info = self.header.get(f"{module}.weight_scale_inv")
            ue8m0 = self.ue8m0 or (info is not None and info.dtype == "F8_E8M0")
            return LayerSpec("block128", "block", "ue8m0" if ue8m0 else "fp32")
        info = self.header.get(f"{module}.weight_scale") or self.header.get(f"{module}.weight_scale_inv")
        gran = "channel" if self.is_int4_fp8(module) or not (info is None or math.prod(info.shape) == 1) else "tensor"
        return LayerSpec(choose_scheme(gran, "tensor" if self.static else None, not self.static,
                                       f"quant_method 'fp8' layer {module}"), gran)

    def kv_cache_scale(self, key):
        return bool(self.qconfig.get("kv_cache_scheme")) and key.endswith((".k_scale", ".v_scale", ".kv_scale"))
