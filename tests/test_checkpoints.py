"""fp8kern.checkpoints.from_pretrained and the fp8kern-dequantize CLI, on tiny Llama models written in each FP8
checkpoint format (CPU only).

Sizes (hidden 160, intermediate 320, kv 80) are not multiples of 128, so block scales have partial edge blocks.
compressed-tensors checkpoints are written by the compressed-tensors library itself; the other formats are written
tensor by tensor following their published layout, with fp8kern.quantize_weight supplying the numbers. Every
expectation (file bytes, scale conventions, float64 dequantization, error bounds) is computed here, independently of
the loader.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")
from safetensors.torch import load_file, save_file  # noqa: E402

import fp8kern  # noqa: E402
from conftest import dynamic_scale_bound  # noqa: E402
from int4_fp8_writer import (QUARK_FP8_TENSOR, QUARK_INT4_CHANNEL, REORDER, int4_fp8_quantize,  # noqa: E402
                             pack_int4)
from fp8kern.checkpoints import detect_format, from_pretrained  # noqa: E402
from fp8kern.nn import Fp8Linear  # noqa: E402

E4M3, E8M0 = torch.float8_e4m3fn, torch.float8_e8m0fnu
PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj"]
QUANT = [f"model.layers.{i}.{p}" for i in range(2) for p in PROJ]
INDEX = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------------------------
# Writing checkpoints


def llama_config(tie: bool):
    return transformers.LlamaConfig(hidden_size=160, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=256, max_position_embeddings=64,
                                    tie_word_embeddings=tie)


def read_tensors(d) -> dict:
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


def save_sharded(tensors: dict, d, n_shards: int) -> None:
    """One model.safetensors, or n_shards round-robin shards (so a weight and its scale land in different shards)
    with an index."""
    os.makedirs(d, exist_ok=True)
    if n_shards == 1:
        save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        return
    keys = sorted(tensors)
    names = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
    weight_map = {k: names[i % n_shards] for i, k in enumerate(keys)}
    for name in names:
        save_file({k: tensors[k] for k in keys if weight_map[k] == name}, os.path.join(d, name),
                  metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(d, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)


def write_config(src, dst, qconfig) -> None:
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    if qconfig is not None:
        cfg["quantization_config"] = qconfig
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    for name in os.listdir(src):
        if name not in ("config.json", "model.safetensors") and not name.endswith(".safetensors"):
            shutil.copy(os.path.join(src, name), dst)


def calibration_scales(src, ids) -> dict:
    """Static activation scales: 2 * amax / 448 of each layer's input on the test input (the margin keeps the FP8
    model's slightly different activations clear of clipping, which the per-layer check asserts)."""
    model = transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    amax = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: amax.__setitem__(n, float(a[0].abs().max()))) for n in QUANT]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return {n: 2 * v / 448 for n, v in amax.items()}


def write_ct(src, dst, preset: str, ids) -> None:
    """compressed-tensors checkpoint written by the compressed-tensors library (as llm-compressor does), with
    fp8kern.quantize_weight's scales and calibrated static input scales."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from compressed_tensors.quantization import quant_scheme

    scheme = dict(quant_scheme.PRESET_SCHEMES["FP8_DYNAMIC" if preset == "W8A16" else preset])
    if preset == "W8A16":
        scheme["input_activations"] = None
    model = transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": {"targets": ["Linear"], **scheme}},
                                                        ignore=["lm_head"]))
    gran = str(getattr(scheme["weights"].strategy, "value", scheme["weights"].strategy))
    calib = calibration_scales(src, ids) if preset == "FP8" else {}
    with torch.no_grad():
        for n in QUANT:
            m = model.get_submodule(n)
            _, s = fp8kern.quantize_weight(m.weight.float(), gran)
            m.weight_scale.copy_(s.reshape(m.weight_scale.shape))
            if n in calib:
                m.input_scale.fill_(calib[n])
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(dst, max_shard_size="150KB" if preset == "FP8_BLOCK" else "50MB")
    compressor.update_config(dst)


def write_fp8_block(src, dst, scale_dtype, n_shards: int, scale_fmt=None, skip=None) -> None:
    """quant_method 'fp8' (DeepSeek-V3 layout): weight_scale_inv [ceil(N/128), ceil(K/128)], real = fp8 * it."""
    t = read_tensors(src)
    for n in QUANT:
        q, s = fp8kern.quantize_weight(t[f"{n}.weight"].float(), "block",
                                       scale_format="ue8m0" if scale_dtype == E8M0 else "fp32")
        t[f"{n}.weight"], t[f"{n}.weight_scale_inv"] = q, s.to(scale_dtype)
    save_sharded(t, dst, n_shards)
    q = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128],
         "modules_to_not_convert": skip}
    if scale_fmt:
        q["scale_fmt"] = scale_fmt
    write_config(src, dst, q)


def write_fp8_tensor(src, dst, static: bool, ids, act_scale_name: str = "input_scale", gran: str = "tensor",
                     hf: bool = False) -> None:
    """quant_method 'fp8' without weight_block_size (AutoFP8, vLLM's offline FP8): a per-tensor (F32 scalar) or
    per-channel ([N]) weight_scale, real = fp8 * scale, and for static activations the calibrated input_scale (early
    AutoFP8 checkpoints name it act_scale). hf: as transformers' FineGrainedFP8 writes it without weight_block_size:
    weight_scale_inv (a scalar that multiplies all the same), activation_scale, scale_fmt 'float'."""
    t = read_tensors(src)
    calib = calibration_scales(src, ids) if static else {}
    for n in QUANT:
        q, s = fp8kern.quantize_weight(t[f"{n}.weight"].float(), gran)
        t[f"{n}.weight"] = q
        t[f"{n}.weight_scale_inv" if hf else f"{n}.weight_scale"] = s.reshape(()) if gran == "tensor" else s.reshape(-1)
        if static:
            t[f"{n}.{'activation_scale' if hf else act_scale_name}"] = torch.tensor(calib[n], dtype=torch.float32)
    save_sharded(t, dst, 1)
    q = {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic"}
    q.update({"weight_block_size": None, "scale_fmt": "float", "modules_to_not_convert": None} if hf else
             {"ignored_layers": ["lm_head"]})
    write_config(src, dst, q)


def quark_qconfig(weight_qscheme, input_tensors, weight_dtype="fp8_e4m3"):
    return {"quant_method": "quark", "quant_mode": "eager_mode", "exclude": ["lm_head"], "layer_quant_config": {},
            "layer_type_quant_config": {}, "export": {"kv_cache_group": [], "weight_format": "real_quantized"},
            "global_quant_config": {
                "weight": {"dtype": weight_dtype, "qscheme": weight_qscheme, "is_dynamic": False, "symmetric": True,
                           "ch_axis": 0 if weight_qscheme == "per_channel" else None, "group_size": None,
                           "round_method": "half_even", "scale_type": "float"},
                "input_tensors": input_tensors, "output_tensors": None, "bias": None}}


def write_quark(src, dst, kind: str, ids) -> None:
    """AMD Quark FP8: 'static' = per-tensor weights + static per-tensor input_scale (scalars, shape ()),
    'ptpc' = per-channel weights (scale [N]) + per-token dynamic activations."""
    t = read_tensors(src)
    calib = calibration_scales(src, ids) if kind == "static" else {}
    for n in QUANT:
        q, s = fp8kern.quantize_weight(t[f"{n}.weight"].float(), "tensor" if kind == "static" else "channel")
        t[f"{n}.weight"], t[f"{n}.weight_scale"] = q, s.reshape(()) if kind == "static" else s.reshape(-1)
        if kind == "static":
            t[f"{n}.input_scale"] = torch.tensor(calib[n], dtype=torch.float32)
    save_sharded(t, dst, 1)
    act = {"dtype": "fp8_e4m3", "symmetric": True, "group_size": None, "round_method": "half_even",
           "scale_type": "float"}
    act.update({"qscheme": "per_tensor", "is_dynamic": False, "ch_axis": None} if kind == "static" else
               {"qscheme": "per_channel", "is_dynamic": True, "ch_axis": 1})
    write_config(src, dst, quark_qconfig("per_tensor" if kind == "static" else "per_channel", act))


def write_grok2(src, dst) -> None:
    """Grok-2 FP8: '<m>.weight.scale' [N] with bf16 = fp8 / scale, i.e. scale = 1 / weight_scale per row."""
    t = read_tensors(src)
    for n in QUANT:
        q, s = fp8kern.quantize_weight(t[f"{n}.weight"].float(), "channel")
        t[f"{n}.weight"], t[f"{n}.weight.scale"] = q, torch.reciprocal(s.reshape(-1))
    save_sharded(t, dst, 2)
    write_config(src, dst, None)


def int4_fp8_layers():
    """Which layers the INT4-FP8 test checkpoints hold in INT4-FP8 (the MLPs, as the published W4A8 models do for
    their experts) and which in plain FP8 per tensor (attention, through a layer_quant_config pattern)."""
    return [n for n in QUANT if ".mlp." in n], [n for n in QUANT if ".self_attn." in n]


def write_quark_int4_fp8(src, dst, ids, channel_name: str = "weight_scale_2", static: bool = False,
                         pack_method: str = "reorder", config: str = "quark") -> None:
    """AMD Quark INT4-FP8 (W4A8): '<m>.weight' int32 [N, K/8], '<m>.weight_scale' the per-tensor FP8 scale,
    '<m>.<channel_name>' the per-channel INT4 scale [N] (weight_scale1 in the Grok-1 export); attention in plain
    FP8 per tensor; activations FP8 per tensor, dynamic, or static with calibrated input_scale. config 'fp8': the
    quantization_config SGLang serves the Grok-1 INT4-FP8 export with (quant_method 'fp8', per tensor)."""
    t = read_tensors(src)
    calib = calibration_scales(src, ids) if static else {}
    int4, fp8 = int4_fp8_layers()
    for n in int4:
        q, s_t, s_ch = int4_fp8_quantize(t[f"{n}.weight"])
        t[f"{n}.weight"] = pack_int4(q, REORDER if pack_method == "reorder" else list(range(8)))
        t[f"{n}.weight_scale"], t[f"{n}.{channel_name}"] = s_t.reshape(()), s_ch
    for n in fp8:
        q, s = fp8kern.quantize_weight(t[f"{n}.weight"].float(), "tensor")
        t[f"{n}.weight"], t[f"{n}.weight_scale"] = q, s.reshape(())
    for n in calib:
        t[f"{n}.input_scale"] = torch.tensor(calib[n], dtype=torch.float32)
    save_sharded(t, dst, 2)
    act = {"dtype": "fp8_e4m3", "qscheme": "per_tensor", "is_dynamic": not static, "symmetric": True,
           "ch_axis": None, "group_size": None, "round_method": "half_even", "scale_type": "float"}
    q = quark_qconfig("per_tensor", act)
    q["global_quant_config"]["weight"] = [QUARK_FP8_TENSOR, QUARK_INT4_CHANNEL]
    q["layer_quant_config"] = {"*self_attn*": {"weight": QUARK_FP8_TENSOR, "input_tensors": act,
                                               "output_tensors": None, "bias": None}}
    q["export"]["pack_method"] = pack_method
    if config == "fp8":
        q = {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic", "ignored_layers": ["lm_head"]}
    write_config(src, dst, q)


def write_torchao(src, dst, granularity: str) -> None:
    """torchao Float8 as transformers saves it: TorchAoConfig(Float8DynamicActivationFloat8WeightConfig) applied
    by torchao itself at load, then save_pretrained (safetensors). granularity: 'row', 'tensor' or 'block'."""
    pytest.importorskip("torchao")
    import torchao.quantization.quant_api as quant_api
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerBlock, PerRow, PerTensor

    gran = {"row": PerRow(), "tensor": PerTensor(), "block": [PerBlock([1, 128]), PerBlock([128, 128])]}[granularity]
    config = transformers.TorchAoConfig(Float8DynamicActivationFloat8WeightConfig(granularity=gran))
    # torchao refuses to quantize without an sm_89+ GPU; that check is about running its kernels, and the tensors
    # it writes are the same on the CPU.
    check, quant_api._check_hardware_support = quant_api._check_hardware_support, lambda granularity: None
    try:
        model = transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.bfloat16, quantization_config=config)
    finally:
        quant_api._check_hardware_support = check
    model.save_pretrained(dst)


# variant -> (tied embeddings, writer, format name, scheme, weight granularity, scale_format)
VARIANTS = {
    "ct-fp8-dynamic": (False, lambda s, d, ids: write_ct(s, d, "FP8_DYNAMIC", ids), "compressed-tensors",
                       "dynamic_per_token", "channel", "fp32"),
    "ct-fp8-static": (False, lambda s, d, ids: write_ct(s, d, "FP8", ids), "compressed-tensors",
                      "static_per_tensor", "tensor", "fp32"),
    "ct-fp8-block-sharded": (False, lambda s, d, ids: write_ct(s, d, "FP8_BLOCK", ids), "compressed-tensors",
                             "block128", "block", "fp32"),
    "ct-w8a16": (False, lambda s, d, ids: write_ct(s, d, "W8A16", ids), "compressed-tensors", "dynamic_per_token",
                 "channel", "fp32"),
    "fp8-block-fp32-sharded": (False, lambda s, d, ids: write_fp8_block(s, d, torch.float32, 3), "fp8", "block128",
                               "block", "fp32"),
    "fp8-block-bf16": (False, lambda s, d, ids: write_fp8_block(s, d, torch.bfloat16, 1), "fp8", "block128", "block",
                       "fp32"),
    "fp8-block-ue8m0-tied": (True, lambda s, d, ids: write_fp8_block(s, d, E8M0, 1, "ue8m0", ["lm_head"]), "fp8",
                             "block128", "block", "ue8m0"),
    "fp8-tensor-static": (False, lambda s, d, ids: write_fp8_tensor(s, d, True, ids), "fp8", "static_per_tensor",
                          "tensor", "fp32"),
    "fp8-tensor-static-act-scale": (False, lambda s, d, ids: write_fp8_tensor(s, d, True, ids, "act_scale"), "fp8",
                                    "static_per_tensor", "tensor", "fp32"),
    "fp8-tensor-dynamic": (False, lambda s, d, ids: write_fp8_tensor(s, d, False, ids), "fp8", "dynamic_per_token",
                           "tensor", "fp32"),
    "fp8-channel-dynamic": (False, lambda s, d, ids: write_fp8_tensor(s, d, False, ids, gran="channel"), "fp8",
                            "dynamic_per_token", "channel", "fp32"),
    "fp8-hf-tensor-static": (False, lambda s, d, ids: write_fp8_tensor(s, d, True, ids, hf=True), "fp8",
                             "static_per_tensor", "tensor", "fp32"),
    "quark-static": (False, lambda s, d, ids: write_quark(s, d, "static", ids), "quark", "static_per_tensor", "tensor",
                     "fp32"),
    "quark-ptpc": (False, lambda s, d, ids: write_quark(s, d, "ptpc", ids), "quark", "dynamic_per_token", "channel",
                   "fp32"),
    "grok2": (False, lambda s, d, ids: write_grok2(s, d), "grok2", "dynamic_per_token", "channel", "fp32"),
}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, ids):
    """ckpt(variant or 'bf16' / 'bf16-tied') -> directory, written once per module."""
    root = tmp_path_factory.mktemp("ckpts")
    made = {}

    def bf16(tie):
        key = "bf16-tied" if tie else "bf16"
        if key not in made:
            torch.manual_seed(0)
            model = transformers.LlamaForCausalLM(llama_config(tie)).to(torch.bfloat16)
            with torch.no_grad():  # rows and columns of very different sizes: a misplaced scale shows
                for n in QUANT:
                    w = model.get_submodule(n).weight
                    rows, cols = torch.rand(w.shape[0], 1) * 6 - 3, torch.rand(1, w.shape[1]) * 2 - 1
                    w.mul_(torch.exp2(rows) * torch.exp2(cols))
            model.save_pretrained(root / key)
            made[key] = str(root / key)
        return made[key]

    def get(name):
        if name in ("bf16", "bf16-tied"):
            return bf16(name == "bf16-tied")
        if name not in made:
            tie, writer = VARIANTS[name][:2]
            src = bf16(tie)
            writer(src, str(root / name), ids)
            made[name] = str(root / name)
        return made[name]

    return get


# ---------------------------------------------------------------------------------------------------------------
# Independent expectations


def expected_weight_scale(fmt: str, gran: str, scale_format: str, stored: torch.Tensor, n: int, k: int):
    """The stored scale in fp8kern's convention (real = fp8 * scale) and Fp8Linear's shape."""
    shape = {"channel": (n, 1), "tensor": (1,), "block": (math.ceil(n / 128), math.ceil(k / 128))}[gran]
    if fmt == "grok2":  # bf16 = fp8 / scale
        return torch.reciprocal(stored.float()).reshape(shape)
    if scale_format == "ue8m0":
        return stored.reshape(shape)
    return stored.float().reshape(shape)


def deq64(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """float64 q * s with explicit per-element scale indices (per tensor, per row, or 128x128 blocks)."""
    n, k = q.shape
    Q, S = q.double(), s.double()
    if S.numel() == 1:
        return Q * S.reshape(())
    if tuple(S.shape) == (n, 1):
        return Q * S
    return Q * S[(torch.arange(n) // 128)[:, None], (torch.arange(k) // 128)[None, :]]


def stored_scale_key(fmt: str, n: str, stored: dict) -> str:
    if fmt == "fp8":  # block checkpoints and transformers' per-tensor ones: weight_scale_inv; AutoFP8: weight_scale
        return f"{n}.weight_scale_inv" if f"{n}.weight_scale_inv" in stored else f"{n}.weight_scale"
    return {"grok2": f"{n}.weight.scale"}.get(fmt, f"{n}.weight_scale")


def activation_scale_bound(layer: Fp8Linear, X: torch.Tensor) -> torch.Tensor:
    """Per element of X [M, K], an upper bound on the activation scale fp8kern uses for it: amax / 448 of the
    element's row (token), of X (tensor) or of its 1x128 group, floored at 2^-126, at most doubled when rounded up
    to a power of two (ue8m0); the stored input_scale for static layers."""
    M, K = X.shape
    A = X.abs()
    if not layer.dynamic:
        s = layer.input_scale.double().reshape(1, 1)
        assert float(A.max()) <= 448 * float(s), "static input scale would clip: the bound below would not hold"
        return s.expand(M, K)
    return dynamic_scale_bound(A, layer.act_granularity, layer.scale_format)


def expected_weights(variant: str, stored: dict) -> dict:
    """name -> float64 W_deq of each quantized layer, from the checkpoint's tensors and its format's convention."""
    _, _, fmt, _, gran, scale_format = VARIANTS[variant]
    return {n: deq64(stored[f"{n}.weight"], expected_weight_scale(fmt, gran, scale_format,
                                                                   stored[stored_scale_key(fmt, n, stored)],
                                                                   *stored[f"{n}.weight"].shape)) for n in QUANT}


def check_layers_against_float64(model, ids, weights: dict) -> None:
    """Each Fp8Linear's output vs float64 x @ W_deq.T, within a bound derived from the arithmetic (not tuned).

    weights: the float64 W_deq of each layer, from the checkpoint file (expected_weights), so a layer holding
    other numbers than the file says fails here. With x the layer's bf16 input, fp8kern computes
    y = bf16(fl32(sum_k q_k s_k W_nk)), q_k s_k the e4m3-quantized x_k. Per element, e4m3 rounding (3 mantissa
    bits, round to nearest) errs by at most 2^-4 |x_k| in the normal range and 2^-10 s_k (half the subnormal step
    2^-9, times the scale) in the subnormal range, so
        E_n = sum_k (2^-4 |x_k| + 2^-10 s_k) |W_nk|.
    fp32 arithmetic (the rounded reciprocal of the scale, the dequantized products, the K-term sum) adds at most
        F_n = gamma_{K+2} sum_k ((1 + 2^-4) |x_k| + 2^-10 s_k) |W_nk|,  gamma_m = m 2^-24 / (1 - m 2^-24),
    and the bf16 output rounding 2^-8 of the fp32 result, which is within E_n + F_n of the reference. So
        |y_n - ref_n| <= (E_n + F_n)(1 + 2^-8) + 2^-8 |ref_n| + 2^-133 (half the bf16 subnormal step).
    s_k is bounded by activation_scale_bound (static layers: the stored input_scale, asserted not to clip).
    """
    records = {}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: records.__setitem__(n, (a[0], out)))
             for n, m in layers.items()]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    assert set(records) == set(layers) == set(weights)
    for n, layer in layers.items():
        x, y = records[n]
        K, N = layer.in_features, layer.out_features
        X = x.reshape(-1, K).double()
        W = weights[n]
        ref = X @ W.T
        if layer.bias is not None:
            ref = ref + layer.bias.double()
        s = activation_scale_bound(layer, X)
        E = (2.0**-4 * X.abs() + 2.0**-10 * s) @ W.abs().T
        m = K + 2
        gamma = m * 2.0**-24 / (1 - m * 2.0**-24)
        F = gamma * (((1 + 2.0**-4) * X.abs() + 2.0**-10 * s) @ W.abs().T)
        bound = (E + F) * (1 + 2.0**-8) + 2.0**-8 * ref.abs() + 2.0**-133
        err = (y.reshape(-1, N).double() - ref).abs()
        worst = int((err - bound).argmax())
        assert bool((err <= bound).all()), (f"{n}: |y - ref| = {float(err.flatten()[worst])} exceeds the bound "
                                            f"{float(bound.flatten()[worst])} at flat index {worst}")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def check_logits_against_plain(model, src, ids, weights: dict) -> torch.Tensor:
    """Sanity check only (end to end; the per-layer bound is the exact check): the bf16 model in src, as plain
    transformers, with each quantized layer's weight replaced by weights[name] (float64, rounded to bf16), gives
    nearly model's logits. Returns model's logits."""
    plain = transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    with torch.no_grad():
        for n, w in weights.items():
            plain.get_submodule(n).weight.copy_(w.to(torch.bfloat16))
        got, want = model(ids).logits, plain(ids).logits
    assert bool(torch.isfinite(got).all()) and cosine(got, want) > 0.99
    return got


# ---------------------------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_from_pretrained(ckpt, ids, variant):
    tie, _, fmt, scheme, gran, scale_format = VARIANTS[variant]
    d = ckpt(variant)
    assert detect_format(d) == fmt
    model = from_pretrained(d)
    assert not model.training
    stored = read_tensors(d)

    # Structure: every quantized projection is an Fp8Linear of the expected scheme; lm_head stays high precision.
    for n in QUANT:
        layer = model.get_submodule(n)
        assert isinstance(layer, Fp8Linear), n
        assert (layer.scheme, layer.weight_granularity, layer.scale_format) == (scheme, gran, scale_format), n
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.bfloat16
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert t.device.type == "cpu", name

    # Exactly what was written: FP8 bytes, scales in fp8kern's convention, static input scales, everything else.
    for n in QUANT:
        layer = model.get_submodule(n)
        q = stored[f"{n}.weight"]
        assert q.dtype == E4M3 and torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8)), n
        want = expected_weight_scale(fmt, gran, scale_format, stored[stored_scale_key(fmt, n, stored)], *q.shape)
        assert layer.weight_scale.dtype == want.dtype and layer.weight_scale.shape == want.shape, n
        assert torch.equal(layer.weight_scale.view(torch.uint8), want.view(torch.uint8)), n
        if scheme == "static_per_tensor":
            raw = next(stored[f"{n}.{k}"] for k in ("input_scale", "act_scale", "activation_scale")
                       if f"{n}.{k}" in stored)
            assert torch.equal(layer.input_scale, raw.float().reshape(1)), n
    quant_keys = {k for k in stored if any(k.startswith(n + ".") for n in QUANT)}
    sd = model.state_dict()
    for k in set(stored) - quant_keys:
        assert torch.equal(sd[k], stored[k].to(torch.bfloat16)), k
    if tie:
        assert "lm_head.weight" not in stored
        assert model.lm_head.weight is model.model.embed_tokens.weight

    # Numerics, per layer, against float64 with a derived bound.
    weights = expected_weights(variant, stored)
    check_layers_against_float64(model, ids, weights)

    # Sanity check only (end to end): the same model as a plain transformers model with the FP8 weights
    # dequantized to bf16 gives nearly the same logits.
    got = check_logits_against_plain(model, ckpt("bf16-tied" if tie else "bf16"), ids, weights)
    assert got.dtype == torch.bfloat16


def test_layer_check_catches_a_wrong_scale(ckpt, ids):
    """The per-layer bound is tight enough to see a scale off by 25% (a misread convention or layout)."""
    d = ckpt("fp8-block-fp32-sharded")
    model, weights = from_pretrained(d), expected_weights("fp8-block-fp32-sharded", read_tensors(d))
    check_layers_against_float64(model, ids, weights)
    with torch.no_grad():
        model.get_submodule(QUANT[5]).weight_scale[0, 0] *= 1.25
    with pytest.raises(AssertionError, match=QUANT[5]):
        check_layers_against_float64(model, ids, weights)


def test_from_pretrained_dtype_and_format_override(ckpt):
    model = from_pretrained(ckpt("quark-ptpc"), format="quark", dtype=torch.float16)
    assert model.lm_head.weight.dtype == torch.float16 and model.model.norm.weight.dtype == torch.float16
    assert model.get_submodule(QUANT[0]).bias is None and model.get_submodule(QUANT[0]).weight.dtype == E4M3
    with pytest.raises(ValueError, match="format='bogus'"):
        from_pretrained(ckpt("quark-ptpc"), format="bogus")


INT4_FP8_CASES = {  # case -> (per-channel scale name, static activations, pack_method, config format)
    "quark": ("weight_scale_2", False, "reorder", "quark"),
    "grok1-names-static": ("weight_scale1", True, "reorder", "quark"),
    "pack-method-order": ("weight_scale_2", False, "order", "quark"),
    "grok1-fp8-config": ("weight_scale1", True, "reorder", "fp8"),
}


@pytest.mark.parametrize("case", list(INT4_FP8_CASES))
def test_quark_int4_fp8(ckpt, ids, tmp_path, case):
    """INT4-FP8 loads exactly: each weight is its INT4 values in e4m3, each scale fp32(s_channel * s_tensor), bit
    for bit; layers match float64 within the derived bound, and logits the formula int4 * s_channel * s_tensor
    applied in float64 in a plain transformers model."""
    from fp8kern.dequantize import dequantize_checkpoint

    channel_name, static, pack_method, config = INT4_FP8_CASES[case]
    src, d = ckpt("bf16"), str(tmp_path / case)
    write_quark_int4_fp8(src, d, ids, channel_name, static, pack_method, config)
    assert detect_format(d) == config
    model = from_pretrained(d)
    original, stored = read_tensors(src), read_tensors(d)
    int4, fp8 = int4_fp8_layers()
    weights, formula = {}, {}
    for n in int4:
        q, s_t, s_ch = int4_fp8_quantize(original[f"{n}.weight"])  # the values the writer packed
        layer = model.get_submodule(n)
        scheme = "static_per_tensor" if static else "dynamic_per_tensor"
        assert (layer.scheme, layer.weight_granularity, layer.scale_format) == (scheme, "channel", "fp32"), n
        assert layer.weight.dtype == E4M3 and torch.equal(layer.weight.float(), q), n
        want = (stored[f"{n}.{channel_name}"].float() * stored[f"{n}.weight_scale"].float()).reshape(-1, 1)
        assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, want), n
        weights[n] = q.double() * want.double()
        formula[n] = q.double() * s_ch.double()[:, None] * s_t.double()
    for n in fp8:
        layer = model.get_submodule(n)
        assert layer.weight_granularity == "tensor", n
        weights[n] = formula[n] = deq64(stored[f"{n}.weight"], stored[f"{n}.weight_scale"].float().reshape(1))
    if static:
        for n in QUANT:
            assert torch.equal(model.get_submodule(n).input_scale, stored[f"{n}.input_scale"].reshape(1)), n
    check_layers_against_float64(model, ids, weights)

    check_logits_against_plain(model, src, ids, formula)

    # fp8kern-dequantize reads the same format: bf16 of fp32 q * scale, scales dropped.
    out = str(tmp_path / "bf16")
    dequantize_checkpoint(d, out)
    written = read_tensors(out)
    assert set(written) == set(original)
    for n in int4:
        want = (model.get_submodule(n).weight.float() * model.get_submodule(n).weight_scale).to(torch.bfloat16)
        assert torch.equal(written[f"{n}.weight"], want), n


def test_int4_fp8_zero_points(ckpt, ids, tmp_path):
    """Zero points of the symmetric quantizers (Quark writes weight_zero_point_2, all zero) load and are dropped; a
    non-zero one (asymmetric quantization) is refused by the loader and fp8kern-dequantize alike."""
    from fp8kern.dequantize import dequantize_checkpoint

    src = str(tmp_path / "int4")
    write_quark_int4_fp8(ckpt("bf16"), src, ids)
    n = int4_fp8_layers()[0][0]
    key = f"{n}.weight_zero_point_2"
    for name, value in (("zero", 0), ("nonzero", 3)):
        d = str(tmp_path / name)
        shutil.copytree(src, d)
        shard = next(os.path.join(d, f) for f in sorted(os.listdir(d)) if f.endswith(".safetensors")
                     and any(k.startswith(n + ".") for k in load_file(os.path.join(d, f))))
        t = load_file(shard)
        t[key] = torch.full((t[f"{n}.weight"].shape[0] // 8,), value, dtype=torch.int32)
        save_file(t, shard)
        if os.path.exists(os.path.join(d, INDEX)):
            with open(os.path.join(d, INDEX)) as f:
                index = json.load(f)
            index["weight_map"][key] = os.path.basename(shard)
            with open(os.path.join(d, INDEX), "w") as f:
                json.dump(index, f)
        if value == 0:
            assert isinstance(from_pretrained(d).get_submodule(n), Fp8Linear)
            dequantize_checkpoint(d, str(tmp_path / "out0"))
            assert key not in read_tensors(str(tmp_path / "out0"))
            continue
        for call in (lambda: from_pretrained(d), lambda: dequantize_checkpoint(d, str(tmp_path / "out1"))):
            with pytest.raises(ValueError, match=f"{key}' in .* holds non-zero zero points: asymmetric"):
                call()


def test_quark_export_int4_fp8(ckpt, ids, tmp_path):
    """A checkpoint amd-quark itself writes (its 'int4_fp8' scheme on the dense Llama: every Linear INT4-FP8,
    dynamic FP8 activations) loads with Quark's own unpacking of each weight in e4m3 and fp32(s_channel * s_tensor)
    as scale, bit for bit, and its layers match float64 within the derived bound. amd-quark is not a test
    dependency (~0.7 GB of packages); this runs where it is installed."""
    pytest.importorskip("quark.torch")
    from quark.torch import LLMTemplate, ModelQuantizer, export_safetensors
    from quark.torch.utils.pack import Pack_4_bits
    from torch.utils.data import DataLoader

    model = transformers.LlamaForCausalLM.from_pretrained(ckpt("bf16"), dtype=torch.bfloat16).eval()
    quantizer = ModelQuantizer(LLMTemplate.get("llama").get_config(scheme="int4_fp8", exclude_layers=["lm_head"]))
    model = quantizer.freeze(quantizer.quantize_model(model, DataLoader([ids[:1], ids[1:]], batch_size=None)))
    d = str(tmp_path / "quark")
    with torch.no_grad():
        export_safetensors(model, d, custom_mode="quark", weight_format="real_quantized", pack_method="reorder")
    assert detect_format(d) == "quark"
    loaded, stored = from_pretrained(d), read_tensors(d)
    weights = {}
    for n in QUANT:
        layer = loaded.get_submodule(n)
        assert stored[f"{n}.weight"].dtype == torch.int32 and layer.weight_granularity == "channel", n
        q = Pack_4_bits("per_channel", "int4").unpack(stored[f"{n}.weight"], reorder=True)
        assert layer.weight.dtype == E4M3 and torch.equal(layer.weight.float(), q.float()), n
        want = (stored[f"{n}.weight_scale_2"].float() * stored[f"{n}.weight_scale"].float()).reshape(-1, 1)
        assert torch.equal(layer.weight_scale, want), n
        weights[n] = q.double() * want.double()
    check_layers_against_float64(loaded, ids, weights)


def test_int4_packing_matches_quark():
    """The packing the tests write and fp8kern's unpacking agree with AMD Quark's own packer (amd-quark is not a
    dependency: it brings ~0.7 GB of packages; this runs where it is installed)."""
    pack_mod = pytest.importorskip("quark.torch.utils.pack")
    from fp8kern.checkpoints.int4_fp8 import unpack

    q = torch.randint(-8, 8, (24, 64), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    for reorder, order in ((True, REORDER), (False, list(range(8)))):
        theirs = pack_mod.Pack_4_bits("per_channel", "int4").pack(q.clone(), reorder=reorder)
        assert theirs.dtype == torch.int32 and torch.equal(theirs, pack_int4(q, order))
        assert torch.equal(unpack(theirs, tuple(order)).float(), q.float())


TORCHAO_CASES = {"row": ("dynamic_per_token", "channel"), "tensor": ("dynamic_per_tensor", "tensor"),
                 "block": ("block128", "block")}


@pytest.mark.parametrize("granularity", list(TORCHAO_CASES))
def test_torchao_float8(ckpt, ids, tmp_path, granularity):
    """A checkpoint torchao writes: every quantized Linear holds the stored bytes and scales, layers match float64
    within the derived bound, logits a plain transformers model with the weights dequantized here."""
    scheme, gran = TORCHAO_CASES[granularity]
    if granularity == "block":  # torchao's PerBlock needs every dimension a multiple of 128
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=384, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                       max_position_embeddings=64, tie_word_embeddings=False)
        src = str(tmp_path / "bf16")
        transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(src)
    else:
        src = ckpt("bf16")
    d = str(tmp_path / "torchao")
    write_torchao(src, d, granularity)
    assert detect_format(d) == "torchao"
    model = from_pretrained(d)
    stored = read_tensors(d)
    quantized = sorted(k[: -len("._weight_qdata")] for k in stored if k.endswith("._weight_qdata"))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    assert quantized and sorted(layers) == quantized and type(model.lm_head) is nn.Linear
    weights = {}
    for n, layer in layers.items():
        q, s = stored[f"{n}._weight_qdata"], stored[f"{n}._weight_scale"]
        assert (layer.scheme, layer.weight_granularity) == (scheme, gran), n
        assert torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8)), n
        assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale.flatten(), s.flatten()), n
        weights[n] = deq64(q, layer.weight_scale if gran == "block" else s.reshape(-1, 1) if gran == "channel"
                           else s.reshape(1))
    check_layers_against_float64(model, ids, weights)
    got = check_logits_against_plain(model, src, ids, weights)
    if granularity != "block":  # torchao's own runtime on the same file (torchao 0.18 cannot reload PerBlock)
        theirs = transformers.LlamaForCausalLM.from_pretrained(d)
        with torch.no_grad():
            assert cosine(got, theirs(ids).logits) > 0.99


# ---------------------------------------------------------------------------------------------------------------
# Errors


def copy_ckpt(src, dst, edit_config=None, edit_tensors=None) -> str:
    shutil.copytree(src, dst)
    if edit_config:
        with open(os.path.join(dst, "config.json")) as f:
            cfg = json.load(f)
        edit_config(cfg)
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(cfg, f)
    if edit_tensors:
        path = os.path.join(dst, "model.safetensors")
        t = load_file(path)
        edit_tensors(t)
        save_file(t, path)
    return str(dst)


def test_unknown_format(ckpt, tmp_path):
    d = copy_ckpt(ckpt("fp8-block-bf16"), tmp_path / "awq",
                  edit_config=lambda c: c["quantization_config"].update(quant_method="awq"))
    for call in (lambda: detect_format(d), lambda: from_pretrained(d)):
        with pytest.raises(ValueError, match="quant_method is 'awq'"):
            call()
    with pytest.raises(ValueError, match="no quantization_config"):
        from_pretrained(ckpt("bf16"))


def test_quark_int4_refusals(ckpt, tmp_path):
    """INT4 layouts other than INT4-FP8, and configs that disagree with the tensors, are refused by name."""
    src = ckpt("quark-ptpc")
    d = copy_ckpt(src, tmp_path / "int4", edit_config=lambda c: c.__setitem__(
        "quantization_config", quark_qconfig("per_group", {"dtype": "fp8_e4m3", "qscheme": "per_tensor",
                                                           "is_dynamic": False}, weight_dtype="uint4")))
    with pytest.raises(ValueError, match="weight.dtype is 'uint4'; INT4 without the FP8 stage"):
        from_pretrained(d)

    def chain(weight):
        q = quark_qconfig("per_tensor", None)
        q["global_quant_config"]["weight"] = weight
        return lambda c: c.__setitem__("quantization_config", q)

    # A chain other than fp8 per tensor -> int4 per channel (here the other way round, and per group).
    for i, weight in enumerate([[QUARK_INT4_CHANNEL, QUARK_FP8_TENSOR],
                                [QUARK_FP8_TENSOR, {**QUARK_INT4_CHANNEL, "qscheme": "per_group", "group_size": 32}]]):
        d1 = copy_ckpt(src, tmp_path / f"chain{i}", edit_config=chain(weight))
        with pytest.raises(ValueError, match=r"weight is \[.*\]; the only multi-stage weight quantization"):
            from_pretrained(d1)

    # The config says INT4-FP8, the tensors are FP8.
    d2 = copy_ckpt(src, tmp_path / "disagree", edit_config=chain([QUARK_FP8_TENSOR, QUARK_INT4_CHANNEL]))
    with pytest.raises(ValueError, match=f"says {QUANT[0]} is INT4-FP8 .* stores {QUANT[0]}.weight as F8_E4M3"):
        from_pretrained(d2)

    # int32-packed weights under an FP8 config.
    d3 = copy_ckpt(src, tmp_path / "packed", edit_tensors=lambda t: t.__setitem__(
        f"{QUANT[0]}.weight", torch.zeros(160, 20, dtype=torch.int32)))
    with pytest.raises(ValueError, match=f"says {QUANT[0]} is FP8, but .* stores {QUANT[0]}.weight as I32"):
        from_pretrained(d3)
    d4 = copy_ckpt(d3, tmp_path / "excluded", edit_config=lambda c: c["quantization_config"].update(exclude=[QUANT[0]]))
    with pytest.raises(ValueError, match=f"stores {QUANT[0]}.weight INT4-packed but its quantization_config excludes"):
        from_pretrained(d4)


REFUSED = {  # name -> (variant to edit, quantization_config edit, what the error names)
    "awq": ("fp8-block-bf16", lambda q: q.update(quant_method="awq"), "quant_method is 'awq'"),
    "gptq": ("fp8-block-bf16", lambda q: q.update(quant_method="gptq"), "quant_method is 'gptq'"),
    "bitsandbytes": ("fp8-block-bf16", lambda q: q.update(quant_method="bitsandbytes"), "'bitsandbytes'"),
    "mxfp4": ("fp8-block-bf16", lambda q: q.update(quant_method="mxfp4"), "quant_method is 'mxfp4'"),
    "nvfp4-modelopt": ("fp8-block-bf16", lambda q: q.update(quant_method="modelopt", quant_algo="NVFP4"),
                       "quant_method is 'modelopt'"),
    "ct-nvfp4": ("ct-fp8-dynamic", lambda q: [g.update(format="nvfp4-pack-quantized")
                                              for g in [q, *q["config_groups"].values()]],
                 "format is 'nvfp4-pack-quantized'"),
    "ct-int4": ("ct-fp8-dynamic", lambda q: q["config_groups"]["group_0"]["weights"].update(type="int", num_bits=4),
                r"type/num_bits is \('int', 4\)"),
    "fp8-mx-block": ("fp8-block-bf16", lambda q: q.update(weight_block_size=[1, 32]), r"weight_block_size is \[1, 32\]"),
    "quark-mxfp4": ("quark-ptpc", lambda q: q["global_quant_config"]["weight"].update(dtype="fp4", qscheme="per_group",
                                                                                     group_size=32),
                    "weight.dtype is 'fp4'"),
    "torchao-int4": ("fp8-block-bf16", lambda q: q.clear() or q.update(
        quant_method="torchao", quant_type={"default": {"_type": "Int4WeightOnlyConfig", "_data": {}}}),
                     "quant_type is 'Int4WeightOnlyConfig'"),
    "torchao-mx": ("fp8-block-bf16", lambda q: q.clear() or q.update(
        quant_method="torchao", quant_type={"default": {"_type": "Float8DynamicActivationFloat8WeightConfig", "_data": {
            "granularity": [{"_type": "PerBlock", "_data": {"block_size": [1, 32]}},
                            {"_type": "PerBlock", "_data": {"block_size": [1, 32]}}]}}}),
                   "activation granularity"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_other_formats_refused(ckpt, tmp_path, name):
    """Formats fp8kern does not run keep a refusal naming what was found, from the loader and the CLI."""
    from fp8kern.dequantize import dequantize_checkpoint

    variant, edit, pattern = REFUSED[name]
    d = copy_ckpt(ckpt(variant), tmp_path / name, edit_config=lambda c: edit(c["quantization_config"]))
    for call in (lambda: from_pretrained(d), lambda: dequantize_checkpoint(d, str(tmp_path / "out"))):
        with pytest.raises(ValueError, match=pattern):
            call()


def test_torchao_checks(ckpt, tmp_path):
    """torchao: the metadata must describe Float8Tensor weights; torchao < 0.15's tensor names are refused;
    fp8kern-dequantize writes the weights under the unquantized model's names."""
    from fp8kern.dequantize import dequantize_checkpoint

    src = str(tmp_path / "torchao")
    write_torchao(ckpt("bf16"), src, "row")
    shard = os.path.join(src, "model.safetensors")
    n = QUANT[3]

    with safetensors.safe_open(shard, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(shard)
    d = str(tmp_path / "meta")
    shutil.copytree(src, d)
    bad = json.loads(metadata[f"{n}.weight"])
    bad["_type"] = "Int4Tensor"
    save_file(tensors, os.path.join(d, "model.safetensors"), metadata={**metadata, f"{n}.weight": json.dumps(bad)})
    with pytest.raises(ValueError, match=f"torchao metadata of {n}.weight in model.safetensors is 'Int4Tensor'"):
        from_pretrained(d)

    d2 = str(tmp_path / "old")
    shutil.copytree(src, d2)
    old = {k.replace("._weight_qdata", ".weight:qdata").replace("._weight_scale", ".weight:scale"): v
           for k, v in tensors.items()}
    save_file(old, os.path.join(d2, "model.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match="naming of torchao < 0.15"):
        from_pretrained(d2)

    out = str(tmp_path / "bf16")
    dequantize_checkpoint(src, out)
    written, original = read_tensors(out), read_tensors(ckpt("bf16"))
    assert set(written) == set(original)
    q, s = tensors[f"{n}._weight_qdata"], tensors[f"{n}._weight_scale"]
    assert torch.equal(written[f"{n}.weight"], (q.float() * s).to(torch.bfloat16))


def test_missing_tensor(ckpt, tmp_path):
    scale = f"{QUANT[4]}.weight_scale_inv"
    d = copy_ckpt(ckpt("fp8-block-bf16"), tmp_path / "noscale", edit_tensors=lambda t: t.pop(scale))
    with pytest.raises(ValueError, match=f"quantized weights without their scale tensor\\(s\\): \\['{scale}'\\]"):
        from_pretrained(d)
    d2 = copy_ckpt(ckpt("fp8-block-bf16"), tmp_path / "nonorm", edit_tensors=lambda t: t.pop("model.norm.weight"))
    with pytest.raises(ValueError, match="lacks 1 tensor.*'model.norm.weight'"):
        from_pretrained(d2)


def test_unexpected_tensor(ckpt, tmp_path):
    extra = "model.layers.0.mlp.up_proj.smooth_factor"
    d = copy_ckpt(ckpt("fp8-block-bf16"), tmp_path / "extra",
                  edit_tensors=lambda t: t.__setitem__(extra, torch.ones(3)))
    with pytest.raises(ValueError, match=f"1 tensor\\(s\\) that fit nothing.*{extra}"):
        from_pretrained(d)


def test_modules_to_not_convert_matches_at_module_boundaries(ckpt, tmp_path):
    """transformers' rule: 'mlp.gate' (a MoE router) does not exclude mlp.gate_proj, 'layers.1' not layers.11."""
    from fp8kern.checkpoints.fp8_block import _not_converted
    assert not _not_converted("model.layers.0.mlp.gate_proj", "mlp.gate")
    assert _not_converted("model.layers.0.mlp.gate", "mlp.gate")
    assert not _not_converted("model.layers.11.mlp.up_proj", "model.layers.1")
    assert _not_converted("model.layers.1.mlp.up_proj", "model.layers.1")
    assert _not_converted("model.layers.11.mlp.up_proj", r"model\.layers\.\d+\.mlp\.up_proj")
    d = copy_ckpt(ckpt("fp8-block-bf16"), tmp_path / "router",
                  edit_config=lambda c: c["quantization_config"].update(modules_to_not_convert=["lm_head", "mlp.gate"]))
    model = from_pretrained(d)
    assert isinstance(model.get_submodule(QUANT[0].replace("self_attn.q_proj", "mlp.gate_proj")), Fp8Linear)


def test_missing_bias_of_a_quantized_layer(ckpt, tmp_path):
    """A bias the model expects but the checkpoint lacks is named in the error (no bare StopIteration)."""
    d = copy_ckpt(ckpt("fp8-block-bf16"), tmp_path / "bias",
                  edit_config=lambda c: c.update(attention_bias=True))
    with pytest.raises(ValueError, match=r"self_attn\.q_proj\.bias"):
        from_pretrained(d)


def test_model_class_loading_rules(ckpt, tmp_path, monkeypatch):
    """The model class's _keys_to_ignore_on_load_unexpected (e.g. DeepSeek-V3's FP8 MTP layer) are skipped with a
    warning; _keep_in_fp32_modules_strict stay float32 in a bf16 load, _keep_in_fp32_modules only in an fp16 one,
    as transformers loads them."""
    extra = {"model.layers.2.eh_proj.weight": torch.ones(160, 320).to(torch.float8_e4m3fn),
             "model.layers.2.eh_proj.weight_scale_inv": torch.ones(2, 3),
             "model.layers.2.enorm.weight": torch.ones(3)}
    d = copy_ckpt(ckpt("fp8-block-bf16"), tmp_path / "mtp", edit_tensors=lambda t: t.update(extra))
    monkeypatch.setattr(transformers.LlamaForCausalLM, "_keys_to_ignore_on_load_unexpected", [r"model\.layers\.2\."],
                        raising=False)
    monkeypatch.setattr(transformers.LlamaForCausalLM, "_keep_in_fp32_modules_strict", ["input_layernorm"],
                        raising=False)
    monkeypatch.setattr(transformers.LlamaForCausalLM, "_keep_in_fp32_modules", ["post_attention_layernorm"],
                        raising=False)
    with pytest.warns(UserWarning, match="does not use 3 checkpoint tensor\\(s\\)"):
        model = from_pretrained(d)
    layer = model.model.layers[0]
    assert layer.input_layernorm.weight.dtype == torch.float32
    assert layer.post_attention_layernorm.weight.dtype == torch.bfloat16
    with pytest.warns(UserWarning):
        layer = from_pretrained(d, dtype=torch.float16).model.layers[0]
    assert layer.post_attention_layernorm.weight.dtype == torch.float32


def test_two_tensors_for_one_buffer(ckpt, tmp_path):
    """A checkpoint with both input_scale and act_scale for a layer is refused (the loaded one would depend on the
    order of the shards)."""
    n = QUANT[0]
    d = copy_ckpt(ckpt("fp8-tensor-static"), tmp_path / "both",
                  edit_tensors=lambda t: t.update({f"{n}.act_scale": t[f"{n}.input_scale"] * 2}))
    with pytest.raises(ValueError, match=f"two tensors for {n}.input_scale"):
        from_pretrained(d)


def test_config_and_tensors_disagree(ckpt, tmp_path):
    d = copy_ckpt(ckpt("fp8-block-bf16"), tmp_path / "skip",
                  edit_config=lambda c: c["quantization_config"].update(modules_to_not_convert=["up_proj"]))
    with pytest.raises(ValueError, match=f"stores {QUANT[0].replace('self_attn.q_proj', 'mlp.up_proj')}.weight as "
                                         "float8_e4m3fn but its quantization_config excludes"):
        from_pretrained(d)


_KV_SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
KV_CASES = {  # case -> (variant, the KV-cache scale tensors, how its config declares an FP8 KV cache)
    "quark-output-scale": ("quark-ptpc", [f"{QUANT[1]}.output_scale", f"{QUANT[2]}.output_scale"],
                           lambda q: q["export"].update(kv_cache_group=["*k_proj", "*v_proj"])),
    "quark-k-v-scale": ("quark-static", ["model.layers.0.self_attn.k_scale", "model.layers.1.self_attn.v_scale"],
                        lambda q: q["export"].update(kv_cache_group=["*k_proj", "*v_proj"])),
    "compressed-tensors": ("ct-fp8-dynamic", ["model.layers.0.self_attn.k_scale", "model.layers.0.self_attn.v_scale"],
                           lambda q: q.update(kv_cache_scheme=_KV_SCHEME)),
    "fp8": ("fp8-tensor-static", ["model.layers.1.self_attn.k_scale", "model.layers.1.self_attn.v_scale"],
            lambda q: q.update(kv_cache_scheme=_KV_SCHEME)),
}


@pytest.mark.parametrize("case", list(KV_CASES))
def test_kv_cache_scales(ckpt, tmp_path, case):
    """Checkpoints that also quantize the KV cache load, with the KV cache in the model dtype, said once; the scale
    tensors are accepted only where the config declares an FP8 KV cache."""
    variant, keys, declare = KV_CASES[case]

    def add(t):
        t.update({k: torch.tensor(0.25) for k in keys})

    declared = copy_ckpt(ckpt(variant), tmp_path / "kv", edit_tensors=add,
                         edit_config=lambda c: declare(c["quantization_config"]))
    with pytest.warns(UserWarning) as seen:
        model = from_pretrained(declared)
    kv = [str(w.message) for w in seen if "KV cache" in str(w.message)]
    assert len(kv) == 1 and f"keeps the KV cache in torch.bfloat16: ignored {len(keys)} KV-cache scale" in kv[0]
    assert isinstance(model.get_submodule(QUANT[1]), Fp8Linear)
    undeclared = copy_ckpt(ckpt(variant), tmp_path / "kv2", edit_tensors=add)
    with pytest.raises(ValueError, match=f"fit nothing.*{keys[0]}"):
        from_pretrained(undeclared)


def test_static_scale_for_dynamic_layer(ckpt, tmp_path):
    """An input_scale where the config says dynamic activations: the config and tensors disagree."""
    d = copy_ckpt(ckpt("quark-ptpc"), tmp_path / "static",
                  edit_tensors=lambda t: t.__setitem__(f"{QUANT[1]}.input_scale", torch.tensor(0.5)))
    with pytest.raises(ValueError, match=f"{QUANT[1]}.input_scale.*static activation scale"):
        from_pretrained(d)


def test_package_imports_without_optional_deps(ckpt):
    code = ("import sys; [sys.modules.__setitem__(m, None) for m in ('transformers', 'safetensors', 'tqdm', "
            "'compressed_tensors')]\nimport fp8kern, fp8kern.checkpoints, fp8kern.dequantize\n"
            f"try:\n    fp8kern.checkpoints.detect_format({ckpt('bf16')!r})\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install safetensors" in out.stdout


# ---------------------------------------------------------------------------------------------------------------
# fp8kern-dequantize


@pytest.mark.parametrize("variant", ["fp8-block-fp32-sharded", "grok2", "ct-fp8-static", "fp8-tensor-static-act-scale",
                                     "fp8-hf-tensor-static"])
def test_dequantize_cli(ckpt, tmp_path, capsys, variant):
    from fp8kern.dequantize import main

    _, _, fmt, _, gran, scale_format = VARIANTS[variant]
    src, orig, out = ckpt(variant), ckpt("bf16"), str(tmp_path / "bf16")
    assert main(["--input", src, "--output", out, "--verify", orig]) == 0
    report = capsys.readouterr().out

    # Files: same shard names, index whose map covers exactly the kept tensors, config without quantization_config.
    shards = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == shards
    stored, written = read_tensors(src), read_tensors(out)
    scale_keys = ({stored_scale_key(fmt, n, stored) for n in QUANT} | {f"{n}.input_scale" for n in QUANT}
                  | {f"{n}.act_scale" for n in QUANT} | {f"{n}.activation_scale" for n in QUANT})
    assert set(written) == set(stored) - scale_keys
    if len(shards) > 1:
        with open(os.path.join(out, INDEX)) as f:
            index = json.load(f)
        assert set(index["weight_map"]) == set(written)
        for k, shard in index["weight_map"].items():
            assert k in load_file(os.path.join(out, shard))
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in written.values())
    with open(os.path.join(out, "config.json")) as f:
        assert "quantization_config" not in json.load(f)
    assert os.path.isfile(os.path.join(out, "generation_config.json"))

    # Values: bf16 of fp8 * scale (fp32 product, fp8kern's convention), other tensors untouched.
    for k, t in written.items():
        n = k[: -len(".weight")]
        if n in QUANT:
            q = stored[k]
            s = expected_weight_scale(fmt, gran, scale_format, stored[stored_scale_key(fmt, n, stored)], *q.shape)
            S = s.float()
            S = S[(torch.arange(q.shape[0]) // 128)[:, None], (torch.arange(q.shape[1]) // 128)[None, :]] \
                if gran == "block" else S.reshape(-1, 1)
            assert t.dtype == torch.bfloat16 and torch.equal(t, (q.float() * S).to(torch.bfloat16)), k
        else:
            assert t.dtype == stored[k].dtype and torch.equal(t, stored[k]), k

    # The output is a plain transformers checkpoint.
    plain = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    for k, t in plain.state_dict().items():
        assert torch.equal(t, written[k]), k

    # --verify: one row per tensor, numbers recomputed here from the files; e4m3-sized error on quantized weights.
    original = read_tensors(orig)
    rows = {}
    for line in report.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] in written:
            rows[parts[0]] = (float(parts[1]), float(parts[2]))
    assert set(rows) == set(written)
    for k, (cos, rel) in rows.items():
        a, b = written[k].double(), original[k].double()
        want_rel = float((a - b).norm() / b.norm())
        assert cos == pytest.approx(cosine(a, b), abs=1e-6) and rel == pytest.approx(want_rel, abs=1e-6), k
        if k[: -len(".weight")] in QUANT:
            # e4m3 rounds each element within 2^-4 relative (normal range), so the tensor's relative error is at
            # most about 2^-4; random values sit far below the worst case (typically ~2^-5.5).
            assert 0 < rel <= 2.0**-4 and cos >= 1 - 2.0**-7, (k, cos, rel)
        else:
            assert (cos, rel) == (1.0, 0.0), k
    summary = [ln for ln in report.splitlines() if ln.startswith("verified ")]
    assert len(summary) == 1 and summary[0].startswith(f"verified {len(written)} tensors: min cosine ")
    worst = max(r for _, r in rows.values())
    assert f"max rel error {worst:.6f}" in summary[0]


def test_dequantize_module_entry_point(ckpt, tmp_path):
    out = subprocess.run([sys.executable, "-m", "fp8kern.dequantize", "--input", ckpt("quark-static"), "--output",
                          str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    t = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert t[f"{QUANT[0]}.weight"].dtype == torch.bfloat16 and f"{QUANT[0]}.input_scale" not in t
    assert not os.path.exists(tmp_path / "o" / INDEX)


def test_dequantize_cli_usage_error(capsys):
    from fp8kern.dequantize import main

    with pytest.raises(SystemExit) as e:
        main(["--output", "x"])
    assert e.value.code == 2 and "--input" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["ct-fp8-dynamic", "fp8-block-bf16", "fp8-tensor-static", "quark-ptpc", "grok2"])
def test_integer_weight_refused(ckpt, tmp_path, variant):
    """A quantized layer's weight stored as int8 beside its scale (a damaged or mislabelled file) is named, with its
    file and the dtype found and expected, by the loader and by fp8kern-dequantize, before any tensor is read (the
    loader used to hand torch an integer parameter; dequantizing copied it unscaled). An integer tensor where the
    model holds floats is named too."""
    from fp8kern.dequantize import dequantize_checkpoint

    key = f"{QUANT[0]}.weight"

    def edited(name, tensor, change):
        """A copy of the checkpoint with `tensor` changed in whichever shard holds it."""
        d = shutil.copytree(ckpt(variant), tmp_path / name)
        for shard in sorted(f for f in os.listdir(d) if f.endswith(".safetensors")):
            t = load_file(os.path.join(d, shard))
            if tensor in t:
                t[tensor] = change(t[tensor])
                save_file(t, os.path.join(d, shard))
                return str(d), shard
        raise AssertionError(f"{tensor} is in no shard")

    d, shard = edited("int8", key, lambda w: w.view(torch.int8).clone())
    msg = rf"tensor '{re.escape(key)}' in {re.escape(shard)} has dtype I8 \(safetensors\), expected F8_E4M3"
    with pytest.raises(ValueError, match=msg):
        from_pretrained(d)
    with pytest.raises(ValueError, match=msg):
        dequantize_checkpoint(d, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")

    d2, shard = edited("intnorm", "model.norm.weight", lambda w: w.to(torch.int16))
    with pytest.raises(ValueError, match=rf"'model.norm.weight' in {re.escape(shard)} has dtype torch.int16, expected "
                                         r"a floating-point dtype"):
        from_pretrained(d2)
