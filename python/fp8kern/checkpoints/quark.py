"""AMD Quark FP8 checkpoints (FP8 W8A8 per-tensor static, and 'ptpc_fp8': per-channel weights with per-token
dynamic activations).

config.json: quantization_config = {"quant_method": "quark", "global_quant_config": {"weight": {"dtype":
"fp8_e4m3", "qscheme": "per_tensor" | "per_channel", ...}, "input_tensors": {"dtype": "fp8_e4m3", "qscheme":
"per_tensor" | "per_channel", "is_dynamic": bool} | null}, "layer_quant_config": {pattern: {...}},
"layer_type_quant_config": {class name: {...}}, "exclude": [...]}. Patterns are fnmatch globs on module names.
Tensors: '<module>.weight' e4m3, '<module>.weight_scale' (real = fp8 * scale), '<module>.input_scale'.
Quark's INT4 formats (W4A8, W4A16: weight dtype 'int4'/'uint4', weights packed into int32) are rejected.
"""

from __future__ import annotations

import fnmatch

from .common import CheckpointFormat, LayerSpec, choose_scheme, unsupported

_WEIGHT_QSCHEME = {"per_tensor": "tensor", "per_channel": "channel"}
# Activations: Quark's 'per_channel' on an input tensor is per token (one scale per row), as vLLM reads ptpc_fp8.
_ACT_QSCHEME = {"per_tensor": "tensor", "per_channel": "token", "per_token": "token"}


def _match(module: str, pattern: str) -> bool:
    return module == pattern or fnmatch.fnmatchcase(module, pattern)


class Quark(CheckpointFormat):
    name = "quark"
    quant_method = "quark"

    def __init__(self, config, header):
        super().__init__(config, header)
        q = self.qconfig
        self.exclude = list(q.get("exclude") or [])
        self.by_name = q.get("layer_quant_config") or {}
        self.by_type = q.get("layer_type_quant_config") or {}
        for where, cfg in [("global_quant_config", q.get("global_quant_config"))] + \
                          [(f"layer_quant_config[{k!r}]", v) for k, v in self.by_name.items()] + \
                          [(f"layer_type_quant_config[{k!r}]", v) for k, v in self.by_type.items()]:
            self._check_int4(where, cfg)
        packed = sorted(k for k, i in header.items() if k.endswith(".weight") and i.dtype in ("I32", "U32"))
        if packed:
            raise unsupported("Quark weight storage", f"int32-packed weights ({packed[0]}, ...)",
                              "this is an INT4 (W4A8/W4A16) checkpoint; fp8kern loads FP8 (fp8_e4m3) weights only")

    @staticmethod
    def _check_int4(where: str, cfg) -> None:
        cfg = cfg or {}
        for field in ("weight", "input_tensors"):
            spec = cfg.get(field)
            if isinstance(spec, list):  # several quantizers chained on one tensor, e.g. W4A8's [fp8 per_tensor, int4]
                raise unsupported(f"Quark {where}.{field}", [d.get("dtype") if isinstance(d, dict) else d for d in spec],
                                  "multi-stage quantization (e.g. INT4 W4A8) is not supported; fp8kern loads a "
                                  "single fp8_e4m3 quantizer per tensor")
        dtype = (cfg.get("weight") or {}).get("dtype")
        if dtype is not None and "int4" in str(dtype):
            raise unsupported(f"Quark {where}.weight.dtype", dtype,
                              "INT4 W4A8 / W4A16 is not supported; fp8kern loads FP8 (fp8_e4m3) weights only")

    def _spec(self, where: str, cfg: dict) -> LayerSpec:
        w = cfg.get("weight") or {}
        if w.get("dtype") != "fp8_e4m3":
            raise unsupported(f"Quark {where}.weight.dtype", w.get("dtype"), "expected 'fp8_e4m3'")
        gran = _WEIGHT_QSCHEME.get(w.get("qscheme"))
        if gran is None:
            raise unsupported(f"Quark {where}.weight.qscheme", w.get("qscheme"),
                              "expected 'per_tensor' or 'per_channel'")
        a = cfg.get("input_tensors")
        if a is None:
            return LayerSpec(choose_scheme(gran, None, True, where), gran)
        if a.get("dtype") != "fp8_e4m3":
            raise unsupported(f"Quark {where}.input_tensors.dtype", a.get("dtype"), "expected 'fp8_e4m3' or null")
        act = _ACT_QSCHEME.get(a.get("qscheme"), a.get("qscheme"))
        return LayerSpec(choose_scheme(gran, act, bool(a.get("is_dynamic")), f"Quark {where}"), gran)

    def kv_cache_scale(self, key):
        # Quark's FP8 KV cache: output_scale on k_proj / v_proj, declared by export.kv_cache_group.
        return bool((self.qconfig.get("export") or {}).get("kv_cache_group")) and key.endswith(
            (".k_proj.output_scale", ".v_proj.output_scale"))

    def layer_spec(self, module, class_names=("Linear",)):
        if any(_match(module, p) for p in self.exclude):
            return None
        for pattern, cfg in self.by_name.items():
            if _match(module, pattern):
                return self._spec(f"layer_quant_config[{pattern!r}]", cfg)
        for cls_name, cfg in self.by_type.items():
            if cls_name in class_names:
                return self._spec(f"layer_type_quant_config[{cls_name!r}]", cfg)
        g = self.qconfig.get("global_quant_config")
        return self._spec("global_quant_config", g) if g else None
