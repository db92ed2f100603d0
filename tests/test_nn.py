"""Fp8Linear and quantize_model on the CPU (reference path).

Tolerance of an Fp8Linear against float64 x @ W_deq.T + b, where W_deq is the stored e4m3 weight times its
scale (the weight's own quantization error is not under test): activation quantization rounds each x element to
e4m3, relative error at most 2^-4 in the normal range and absolute 2^-10 * s_x below it (s_x the token/group/tensor
scale), so |error| <= sum_k |W_deq[n, k]| * (2^-4 |x_k| + 2^-10 s_x); the fp32 GEMM adds gamma_K * S (K * 2^-24
relative to the sum of absolute products) and the output rounding u_out * |y| (2^-8 for bf16).
"""

import pytest
import torch
from torch import nn

import fp8kern
from fp8kern.nn import Fp8Linear, quantize_model

U_OUT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}


def w_deq(m: Fp8Linear) -> torch.Tensor:
    bs = (128, 128) if m.weight_granularity == "block" else None
    s = m.weight_scale if m.weight_granularity != "channel" else m.weight_scale.reshape(-1)
    return fp8kern.reference.dequantize(m.weight, s, bs).double()


def check_linear(m: Fp8Linear, x: torch.Tensor, y: torch.Tensor | None = None):
    """Check y (default m(x)) against float64 x @ W_deq.T + b with the bound in the module docstring."""
    y = m(x) if y is None else y
    assert y.shape == (*x.shape[:-1], m.out_features) and y.dtype == x.dtype
    x2 = x.reshape(-1, m.in_features).double()
    W = w_deq(m)
    exact = x2 @ W.t() + (m.bias.double() if m.bias is not None else 0)
    if m.dynamic:
        gran = m.act_granularity
        _, s = fp8kern.reference.quantize(x.reshape(-1, m.in_features).float(), gran, scale_format=m.scale_format)
        s_x = s.double().amax(dim=-1, keepdim=True) if gran != "tensor" else s.double().reshape(1, 1)
    else:
        s_x = m.input_scale.double().reshape(1, 1)
    K = m.in_features
    S = x2.abs() @ W.abs().t()
    bound = (2.0**-4 * S + 2.0**-10 * s_x * W.abs().sum(1)[None, :] + (K + 3) * 2.0**-24 * S
             + U_OUT[x.dtype] * exact.abs() + 1e-30)
    err = (y.reshape(-1, m.out_features).double() - exact).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"
    return y


@pytest.mark.parametrize("scheme", ["dynamic_per_token", "dynamic_per_tensor", "block128"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_from_linear(scheme, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(200, 130, bias=True).to(dtype)
    m = Fp8Linear.from_linear(lin, scheme)
    assert m.weight.dtype == torch.float8_e4m3fn and m.bias.dtype == dtype
    x = torch.randn(2, 5, 200).to(dtype)
    check_linear(m, x)


def test_block128_ue8m0():
    torch.manual_seed(1)
    m = Fp8Linear.from_linear(nn.Linear(300, 260, bias=False), "block128", scale_format="ue8m0")
    assert m.weight_scale.dtype == torch.float8_e8m0fnu and m.weight_scale.shape == (3, 3)
    check_linear(m, torch.randn(7, 300))


def test_state_dict_round_trip():
    torch.manual_seed(2)
    m = Fp8Linear.from_linear(nn.Linear(64, 48), "block128")
    m2 = Fp8Linear(64, 48, scheme="block128", dtype=torch.float32)
    m2.load_state_dict(m.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(m(x), m2(x))
    assert set(m.state_dict()) == {"weight", "weight_scale", "bias"}


@pytest.mark.parametrize("cast", ["to_bf16", "half", "float", "to_fp16_cpu"])
def test_dtype_casts_keep_the_fp8_format(cast):
    """model.to(dtype) and friends cast the bias but leave the e4m3 weight and the fp32 / e8m0 scales as stored
    (nn.Module would otherwise convert them, as e4m3 counts as floating point, and forward would reject them)."""
    torch.manual_seed(7)
    for scheme, kw in [("dynamic_per_token", {}), ("static_per_tensor", dict(input_scale=0.01)),
                       ("block128", dict(scale_format="ue8m0"))]:
        m = Fp8Linear.from_linear(nn.Linear(256, 130), scheme, **kw)
        before = {k: v.clone() for k, v in m.state_dict().items() if k != "bias"}
        {"to_bf16": lambda: m.to(torch.bfloat16), "half": m.half, "float": m.float,
         "to_fp16_cpu": lambda: m.to("cpu", torch.float16)}[cast]()
        for k, v in before.items():
            assert getattr(m, k).dtype == v.dtype and torch.equal(getattr(m, k).view(torch.uint8), v.view(torch.uint8))
        dtype = {"to_bf16": torch.bfloat16, "half": torch.float16, "float": torch.float32,
                 "to_fp16_cpu": torch.float16}[cast]
        assert m.bias.dtype == dtype
        check_linear(m, torch.randn(3, 256).to(dtype))


def test_quantize_model_shared_module_and_unreached_layers():
    """A Linear under two names is converted once and set under both; a static layer the calibration never runs
    is skipped with the reason, not given a made-up scale."""
    torch.manual_seed(8)
    model = nn.Module()
    model.a = nn.Linear(32, 32)
    model.b = model.a
    model.unused = nn.Linear(32, 8)
    model.forward = lambda x: model.a(x)
    report = quantize_model(model, "static_per_tensor", skip=(), calibration_data=[torch.randn(4, 32)])
    assert isinstance(model.a, Fp8Linear) and model.b is model.a
    assert sorted(report.replaced) == ["a", "b"]
    assert "never reached" in report.skipped["unused"] and isinstance(model.unused, nn.Linear)
    report = quantize_model(model, "dynamic_per_token", skip=())
    assert report.replaced == ["unused"]


def test_quantize_model_dynamic_and_report():
    torch.manual_seed(3)
    model = nn.Sequential()
    model.add_module("up", nn.Linear(64, 96))
    model.add_module("act", nn.GELU())
    model.add_module("down", nn.Linear(96, 64))
    model.add_module("lm_head", nn.Linear(64, 10))
    report = quantize_model(model, "dynamic_per_token")
    assert report.replaced == ["up", "down"]
    assert report.skipped == {"lm_head": "matches skip pattern 'lm_head'"}
    assert isinstance(model.up, Fp8Linear) and isinstance(model.lm_head, nn.Linear)
    assert "skipped lm_head" in str(report)
    check_linear(model.up, torch.randn(4, 64))


def test_quantize_model_static_calibration():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(32, 16))
    calib = [torch.randn(8, 32) * 3, torch.randn(8, 32)]
    amax = max(float(c.abs().max()) for c in calib)
    quantize_model(model, "static_per_tensor", skip=(), calibration_data=calib)
    m = model[0]
    assert isinstance(m, Fp8Linear) and not m.dynamic
    assert m.input_scale.item() == pytest.approx(amax / 448, rel=1e-6)
    check_linear(m, calib[1])
    with pytest.raises(ValueError, match="needs calibration_data"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), "static_per_tensor", skip=())


def test_compiled_forward_matches_eager():
    torch.manual_seed(5)
    m = Fp8Linear.from_linear(nn.Linear(128, 64), "dynamic_per_token")
    x = torch.randn(6, 128)
    assert torch.equal(torch.compile(m, fullgraph=True)(x), m(x))


@pytest.mark.parametrize("act_scale_format", ["fp32", "ue8m0"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_block_fp8_linear(act_scale_format, dtype):
    """fp8kern.block_fp8_linear on checkpoint-style tensors (weight, weight_scale, bias) meets the Fp8Linear bound;
    N and K are not multiples of 128, x has two leading dims, the bias comes in another dtype."""
    torch.manual_seed(2)
    m = Fp8Linear.from_linear(nn.Linear(300, 260).to(dtype), "block128", scale_format=act_scale_format)
    x = torch.randn(3, 4, 300).to(dtype)
    y = fp8kern.block_fp8_linear(x, m.weight, m.weight_scale, m.bias.float(), act_scale_format=act_scale_format)
    check_linear(m, x, y)
    assert torch.equal(y, m(x)), "Fp8Linear('block128') and block_fp8_linear share one path"
    strided = x.reshape(12, 300).t().contiguous().t()  # same values, column-major: copied, not rejected
    y_strided = fp8kern.block_fp8_linear(strided, m.weight, m.weight_scale, m.bias, act_scale_format=act_scale_format)
    assert torch.equal(y_strided, y.reshape(12, 260))


def test_block_fp8_linear_errors():
    w, s = fp8kern.quantize_weight(torch.randn(260, 300), "block")
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        fp8kern.block_fp8_linear(torch.ones(2, 300, dtype=torch.int64), w, s)
    with pytest.raises(ValueError, match=r"x's last dim must be K=300"):
        fp8kern.block_fp8_linear(torch.randn(2, 299), w, s)
    with pytest.raises(ValueError, match=r"weight_scale has shape \(260, 1\), expected the per-128x128-block shape "
                                         r"\(3, 3\)"):
        fp8kern.block_fp8_linear(torch.randn(2, 300), w, torch.ones(260, 1))
    with pytest.raises(TypeError, match="weight has dtype torch.bfloat16, expected torch.float8_e4m3fn"):
        fp8kern.block_fp8_linear(torch.randn(2, 300), w.bfloat16(), s)


def test_errors():
    m = Fp8Linear(16, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="input has 15 features in the last dim, expected 16"):
        m(torch.randn(2, 15))
    with pytest.raises(TypeError, match="input dtype torch.int64"):
        m(torch.ones(2, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match="scheme='w4a8'"):
        Fp8Linear(16, 8, scheme="w4a8")
    with pytest.raises(ValueError, match="weight_granularity='block' does not fit scheme='dynamic_per_token'"):
        Fp8Linear(16, 8, weight_granularity="block")
    with pytest.raises(ValueError, match="needs input_scale"):
        Fp8Linear.from_linear(nn.Linear(16, 8), "static_per_tensor")
