"""AMD Quark checkpoints: FP8 W8A8 per-tensor static, 'ptpc_fp8' (per-channel weights with per-token dynamic
activations), and INT4-FP8 W4A8 (weights quantized to FP8 per tensor and then INT4 per channel; see int4_fp8.py).

config.json: quantization_config = {"quant_method": "quark", "global_quant_config": {"weight": {"dtype":
"fp8_e4m3", "qscheme": "per_tensor" | "per_channel", ...} | [FP8 per_tensor, INT4 per_channel], "input_tensors":
{"dtype": "fp8_e4m3", "qscheme": "per_tensor" | "per_channel", "is_dynamic": bool} | null}, "layer_quant_config":
{pattern: {...}}, "layer_type_quant_config": {class name: {...}}, "exclude": [...], "export": {"kv_cache_group":
[...], "pack_method": "reorder" | "order"}}. Patterns are fnmatch globs on module names; a module takes the first
matching layer_quant_config, else its class's layer_type_quant_config, else global_quant_config.
Tensors: '<module>.weight' e4m3 (or INT4-packed int32), '<module>.weight_scale' (real = fp8 * scale; the per-tensor
FP8 scale in an INT4-FP8 layer), '<module>.weight_scale_2' (or the Grok-1 export's 'weight_scale1': the per-channel
INT4 scale), '<module>.input_scale', and zero points of symmetric quantizers (all zero, checked and dropped).
Other INT4 layouts (W4A16, per-group, uint4 with zero points) are refused.
"""

from __future__ import annotations

import fnmatch

from . import int4_fp8
from .common import CheckpointFormat, LayerSpec, choose_scheme, unsupported

_WEIGHT_QSCHEME = {"per_tensor": "tensor", "per_channel": "channel"}
# Activations: Quark's 'per_channel' on an input tensor is per token (one scale per row), as vLLM reads ptpc_fp8.
_ACT_QSCHEME = {"per_tensor": "tensor", "per_channel": "token", "per_token": "token"}


def _match(module: str, pattern: str) -> bool:
    return module == pattern or fnmatch.fnmatchcase(module, pattern)


def _is_int4_fp8(weight) -> bool:
    """Whether a quantizer config's 'weight' is exactly the INT4-FP8 chain: static FP8 e4m3 per tensor, then
    static symmetric INT4 per output channel (ch_axis 0)."""
    if not (isinstance(weight, list) and len(weight) == 2 and all(isinstance(w, dict) for w in weight)):
        return False
    fp8, int4 = weight
    return (fp8.get("dtype") == "fp8_e4m3" and fp8.get("qscheme") == "per_tensor" and not fp8.get("is_dynamic")
            and int4.get("dtype") == "int4" and int4.get("qscheme") == "per_channel"
            and int4.get("ch_axis", 0) == 0 and int4.get("symmetric", True) is not False
            and not int4.get("is_dynamic") and int4.get("group_size") in (None, 0, -1))


class Quark(int4_fp8.Int4Fp8Weights, CheckpointFormat):
    name = "quark"
    quant_method = "quark"
    suffixes = {"weight": "weight", "weight_scale": "weight_scale", "input_scale": "input_scale",
                "weight_scale_2": "weight_scale", "weight_scale1": "weight_scale",
                "weight_zero_point": "zero_point", "weight_zero_point_2": "zero_point",
                "input_zero_point": "zero_point"}

    def __init__(self, config, header):
        super().__init__(config, header)
        q = self.qconfig
        self.exclude = list(q.get("exclude") or [])
        self.by_name = q.get("layer_quant_config") or {}
        self.by_type = q.get("layer_type_quant_config") or {}
        method = (q.get("export") or {}).get("pack_method", "reorder")
        if method not in int4_fp8.PACK_METHODS:
            raise unsupported("Quark export.pack_method", method, f"expected one of {sorted(int4_fp8.PACK_METHODS)}")
        self.pack_order = int4_fp8.PACK_METHODS[method]
        self._specs: dict[tuple, tuple] = {}  # (module, class names) -> (LayerSpec | None, INT4-FP8?)

    def _config_of(self, module: str, class_names) -> tuple[str, dict] | None:
        if any(_match(module, p) for p in self.exclude):
            return None
        for pattern, cfg in self.by_name.items():
            if _match(module, pattern):
                return f"layer_quant_config[{pattern!r}]", cfg
        for cls_name, cfg in self.by_type.items():
            if cls_name in class_names:
                return f"layer_type_quant_config[{cls_name!r}]", cfg
        g = self.qconfig.get("global_quant_config")
        return ("global_quant_config", g) if g else None

    def _resolve(self, module: str, class_names=("Linear",)) -> tuple:
        """(spec or None where excluded, whether the layer is INT4-FP8), from the config and checked against how
        the checkpoint stores the weight."""
        cached = (module, tuple(class_names))
        if cached not in self._specs:
            found = self._config_of(module, class_names)
            if found is None:
                self._specs[cached] = (None, False)
            else:
                spec, int4 = self._spec(*found)
                info = self.header.get(f"{module}.weight")
                packed = info is not None and int4_fp8.packed_shape(info) is not None
                if info is not None and packed != int4:
                    raise ValueError(f"Quark quantization_config ({found[0]}) says {module} is "
                                     f"{'INT4-FP8 (int32-packed weight)' if int4 else 'FP8'}, but the checkpoint "
                                     f"stores {module}.weight as {info.dtype}; the config and tensors disagree")
                self._specs[cached] = (spec, int4)
        return self._specs[cached]

    def _spec(self, where: str, cfg: dict) -> tuple[LayerSpec, bool]:
        w = cfg.get("weight")
        int4 = _is_int4_fp8(w)
        if isinstance(w, list) and not int4:
            raise unsupported(f"Quark {where}.weight", [d.get("dtype") if isinstance(d, dict) else d for d in w],
                              "the only multi-stage weight quantization fp8kern reads is INT4-FP8: fp8_e4m3 "
                              "per_tensor, then int4 per_channel (ch_axis 0, symmetric)")
        if int4:
            gran = "channel"
        else:
            w = w or {}
            if "int4" in str(w.get("dtype")) or "uint4" in str(w.get("dtype")):
                raise unsupported(f"Quark {where}.weight.dtype", w.get("dtype"),
                                  "INT4 without the FP8 stage (W4A16, W4A8 per group) is not supported; fp8kern "
                                  "loads fp8_e4m3 weights and INT4-FP8 (fp8_e4m3 per_tensor, then int4 per_channel)")
            if w.get("dtype") != "fp8_e4m3":
                raise unsupported(f"Quark {where}.weight.dtype", w.get("dtype"), "expected 'fp8_e4m3'")
            gran = _WEIGHT_QSCHEME.get(w.get("qscheme"))
            if gran is None:
                raise unsupported(f"Quark {where}.weight.qscheme", w.get("qscheme"),
                                  "expected 'per_tensor' or 'per_channel'")
        a = cfg.get("input_tensors")
        if a is None:
            return LayerSpec(choose_scheme(gran, None, True, where), gran), int4
        if isinstance(a, list) or a.get("dtype") != "fp8_e4m3":
            raise unsupported(f"Quark {where}.input_tensors.dtype",
                              a.get("dtype") if isinstance(a, dict) else a, "expected 'fp8_e4m3' or null")
        act = _ACT_QSCHEME.get(a.get("qscheme"), a.get("qscheme"))
        return LayerSpec(choose_scheme(gran, act, bool(a.get("is_dynamic")), f"Quark {where}"), gran), int4

    def layer_spec(self, module, class_names=("Linear",)):
        return self._resolve(module, class_names)[0]

    def quantized_modules(self):
        for module in int4_fp8.packed_modules(self.header):
            if self._resolve(module)[0] is None:  # (a config that is not INT4-FP8 is refused by _resolve)
                raise ValueError(f"checkpoint stores {module}.weight INT4-packed but its quantization_config "
                                 f"excludes {module}; the config and tensors disagree")
        return super().quantized_modules()

    def kv_cache_scale(self, key):
        # Quark's FP8 KV cache, declared by export.kv_cache_group: output_scale on k_proj / v_proj, or (older
        # exports) k_scale / v_scale on the attention module.
        return bool((self.qconfig.get("export") or {}).get("kv_cache_group")) and key.endswith(
            (".k_proj.output_scale", ".v_proj.output_scale", ".k_scale", ".v_scale"))
