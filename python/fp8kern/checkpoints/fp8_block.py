"""quant_method 'fp8' block checkpoints: DeepSeek-V3, Qwen3-FP8, transformers' FineGrainedFP8.

config.json: quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128],
"activation_scheme": "dynamic", "scale_fmt"?: "ue8m0", "modules_to_not_convert"?: [...] | null}.
Tensors: '<module>.weight' e4m3 [N, K] and '<module>.weight_scale_inv' [ceil(N/128), ceil(K/128)] in float32,
bfloat16, float16 or float8_e8m0fnu. Despite its name weight_scale_inv multiplies: real = fp8 * weight_scale_inv.
Layers load as scheme 'block128', with scale_format 'ue8m0' (power-of-two activation scales too, as DeepSeek-V3.1
computes them) when scale_fmt is 'ue8m0' or the stored scales are float8_e8m0fnu.
"""

from __future__ import annotations

import re

from .common import CheckpointFormat, LayerSpec, unsupported


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


class Fp8Block(CheckpointFormat):
    name = "fp8"
    quant_method = "fp8"
    suffixes = {"weight": "weight", "weight_scale_inv": "weight_scale"}

    def __init__(self, config, header):
        super().__init__(config, header)
        q = self.qconfig
        if list(q.get("weight_block_size") or []) != [128, 128]:
            raise unsupported("quant_method 'fp8' weight_block_size", q.get("weight_block_size"),
                              "fp8kern reads 128x128 block-scaled FP8 (per-tensor 'fp8' checkpoints without "
                              "weight_block_size are not supported)")
        if q.get("activation_scheme", "dynamic") != "dynamic":
            raise unsupported("quant_method 'fp8' activation_scheme", q.get("activation_scheme"), "expected 'dynamic'")
        if q.get("scale_fmt") not in (None, "ue8m0"):
            raise unsupported("quant_method 'fp8' scale_fmt", q.get("scale_fmt"), "expected 'ue8m0' or absent")
        self.skip = list(q.get("modules_to_not_convert") or q.get("ignored_layers") or [])
        self.ue8m0 = q.get("scale_fmt") == "ue8m0"

    def layer_spec(self, module, class_names=("Linear",)):
        if any(_not_converted(module, s) for s in self.skip):
            return None
        info = self.header.get(f"{module}.weight_scale_inv")
        ue8m0 = self.ue8m0 or (info is not None and info.dtype == "F8_E8M0")
        return LayerSpec("block128", "block", "ue8m0" if ue8m0 else "fp32")
