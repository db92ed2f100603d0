"""Fp8Experts (MoE routed experts with e4m3 weights) on the CPU (reference path): against float64 within the
bound derived in experts_oracle.py, and from_pretrained loading MoE checkpoints into Fp8Experts.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fp8kern
from conftest import compile_recording, host_reads
from experts_oracle import check_experts, deq64, exact_rows, routing
from fp8kern.nn import Fp8Experts, fused_experts_unsupported, is_fused_experts, quantize_model

transformers = pytest.importorskip("transformers")

E, H, I, K_TOP = 6, 160, 96, 2  # H and I not multiples of 128: partial blocks, and padded gate/up rows for blocks


def qwen3_moe_config(**kw):
    base = dict(hidden_size=H, intermediate_size=320, moe_intermediate_size=I, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=40, vocab_size=256, num_experts=E,
                num_experts_per_tok=K_TOP, max_position_embeddings=64, mlp_only_layers=[1])
    base.update(kw)
    return transformers.Qwen3MoeConfig(**base)


def make_experts(positive: bool = False, dtype=torch.bfloat16, seed: int = 0):
    """A transformers Qwen3-MoE experts module with weights whose rows and columns differ widely in size (so a
    scale applied to the wrong rows or blocks shows); all positive when positive (no cancellation in the sums,
    which makes the bound tight enough to see a 25% error)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(qwen3_moe_config())
    ex = model.model.layers[0].mlp.experts.to(dtype)
    with torch.no_grad():
        for p in (ex.gate_up_proj, ex.down_proj):
            r = torch.exp2(torch.rand(p.shape[0], p.shape[1], 1) * 4 - 2)
            c = torch.exp2(torch.rand(p.shape[0], 1, p.shape[2]) * 2 - 1)
            base = torch.rand(p.shape) if positive else torch.randn(p.shape)
            p.copy_(0.05 * base * r * c)
    return ex


SCHEMES = [("dynamic_per_token", {}), ("dynamic_per_token", {"weight_granularity": "tensor"}),
           ("dynamic_per_tensor", {}), ("block128", {}), ("block128", {"scale_format": "ue8m0"}),
           ("static_per_tensor", {})]


def static_scales(ex, x) -> torch.Tensor:
    """[E, 2] input scales: 2 * amax / 448 of x (gate_up) and of the float64 h of any expert (down), a margin that
    keeps the FP8 model's slightly different activations clear of clipping."""
    I_ = ex.gate_up_proj.shape[1] // 2
    X = x.double()
    hs = []
    for e in range(ex.gate_up_proj.shape[0]):
        W = ex.gate_up_proj[e].detach().double()
        hs.append((torch.nn.functional.silu(X @ W[:I_].T) * (X @ W[I_:].T)).abs().max())
    return torch.tensor([[2 * float(X.abs().max()) / 448, 2 * float(max(hs)) / 448]] * ex.gate_up_proj.shape[0])


@pytest.mark.parametrize("scheme,kw", SCHEMES, ids=[s + "-" + "-".join(map(str, k.values())) for s, k in SCHEMES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("data", ["random", "exact"])
def test_from_experts_against_float64(scheme, kw, dtype, data):
    """data 'random': signed weights and activations, where the bound is loose (sums of |terms| against sums with
    cancellation); 'exact': positive weights and activations exact in e4m3, where it is tight (a few percent)."""
    exact = data == "exact"
    ex = make_experts(positive=exact, dtype=dtype)
    x = exact_rows(11, H).to(dtype) if exact else torch.randn(11, H).to(dtype)
    if scheme == "static_per_tensor":
        kw = {"input_scales": static_scales(ex, x)}
        if exact:
            kw["input_scales"][:, 0] = 2.0**-6  # amax / 448 of exact_rows: exact, and nothing clips
    m = Fp8Experts.from_experts(ex, scheme, **kw)
    assert m.gate_up_weight.dtype == torch.float8_e4m3fn and m.padded_intermediate == (128 if scheme == "block128"
                                                                                          else I)
    # Stored weights are exactly quantize_weight of each projection (gate rows, then up rows, of gate_up_proj).
    gran = kw.get("weight_granularity", m.weight_granularity)
    for e in (0, E - 1):
        for role, w in (("gate", ex.gate_up_proj[e, :I]), ("up", ex.gate_up_proj[e, I:]), ("down", ex.down_proj[e])):
            q, s = fp8kern.quantize_weight(w.detach(), gran, scale_format=m.scale_format)
            wq, ws = m.projection(e, role)
            assert torch.equal(wq.view(torch.uint8), q.view(torch.uint8)), (e, role)
            assert torch.equal(ws.float(), s.float().reshape(-1, 1).expand(ws.shape) if gran == "tensor"
                               else s.float().reshape(ws.shape)), (e, role)
    if scheme == "block128":  # the rows between gate and up are zero
        assert not m.gate_up_weight[:, I:128].float().any() and not m.gate_up_weight[:, 128 + I:].float().any()
    idx, w = routing(11, E, K_TOP)
    check_experts(m, x, idx, w, x_exact=exact)


@pytest.mark.parametrize("scheme", ["dynamic_per_token", "block128"])
def test_bound_catches_a_wrong_scale_or_expert(scheme):
    """With activations exact in e4m3 and positive data (no cancellation), the check sees the output of a module
    whose expert 2 has its up scales 25% off, or whose experts 1 and 2 are exchanged (the oracle reads the weights of
    the module under test, so the faulty outputs come from a second, altered module)."""
    ex = make_experts(positive=True, dtype=torch.float32)
    x = exact_rows(8, H)
    idx = torch.tensor([[2, 0], [1, 2], [2, 3], [4, 5], [2, 1], [0, 1], [3, 2], [5, 2]])
    w = torch.tensor([[0.9, 0.1]] * 8)
    m = Fp8Experts.from_experts(ex, scheme)
    check_experts(m, x, idx, w, x_exact=True)
    off = Fp8Experts.from_experts(ex, scheme)
    with torch.no_grad():
        off.projection(2, "up")[1].mul_(1.25)
    with pytest.raises(AssertionError, match="exceeds the bound"):
        check_experts(m, x, idx, w, out=off(x, idx, w), x_exact=True)
    exchanged = Fp8Experts.from_experts(ex, scheme)
    with torch.no_grad():
        for buf in (exchanged.gate_up_weight, exchanged.gate_up_scale, exchanged.down_weight, exchanged.down_scale):
            buf[[1, 2]] = buf[[2, 1]]
    with pytest.raises(AssertionError, match="exceeds the bound"):
        check_experts(m, x, idx, w, out=exchanged(x, idx, w), x_exact=True)


def test_matches_transformers_experts_on_dequantized_weights():
    """The oracle means what transformers' own experts forward computes: with the dequantized FP8 weights loaded
    into the transformers module (fp32) and activations exact in e4m3, its output lies within the bound around the
    oracle (it skips the activation quantization the bound allows for; its fp32 arithmetic is within the F terms),
    as fp8kern's does."""
    ex = make_experts(positive=True, dtype=torch.float32)
    m = Fp8Experts.from_experts(ex, "dynamic_per_token")
    with torch.no_grad():
        for e in range(E):
            ex.gate_up_proj[e, :I] = deq64(*m.projection(e, "gate"), False).float()
            ex.gate_up_proj[e, I:] = deq64(*m.projection(e, "up"), False).float()
            ex.down_proj[e] = deq64(*m.projection(e, "down"), False).float()
    x = exact_rows(13, H, row_exp=[-6 + t % 3 for t in range(13)])
    idx, w = routing(13, E, K_TOP, sentinel=False)  # transformers sees the no-expert index only expert-parallel
    with torch.no_grad():
        theirs = ex(x, idx, w)
    check_experts(m, x, idx, w, out=theirs, x_exact=True)
    check_experts(m, x, idx, w, x_exact=True)


@pytest.mark.parametrize("scheme", ["dynamic_per_token", "block128"])
def test_one_token_expert_first(scheme):
    """Expert 0 gets one token, expert 1 three: the GEMMs after the first reuse its validation with the scheme's
    layout (a one-row per-token scale also fits per-tensor, which would misread expert 1's rows). Positive data,
    exact activations and rows 8x apart in size make a misread scale fail the bound."""
    m = Fp8Experts.from_experts(make_experts(positive=True, dtype=torch.float32), scheme)
    x = exact_rows(5, H, row_exp=[-6, -3, 0, 3, 6])
    idx = torch.tensor([[0, 1], [1, 2], [2, 3], [1, 4], [5, 3]])
    check_experts(m, x, idx, torch.full((5, 2), 0.5), x_exact=True)


@pytest.mark.parametrize("scheme", ["dynamic_per_token", "block128"])
def test_bad_scale_of_a_later_expert_is_refused(scheme):
    """The GEMMs after the first run from addresses (ops/gemm.py: row_gemms): a NaN or zero in the weight scale of
    an expert that is not the first active one still raises the message every path gives, naming the scale."""
    m = Fp8Experts.from_experts(make_experts(), scheme)
    x = torch.randn(3, H, dtype=torch.bfloat16)
    idx = torch.tensor([[0, 2], [2, 4], [4, 0]])
    w = torch.full((3, 2), 0.5)
    m(x, idx, w)
    for value in (float("nan"), 0.0):
        bad = Fp8Experts.from_experts(make_experts(), scheme)
        with torch.no_grad():
            bad.down_scale[4].view(-1)[0] = value
        with pytest.raises(ValueError, match="scale_b holds 1 non-finite or non-positive value"):
            bad(x, idx, w)


def test_edge_cases_and_errors():
    ex = make_experts()
    m = Fp8Experts.from_experts(ex)
    x = torch.randn(3, H, dtype=torch.bfloat16)
    # Every slot routed to the no-expert index: zeros; no tokens: empty.
    assert not m(x, torch.full((3, K_TOP), E), torch.ones(3, K_TOP)).float().any()
    assert m(x[:0], torch.zeros(0, K_TOP, dtype=torch.long), torch.zeros(0, K_TOP)).shape == (0, H)
    # A non-contiguous input gives the same result as its contiguous copy.
    idx, w = routing(3, E, K_TOP, sentinel=False)
    wide = torch.randn(3, 2 * H, dtype=torch.bfloat16)[:, ::2]
    assert torch.equal(m(wide, idx, w), m(wide.contiguous(), idx, w))
    with pytest.raises(ValueError, match=r"outside \[0, 6\]"):
        m(x, torch.tensor([[0, 7]] * 3), w)
    with pytest.raises(ValueError, match=r"outside \[0, 6\]"):
        m(x, torch.tensor([[0, -1]] * 3), w)
    with pytest.raises(TypeError, match="integer dtype"):
        m(x, idx.float(), w)
    with pytest.raises(ValueError, match="hidden_states has shape"):
        m(x[:, :10], idx, w)
    with pytest.raises(ValueError, match="top_k_weights"):
        m(x, idx, w[:2])
    with pytest.raises(TypeError, match="hidden_states dtype"):
        m(x.double(), idx, w)
    with pytest.raises(ValueError, match="needs input_scales"):
        Fp8Experts.from_experts(ex, "static_per_tensor")
    with pytest.raises(ValueError, match="weight_granularity='block'"):
        Fp8Experts(E, H, I, "dynamic_per_token", weight_granularity="block")
    with pytest.raises(ValueError, match=r"block_offset=5, expected None, or an int in \[0, 128\) with block scales"):
        Fp8Experts(E, H, I, "dynamic_per_token", block_offset=5)
    with pytest.raises(ValueError, match="block_offset=128"):
        Fp8Experts(E, H, I, "block128", block_offset=128)
    with pytest.raises(TypeError, match="fused experts module"):
        Fp8Experts.from_experts(nn.Linear(4, 4))


@pytest.mark.parametrize("scale_format", ["fp32", "ue8m0"])
def test_shard_layout(scale_format):
    """The first tensor-parallel shard of the intermediate rows, [0, 80) of 96 (TensorParallelExperts: block_offset
    0, gate and up stored unpadded, 2 x 80 rows instead of 2 x 128, run as two GEMMs), computes what
    experts of those 80 rows in the whole-experts layout (tested against the oracle above) compute with the same FP8
    weights and scales, bit for bit: the same products, summed the same way per output."""
    from fp8kern.parallel import TensorParallelExperts

    ex = make_experts()
    with torch.no_grad():  # up's block scales 16x gate's: a scale applied to the other projection's rows shows
        ex.gate_up_proj[:, I:] *= 16
    m = Fp8Experts.from_experts(ex, "block128", scale_format=scale_format)
    local = TensorParallelExperts.from_experts(m, 0, 80, match_single_device=False).local  # no collective
    assert local.block_offset == 0 and local.gate_up_weight.shape == (E, 160, H)
    local.partial_sums = False  # the shard's output as it is, in bf16
    whole = Fp8Experts(E, H, 80, "block128", scale_format=scale_format)
    assert whole.gate_up_weight.shape == (E, 256, H)
    with torch.no_grad():
        for e in range(E):
            for role in ("gate", "up", "down"):
                for dst, src in zip(whole.projection(e, role), local.projection(e, role)):
                    dst.copy_(src)
    idx, w = routing(9, E, K_TOP)
    x = torch.randn(9, H, dtype=torch.bfloat16)
    assert torch.equal(local(x, idx, w), whole(x, idx, w))


def test_state_dict_and_dtype_casts():
    ex = make_experts()
    m = Fp8Experts.from_experts(ex, "block128", scale_format="ue8m0")
    m2 = Fp8Experts(E, H, I, "block128", scale_format="ue8m0")
    m2.load_state_dict(m.state_dict())
    x = torch.randn(5, H, dtype=torch.bfloat16)
    idx, w = routing(5, E, K_TOP)
    assert torch.equal(m(x, idx, w), m2(x, idx, w))
    m2.half()
    assert m2.gate_up_weight.dtype == torch.float8_e4m3fn and m2.gate_up_scale.dtype == torch.float8_e8m0fnu
    assert m2(x.half(), idx, w).dtype == torch.float16


def test_detection():
    ex = make_experts()
    assert is_fused_experts(ex) and fused_experts_unsupported(ex) is None
    assert not is_fused_experts(nn.Linear(3, 3))
    ex.has_bias = True
    assert "has_bias" in fused_experts_unsupported(ex)


def test_quantize_model_converts_experts():
    """The experts module becomes an Fp8Experts holding quantize_weight of its projections, and inside the model it
    computes within the bound on what it is given."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(qwen3_moe_config()).to(torch.bfloat16)
    ids = torch.randint(0, 256, (2, 7))
    original = model.model.layers[0].mlp.experts
    report = quantize_model(model, "block128")
    m = model.model.layers[0].mlp.experts
    assert isinstance(m, Fp8Experts) and "model.layers.0.mlp.experts" in report.replaced
    q, _ = fp8kern.quantize_weight(original.down_proj[3].detach(), "block")
    assert torch.equal(m.projection(3, "down")[0].view(torch.uint8), q.view(torch.uint8))
    seen = []
    hook = m.register_forward_hook(lambda mod, a, o: seen.append((*a, o)))
    with torch.no_grad():
        model(ids)
    hook.remove()
    x, idx, w, out = seen[0]
    check_experts(m, x, idx, w, out=out)

    static = transformers.AutoModelForCausalLM.from_config(qwen3_moe_config()).to(torch.bfloat16)
    report = quantize_model(static, "static_per_tensor", calibration_data=[ids])
    assert "model.layers.0.mlp.experts" in report.skipped
    assert "static" in report.skipped["model.layers.0.mlp.experts"]


# ---------------------------------------------------------------------------------------------------------------
# from_pretrained on MoE checkpoints: per-expert FP8 tensors loaded into Fp8Experts

import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402

from safetensors.torch import load_file, save_file  # noqa: E402

from fp8kern.checkpoints import detect_format, from_pretrained  # noqa: E402
from fp8kern.dequantize import dequantize_checkpoint  # noqa: E402
from int4_fp8_writer import QUARK_FP8_TENSOR, QUARK_INT4_CHANNEL, REORDER, int4_fp8_quantize, pack_int4  # noqa: E402

# Quantized: every 2-D weight of attention and MLP modules (dense, shared experts, routed experts under Qwen/DeepSeek
# names or Mixtral's w1/w3/w2) except the router's ('mlp.gate', 'block_sparse_moe.gate'), as real checkpoints do.
QUANT_KEY = re.compile(r"\.(self_attn|mlp|block_sparse_moe)\.(?!gate\.weight$)[\w.]+\.weight$")
CT_CHANNEL_DYNAMIC = {"weights": {"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": False,
                                  "symmetric": True},
                      "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True,
                                            "symmetric": True}}
CT_TENSOR_STATIC = {"weights": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                                "symmetric": True},
                    "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                                          "symmetric": True}}


def mixtral_config():
    return transformers.MixtralConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=40, vocab_size=256, num_local_experts=E,
                                      num_experts_per_tok=K_TOP, max_position_embeddings=64)


def deepseek_config():
    return transformers.DeepseekV3Config(hidden_size=H, intermediate_size=320, moe_intermediate_size=I,
                                         num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=E,
                                         num_experts_per_tok=K_TOP, n_group=2, topk_group=1, n_shared_experts=1,
                                         q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32,
                                         v_head_dim=32, num_attention_heads=4, num_key_value_heads=4, vocab_size=256,
                                         max_position_embeddings=64)


def qwen2_moe_config():
    return transformers.Qwen2MoeConfig(hidden_size=H, intermediate_size=320, moe_intermediate_size=I,
                                       shared_expert_intermediate_size=192, num_hidden_layers=1, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=256, num_experts=E, num_experts_per_tok=K_TOP,
                                       max_position_embeddings=64)


def glm4_moe_config():
    return transformers.Glm4MoeConfig(hidden_size=H, intermediate_size=320, moe_intermediate_size=I,
                                      num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=40, vocab_size=256, n_routed_experts=E,
                                      num_experts_per_tok=K_TOP, n_group=1, topk_group=1, n_shared_experts=1,
                                      max_position_embeddings=64)


ARCHS = {  # arch -> (config, the experts modules the model has)
    "qwen3": (qwen3_moe_config, ["model.layers.0.mlp.experts"]),
    "mixtral": (mixtral_config, ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]),
    "deepseek": (deepseek_config, ["model.layers.1.mlp.experts"]),
    "qwen2": (qwen2_moe_config, ["model.layers.0.mlp.experts"]),  # with a shared expert and its [1, H] gate
    "glm4": (glm4_moe_config, ["model.layers.1.mlp.experts"]),
}


def ct_config(group: dict, ignore) -> dict:
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], **group}}, "ignore": ignore}


def layer_inputs(model, ids) -> dict:
    """module name -> the input of each experts module and nn.Linear, recorded on a forward pass."""
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: seen.__setitem__(n, a[0].detach()))
             for n, m in model.named_modules() if is_fused_experts(m) or isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


def write_moe(root, variant: str, ids, keep: str | None = None) -> tuple[str, str]:
    """(bf16 checkpoint, FP8 checkpoint) directories of a tiny MoE model written as transformers saves it (per-expert
    tensors), quantized tensor by tensor following the format's published layout. keep: a regex of modules left in
    bf16 and listed in the config's ignore list (compressed-tensors)."""
    arch, fmt = variant.split("-", 1)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(ARCHS[arch][0]())
    with torch.no_grad():  # rows and columns of very different sizes: a misplaced scale shows
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name and "lm_head" not in name and not name.endswith("gate.weight"):
                p.copy_(torch.randn(p.shape) * 0.05 * torch.exp2(torch.rand(*p.shape[:-1], 1) * 4 - 2))
    model = model.to(torch.bfloat16)
    src = os.path.join(root, f"{variant}-bf16")
    model.save_pretrained(src)
    inputs = layer_inputs(model, ids)
    t = load_file(os.path.join(src, "model.safetensors"))
    out = {}
    for key, v in t.items():
        if not QUANT_KEY.search(key) or v.dim() != 2 or (keep and re.match(keep, key)):
            out[key] = v
            continue
        mod = key[: -len(".weight")]
        if fmt == "quark-int4-fp8" and ".experts." in key:  # W4A8: INT4-FP8 experts
            q, s_t, s_ch = int4_fp8_quantize(v)
            out[key] = pack_int4(q, REORDER)
            out[f"{mod}.weight_scale"], out[f"{mod}.weight_scale_2"] = s_t.reshape(()), s_ch
        elif fmt == "quark-int4-fp8":  # ... and FP8 per-tensor elsewhere
            q, s = fp8kern.quantize_weight(v.float(), "tensor")
            out[key], out[f"{mod}.weight_scale"] = q, s.reshape(())
        elif fmt == "fp8-tensor-static":  # AutoFP8 (e.g. Mixtral-8x7B-Instruct-FP8): scalar scales
            q, s = fp8kern.quantize_weight(v.float(), "tensor")
            out[key], out[f"{mod}.weight_scale"] = q, s.reshape(())
            out[f"{mod}.input_scale"] = static_input_scale(model, inputs, mod).reshape(())
        elif fmt.startswith("fp8"):
            ue8m0 = fmt.endswith("ue8m0")
            q, s = fp8kern.quantize_weight(v.float(), "block", scale_format="ue8m0" if ue8m0 else "fp32")
            out[key], out[f"{mod}.weight_scale_inv"] = q, s
        elif fmt == "ct-fp8-dynamic":
            q, s = fp8kern.quantize_weight(v.float(), "channel")
            out[key], out[f"{mod}.weight_scale"] = q, s.reshape(-1, 1)
        else:  # ct-fp8-static: per-tensor weights, static per-tensor input scales
            q, s = fp8kern.quantize_weight(v.float(), "tensor")
            out[key], out[f"{mod}.weight_scale"] = q, s.reshape(1)
            out[f"{mod}.input_scale"] = static_input_scale(model, inputs, mod)
    dst = os.path.join(root, variant)
    os.makedirs(dst)
    keys = sorted(out)
    n = 3
    weight_map = {k: f"model-{i % n + 1:05d}-of-{n:05d}.safetensors" for i, k in enumerate(keys)}
    for shard in sorted(set(weight_map.values())):
        save_file({k: out[k] for k in keys if weight_map[k] == shard}, os.path.join(dst, shard),
                  metadata={"format": "pt"})
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    if fmt == "quark-int4-fp8":
        act = {"dtype": "fp8_e4m3", "qscheme": "per_tensor", "is_dynamic": True}
        cfg["quantization_config"] = {
            "quant_method": "quark", "exclude": ["lm_head", "*mlp.gate"], "export": {"pack_method": "reorder"},
            "global_quant_config": {"weight": QUARK_FP8_TENSOR, "input_tensors": act},
            "layer_quant_config": {"*.experts.*": {"weight": [QUARK_FP8_TENSOR, QUARK_INT4_CHANNEL],
                                                   "input_tensors": act}}}
    elif fmt == "fp8-tensor-static":
        cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static"}
    elif fmt.startswith("fp8"):
        cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                      "weight_block_size": [128, 128]}
        if fmt.endswith("ue8m0"):
            cfg["quantization_config"]["scale_fmt"] = "ue8m0"
    else:
        group = CT_CHANNEL_DYNAMIC if fmt == "ct-fp8-dynamic" else CT_TENSOR_STATIC
        cfg["quantization_config"] = ct_config(group, ["lm_head", "re:.*mlp\\.gate$", "re:.*block_sparse_moe\\.gate$"]
                                               + ([f"re:{keep}"] if keep else []))
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return src, dst


def static_input_scale(model, inputs: dict, mod: str) -> torch.Tensor:
    """Static per-tensor input scale of a quantized module: 2 * amax / 448 of what it sees on the test input (the
    margin keeps the FP8 model's slightly different activations clear of clipping); for an expert's down
    projection, of its float64 h over all tokens. Up projections get 1.5x the gate's, so that the loader must take
    the larger one for the fused gate_up GEMM."""
    hit = re.match(r"(.+\.experts)\.(\d+)\.(\w+)$", mod.replace("block_sparse_moe", "mlp"))
    if hit is None:  # a Linear
        return torch.tensor([2 * float(inputs[mod].float().abs().max()) / 448])
    ex = model.get_submodule(hit[1])
    X = inputs[hit[1]].double()
    e = int(hit[2])
    if hit[3] in ("gate_proj", "w1", "up_proj", "w3"):
        s = 2 * float(X.abs().max()) / 448
        return torch.tensor([s * (1.5 if hit[3] in ("up_proj", "w3") else 1.0)])
    W = ex.gate_up_proj[e].detach().double()
    i = W.shape[0] // 2  # the model's intermediate size (I, or another the caller's config sets)
    h = torch.nn.functional.silu(X @ W[:i].T) * (X @ W[i:].T)
    return torch.tensor([2 * float(h.abs().max()) / 448])


MOE_VARIANTS = {  # variant -> (detected format, scheme, weight granularity, scale format)
    "mixtral-ct-fp8-dynamic": ("compressed-tensors", "dynamic_per_token", "channel", "fp32"),
    "qwen3-fp8-block": ("fp8", "block128", "block", "fp32"),
    "qwen3-fp8-block-ue8m0": ("fp8", "block128", "block", "ue8m0"),
    "deepseek-fp8-block": ("fp8", "block128", "block", "fp32"),
    "qwen2-fp8-block": ("fp8", "block128", "block", "fp32"),
    "glm4-ct-fp8-dynamic": ("compressed-tensors", "dynamic_per_token", "channel", "fp32"),
    "qwen3-ct-fp8-dynamic": ("compressed-tensors", "dynamic_per_token", "channel", "fp32"),
    "mixtral-ct-fp8-static": ("compressed-tensors", "static_per_tensor", "tensor", "fp32"),
    "mixtral-fp8-tensor-static": ("fp8", "static_per_tensor", "tensor", "fp32"),
    "qwen3-quark-int4-fp8": ("quark", "dynamic_per_tensor", "channel", "fp32"),
}


@pytest.fixture(scope="module")
def moe_ids():
    return torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("variant", list(MOE_VARIANTS))
def test_from_pretrained_moe(tmp_path, moe_ids, variant):
    fmt, scheme, gran, scale_format = MOE_VARIANTS[variant]
    src, d = write_moe(str(tmp_path), variant, moe_ids)
    assert detect_format(d) == fmt
    model = from_pretrained(d)
    stored = {}
    for f in os.listdir(d):
        if f.endswith(".safetensors"):
            stored.update(load_file(os.path.join(d, f)))
    bf16 = load_file(os.path.join(src, "model.safetensors"))
    prefix = "block_sparse_moe" if variant.startswith("mixtral") else "mlp"
    names = ("w1", "w3", "w2") if variant.startswith("mixtral") else ("gate_proj", "up_proj", "down_proj")
    scale_suffix = "weight_scale_inv" if fmt == "fp8" and gran == "block" else "weight_scale"
    experts = {n: m for n, m in model.named_modules() if isinstance(m, Fp8Experts)}
    assert sorted(experts) == ARCHS[variant.split("-")[0]][1]
    for n, m in experts.items():
        assert (m.scheme, m.weight_granularity, m.scale_format) == (scheme, gran, scale_format)
        base = n.replace(".mlp.", f".{prefix}.")
        for e in range(E):
            for role, proj in zip(("gate", "up", "down"), names):
                key = f"{base}.{e}.{proj}"
                w, s = m.projection(e, role)
                if variant.endswith("int4-fp8"):  # the INT4 values the writer packed, as e4m3; scale s_ch * s_t
                    q, _, _ = int4_fp8_quantize(bf16[f"{key}.weight"])
                    assert torch.equal(w.float(), q), key
                    raw = stored[f"{key}.weight_scale_2"].float() * stored[f"{key}.weight_scale"].float()
                    assert torch.equal(s, raw.reshape(s.shape)), key
                    continue
                assert torch.equal(w.view(torch.uint8), stored[f"{key}.weight"].view(torch.uint8)), key
                raw = stored[f"{key}.{scale_suffix}"]
                want = raw.reshape(-1, 1).expand(s.shape) if gran == "tensor" else raw.reshape(s.shape)
                assert s.dtype == (torch.float8_e8m0fnu if scale_format == "ue8m0" else torch.float32), key
                assert torch.equal(s.float(), want.float()), key
            if scheme == "static_per_tensor":
                gu = max(float(stored[f"{base}.{e}.{p}.input_scale"]) for p in names[:2])
                assert float(m.gate_up_input_scale[e]) == gu
                assert float(m.down_input_scale[e]) == float(stored[f"{base}.{e}.{names[2]}.input_scale"])
    assert isinstance(model.model.layers[0].self_attn.o_proj, fp8kern.Fp8Linear)

    # Numerics of every experts module against float64, within the derived bound, on what it saw (signed data: a
    # loose bound, a sanity check; the placement of every byte is checked above, the arithmetic by the exact tests).
    records = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: records.__setitem__(n, (*a, o)))
             for n, m in experts.items()]
    with torch.no_grad():
        got = model(moe_ids).logits
    for h in hooks:
        h.remove()
    for n, (x, idx, w, out) in records.items():
        check_experts(experts[n], x, idx, w, out=out)

    # Independent of fp8kern's placement: transformers loads the same checkpoint dequantized to bf16 by
    # fp8kern-dequantize and fuses the experts its own way; its gate_up_proj / down_proj hold our projections'
    # values. Both are fp8 * scale rounded once to bf16 (ours from float64, the CLI's from fp32, which may differ
    # by one bf16 rounding in a double-rounding tie: rtol 2^-8); a misplaced row or scale is far off.
    plain_dir = str(tmp_path / "dequantized")
    dequantize_checkpoint(d, plain_dir)
    plain = transformers.AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.bfloat16)
    for n, m in experts.items():
        fused = plain.get_submodule(n)
        block = m.weight_granularity == "block"
        for e in range(E):
            for role, theirs in (("gate", fused.gate_up_proj[e, :I]), ("up", fused.gate_up_proj[e, I:]),
                                 ("down", fused.down_proj[e])):
                ours = deq64(*m.projection(e, role), block).to(torch.bfloat16)
                torch.testing.assert_close(theirs.detach().float(), ours.float(), rtol=2.0**-8, atol=0,
                                           msg=f"{n} expert {e} {role}")
    assert torch.isfinite(got).all()


def test_from_pretrained_moe_errors(tmp_path, moe_ids):
    _, d = write_moe(str(tmp_path), "qwen3-fp8-block", moe_ids)
    # A missing expert projection is named.
    index = os.path.join(d, "model.safetensors.index.json")
    with open(index) as f:
        wm = json.load(f)["weight_map"]
    shard = wm["model.layers.0.mlp.experts.3.up_proj.weight_scale_inv"]
    t = load_file(os.path.join(d, shard))
    del t["model.layers.0.mlp.experts.3.up_proj.weight_scale_inv"]
    save_file(t, os.path.join(d, shard), metadata={"format": "pt"})
    del wm["model.layers.0.mlp.experts.3.up_proj.weight_scale_inv"]
    with open(index, "w") as f:
        json.dump({"metadata": {}, "weight_map": wm}, f)
    with pytest.raises(ValueError, match=r"experts\.3\.up_proj\.weight_scale_inv"):
        from_pretrained(d)
    # An expert missing altogether (config says 6).
    for key in [k for k in wm if ".experts.5." in k]:
        t = load_file(os.path.join(d, wm[key]))
        del t[key]
        save_file(t, os.path.join(d, wm[key]), metadata={"format": "pt"})
        del wm[key]
    with open(index, "w") as f:
        json.dump({"metadata": {}, "weight_map": wm}, f)
    with pytest.raises(ValueError, match=r"missing \(expert, projection\) \[\(5, 'down'\)"):
        from_pretrained(d)


def test_compiled_forward():
    """torch.compile runs the module (its graph breaks at the host read of the expert counts); the compiled
    elementwise steps may skip intermediate roundings, which the bound allows for."""
    m = Fp8Experts.from_experts(make_experts(positive=True), "block128")
    x = exact_rows(5, H).to(torch.bfloat16)
    idx, w = routing(5, E, K_TOP)
    check_experts(m, x, idx, w, out=torch.compile(m)(x, idx, w), x_exact=True)


def test_from_pretrained_moe_experts_left_in_bf16(tmp_path, moe_ids):
    """A checkpoint whose quantization_config excludes one layer's experts stores them per expert in bf16: they are
    fused into transformers' 3-D parameters as transformers fuses them, while the other layer's are Fp8Experts."""
    keep = r"model\.layers\.1\.block_sparse_moe\.experts\."
    src, d = write_moe(str(tmp_path), "mixtral-ct-fp8-dynamic", moe_ids, keep=keep)
    model = from_pretrained(d)
    assert isinstance(model.model.layers[0].mlp.experts, Fp8Experts)
    plain = model.model.layers[1].mlp.experts
    assert not isinstance(plain, Fp8Experts) and plain.gate_up_proj.dtype == torch.bfloat16
    want = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).model.layers[1].mlp.experts
    assert torch.equal(plain.gate_up_proj, want.gate_up_proj) and torch.equal(plain.down_proj, want.down_proj)
    with torch.no_grad():
        assert torch.isfinite(model(moe_ids).logits).all()


def test_ignore_patterns_see_model_names(tmp_path, moe_ids, monkeypatch):
    """A model class's ignore patterns (like DeepSeek-V3's for its MTP layer) are written in model names; Mixtral's
    checkpoint says block_sparse_moe where the model says mlp. An FP8 layer so ignored is skipped with a warning."""
    _, d = write_moe(str(tmp_path), "mixtral-fp8-block", moe_ids)
    extra = {"model.layers.7.block_sparse_moe.experts.0.w1.weight": torch.ones(I, H).to(torch.float8_e4m3fn),
             "model.layers.7.block_sparse_moe.experts.0.w1.weight_scale_inv": torch.ones(1, 2)}
    save_file(extra, os.path.join(d, "extra.safetensors"), metadata={"format": "pt"})
    index = os.path.join(d, "model.safetensors.index.json")
    with open(index) as f:
        wm = json.load(f)["weight_map"]
    wm.update({k: "extra.safetensors" for k in extra})
    with open(index, "w") as f:
        json.dump({"metadata": {}, "weight_map": wm}, f)
    monkeypatch.setattr(transformers.MixtralForCausalLM, "_keys_to_ignore_on_load_unexpected",
                        [r"model\.layers\.7\.mlp\."], raising=False)
    with pytest.warns(UserWarning, match="does not use 2 checkpoint tensor"):
        model = from_pretrained(d)
    assert isinstance(model.model.layers[1].mlp.experts, Fp8Experts)


# The grouped path (sm90: one launch per projection, no host read). On the CPU, grouped_block_mm runs one reference
# GEMM per group, so forcing _grouped_runs checks the path's own data flow: the sort by expert, the device-side
# offsets, the rows routed nowhere, the masked combination.

@pytest.mark.parametrize("data", ["random", "exact"])
@pytest.mark.parametrize("scheme,kw", SCHEMES, ids=[s + "-" + "-".join(map(str, k.values())) for s, k in SCHEMES])
def test_grouped_flow_against_float64(monkeypatch, data, scheme, kw):
    """Every scheme: block scales take grouped_block_mm, the others grouped_scaled_mm (per-tensor activation scales
    repeated per row; per-tensor dynamic ones over the routed rows only)."""
    exact = data == "exact"
    ex = make_experts(positive=exact, dtype=torch.float32)
    T = 9
    per_row = scheme in ("dynamic_per_token", "block128")
    x = exact_rows(T, H, row_exp=[-6 + t % 4 for t in range(T)] if per_row else None) if exact else torch.randn(T, H)
    if scheme == "static_per_tensor":
        # Each expert's scales 1, 2 or 4 times the margin-2 ones (so a row quantized with another expert's scale
        # can clip), except gate_up's for exact data, which must stay 2^-6 (exact).
        spread = torch.exp2(torch.arange(E) % 3.0)[:, None]
        kw = {"input_scales": static_scales(ex, x) * spread}
        if exact:
            kw["input_scales"][:, 0] = 2.0**-6  # amax / 448 of exact_rows: exact, and nothing clips
    m = Fp8Experts.from_experts(ex, scheme, **kw)
    monkeypatch.setattr(Fp8Experts, "_grouped_runs", lambda self, x: True)
    idx, w = routing(T, E, K_TOP, seed=3)  # every expert, and the no-expert index once
    check_experts(m, x, idx, w, x_exact=exact)
    grouped = None
    for flag in (True, False):  # the same reference GEMMs on the same rows: equal to the per-expert path
        monkeypatch.setattr(Fp8Experts, "_grouped_runs", lambda self, x, f=flag: f)
        out = m(x, idx, w)
        assert grouped is None or torch.equal(out, grouped)
        grouped = out


@pytest.mark.parametrize("scheme,kw", SCHEMES[2:], ids=[s + "-" + "-".join(map(str, k.values())) for s, k in SCHEMES[2:]])
def test_grouped_flow_compiles(monkeypatch, scheme, kw):
    """The grouped layer traces whole under torch.compile into one graph without host reads (fullgraph alone would
    trace a .item() as a scalar output) and the compiled layer gives the eager result. The CPU has no kernel: the op
    fp8kern::grouped_mm_out runs the per-group GEMMs in its place, so this checks the op's registration (fake
    implementation included) and the layer's traced data flow."""

    ex = make_experts(dtype=torch.float32)
    x = torch.randn(7, H, generator=torch.Generator().manual_seed(5))
    if scheme == "static_per_tensor":
        kw = {"input_scales": static_scales(ex, x)}
    m = Fp8Experts.from_experts(ex, scheme, **kw)
    monkeypatch.setattr(Fp8Experts, "_grouped_runs", lambda self, x: True)
    monkeypatch.setattr(fp8kern.ops.grouped, "grouped_supported", lambda *args: True)
    monkeypatch.setattr(fp8kern.ops.grouped, "_grouped_mm_impl", fp8kern.ops.grouped._grouped_mm_per_group)
    idx, w = routing(7, E, K_TOP, seed=6)
    eager = m(x, idx, w)
    torch._dynamo.reset()
    compiled, graphs = compile_recording(m)
    assert torch.equal(compiled(x, idx, w), eager)
    torch._dynamo.reset()
    assert len(graphs) == 1 and graphs[0].count("fp8kern.grouped_mm_out.default") == 2, graphs
    assert not host_reads(graphs[0])


def test_grouped_flow_bad_index(monkeypatch):
    """Without value checks (a GPU's default) an index outside [0, E] makes its token's row NaN and leaves the others
    as if it were the no-expert index; with them (the CPU's default) it raises."""
    m = Fp8Experts.from_experts(make_experts(), "block128")
    monkeypatch.setattr(Fp8Experts, "_grouped_runs", lambda self, x: True)
    x = torch.randn(4, H, dtype=torch.bfloat16)
    idx = torch.tensor([[0, 1], [2, -1], [3, 4], [E + 2, 5]])
    w = torch.full((4, 2), 0.5)
    with pytest.raises(ValueError, match=r"2 value\(s\) outside \[0, 6\]"):
        m(x, idx, w)
    monkeypatch.setattr(fp8kern._backend, "value_checks_on", lambda device: False)
    out = m(x, idx, w)
    fixed = m(x, torch.where((idx < 0) | (idx > E), E, idx), w)
    bad = torch.tensor([False, True, False, True])
    assert out[bad].isnan().all() and torch.equal(out[~bad], fixed[~bad])


def test_grouped_block_mm_reference_and_errors():
    """fp8kern.grouped_block_mm on the CPU (one GEMM per group on the CPU's path; rows outside every group untouched)
    and its argument checks."""
    g = torch.Generator().manual_seed(1)
    G, N, K, rows = 3, 200, 300, 12
    a, sa = fp8kern.quantize(torch.randn(rows, K, generator=g), "group")
    b, sb = zip(*(fp8kern.quantize_weight(torch.randn(N, K, generator=g), "block") for _ in range(G)))
    b, sb = torch.stack(b), torch.stack(sb)
    offsets = torch.tensor([0, 4, 4, 10])
    out = torch.full((rows, N), 3.0)
    assert fp8kern.grouped_block_mm(a, sa, b, sb, offsets, out) is out
    for e, (lo, hi) in enumerate(((0, 4), (4, 4), (4, 10))):
        if hi > lo:
            assert torch.equal(out[lo:hi], fp8kern.scaled_mm(a[lo:hi], b[e], sa[lo:hi], sb[e], out_dtype=out.dtype))
    assert (out[10:] == 3.0).all()
    one = torch.zeros(1, N)  # a one-row group with K <= 128: its [1, 1] scale is still a group scale
    a1, b1 = a[:1, :128].contiguous(), b[:1, :, :128].contiguous()
    fp8kern.grouped_block_mm(a1, sa[:1, :1], b1, sb[:1, :, :1], torch.tensor([0, 1]), one)
    # The same numbers as one block-scaled GEMM on the path the CPU takes (the grouped GEMM runs one per group).
    assert torch.equal(one, fp8kern.ops.gemm.scaled_mm_impl(a1, b1[0], sa[:1, :1], sb[0, :, :1], torch.float32, None,
                                                            fp8kern.ops._BLOCK_LAYOUT))
    for bad, exc, match in (
            ({"offsets": torch.tensor([0, 5, 4, 10])}, ValueError, r"offsets must be non-decreasing within \[0, 12\]"),
            ({"offsets": torch.tensor([0, 4, 4, 13])}, ValueError,
             r"offsets must be non-decreasing .*got \[0, 4, 4, 13\]"),
            ({"offsets": torch.tensor([0, 4, 10])}, ValueError,
             r"offsets has shape \(3,\), .*expected a contiguous \(4,\)"),
            ({"offsets": offsets.int()}, TypeError, "offsets has .*dtype torch.int32, expected torch.int64"),
            ({"sa": sa[:, :2]}, ValueError, r"scale_a has shape \(12, 2\), .*expected \(12, 3\)"),
            ({"sa": sa.double()}, TypeError, "scale_a has .*float64, expected float32, bfloat16"),
            ({"sb": sb[:2]}, ValueError, r"scale_b has shape \(2, 2, 3\), .*expected \(3, 2, 3\)"),
            ({"a": a.float()}, TypeError, "a has .*float32, expected torch.float8_e4m3fn"),
            ({"a": a.t().contiguous().t()}, ValueError, "a has .*non-contiguous strides .*call a.contiguous"),
            ({"out": out[:, :100]}, ValueError, r"out has shape \(12, 100\), .*expected a contiguous \(12, 200\)"),
            ({"out": out.double()}, TypeError, "out has .*float64, expected torch.bfloat16"),
            ({"b": b[0]}, ValueError, r"b has shape \(200, 300\), .*expected a 3-D \[G, N, 300\]"),
            ({"a": a[None]}, ValueError, r"a has shape \(1, 12, 300\), .*expected a 2-D"),
            ({"offsets": offsets.tolist()}, TypeError, "offsets has type list, expected a torch.Tensor")):
        args = dict(a=a, sa=sa, b=b, sb=sb, offsets=offsets, out=out) | bad
        with pytest.raises(exc, match="grouped_block_mm: " + match):
            fp8kern.grouped_block_mm(args["a"], args["sa"], args["b"], args["sb"], args["offsets"], args["out"])
    # No group, or no column: nothing to compute, out untouched (as where the kernel runs).
    out.fill_(3.0)
    assert fp8kern.grouped_block_mm(a, sa, b[:0], sb[:0], torch.zeros(1, dtype=torch.int64), out) is out
    assert fp8kern.grouped_block_mm(a, sa, b[:, :0], sb[:, :0], offsets, out[:, :0]).shape == (rows, 0)
    assert (out == 3.0).all()


def test_grouped_scaled_mm_reference_and_errors():
    """fp8kern.grouped_scaled_mm (per-row x per-channel scales) on the CPU and its scale checks."""
    g = torch.Generator().manual_seed(2)
    G, N, K, rows = 3, 200, 300, 12
    a, sa = fp8kern.quantize(torch.randn(rows, K, generator=g), "token")
    b, sb = zip(*(fp8kern.quantize_weight(torch.randn(N, K, generator=g), "channel") for _ in range(G)))
    b, sb = torch.stack(b), torch.stack(sb)  # sb [G, N, 1]
    offsets = torch.tensor([0, 1, 1, 10])
    for sa_, sb_ in ((sa, sb), (sa.reshape(-1), sb.reshape(G, N))):
        out = torch.full((rows, N), 3.0, dtype=torch.bfloat16)
        fp8kern.grouped_scaled_mm(a, sa_, b, sb_, offsets, out)
        for e, (lo, hi) in enumerate(((0, 1), (1, 1), (1, 10))):
            if hi > lo:  # a one-row group's [1, 1] scale is still per row
                expect = fp8kern.reference.scaled_mm(a[lo:hi], b[e], sa[lo:hi], sb[e], torch.bfloat16, None,
                                                     fp8kern.Layout("token", "channel"))
                assert torch.equal(out[lo:hi], expect)
        assert (out[10:] == 3.0).all()
    for bad, exc, match in (
            ({"sa": sa[:5]}, ValueError, r"scale_a has shape \(5, 1\), .*expected \(12,\) or \(12, 1\)"),
            ({"sa": sa.double()}, TypeError, "scale_a has .*float64, expected torch.float32"),
            ({"sb": sb[:, :100]}, ValueError, r"scale_b has shape \(3, 100, 1\), .*expected \(3, 200\)"),
            ({"sb": sb.reshape(-1)}, ValueError, r"scale_b has shape \(600,\)")):
        args = dict(sa=sa, sb=sb) | bad
        with pytest.raises(exc, match="grouped_scaled_mm: " + match):
            fp8kern.grouped_scaled_mm(a, args["sa"], b, args["sb"], offsets, torch.zeros(rows, N))
