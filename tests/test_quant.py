"""Quantization properties of fp8kern.quantize / quantize_weight (CPU: the reference path).

Round-trip bound. e4m3 has 3 mantissa bits, so rounding v = x / scale to nearest has relative error at most
2^-4 for |v| >= 2^-6 (normal range) and absolute error at most 2^-10 below it (subnormal spacing 2^-9). The
reciprocal and the product x * (1/scale) add two fp32 roundings (relative 2^-24 each) before that. In x's units:
|dequant(q) - x| <= scale * max(2^-4 |v|, 2^-10) * (1 + 2^-22) + 2^-22 |x|. Saturated values are tested apart.
"""

import math

import numpy as np
import pytest
import torch

import fp8kern
from fp8kern.reference import E4M3_MAX, MIN_SCALE


def f32_div(a, b):
    """a / b rounded to fp32, as the library computes scales."""
    return float(np.float32(a) / np.float32(b))


def roundtrip_bound(x, scale_full):
    x = x.double()
    s = scale_full.double()
    v = (x / s).abs()
    return s * torch.maximum(2.0**-4 * v, torch.full_like(v, 2.0**-10)) * (1 + 2.0**-22) + 2.0**-22 * x.abs()


def full_scale(scale, M, K, granularity, group_size=128):
    s = scale.float().reshape(M if granularity != "tensor" else 1, -1)
    if granularity == "group":
        return s.repeat_interleave(group_size, dim=1)[:, :K]
    return s.expand(M, K)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("granularity", ["token", "tensor", "group"])
@pytest.mark.parametrize("scale_format", ["fp32", "ue8m0"])
@pytest.mark.parametrize("M,K", [(1, 1), (3, 7), (17, 128), (8, 300), (4, 4096)])
def test_roundtrip_within_e4m3_bound(dtype, granularity, scale_format, M, K):
    gen = torch.Generator().manual_seed(M * 1000 + K)
    # Rows of very different magnitude, so per-row and per-group scales differ.
    x = (torch.randn(M, K, generator=gen) * torch.exp2(torch.randint(-8, 8, (M, 1), generator=gen).float())).to(dtype)
    q, s = fp8kern.quantize(x, granularity, scale_format=scale_format)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    G = math.ceil(K / 128)
    assert tuple(s.shape) == {"token": (M, 1), "tensor": (1,), "group": (M, G)}[granularity]
    assert s.dtype == (torch.float8_e8m0fnu if scale_format == "ue8m0" else torch.float32)
    sf = full_scale(s, M, K, granularity)
    err = (q.double() * sf.double() - x.double()).abs()
    assert (err <= roundtrip_bound(x, sf)).all()
    # The dynamic scale maps each segment's amax to 448 (fp32) or into (224, 448] (UE8M0 rounds the scale up),
    # which e4m3 rounding (spacing 32 above 128) turns into [224, 448].
    qmax = q.float().abs().reshape(M if granularity != "tensor" else 1, -1)
    if granularity == "group":
        qmax = torch.nn.functional.pad(q.float().abs(), (0, G * 128 - K)).reshape(M, G, 128).amax(-1)
    else:
        qmax = qmax.amax(-1)
    if scale_format == "fp32":
        assert (qmax == E4M3_MAX).all()
    else:
        assert ((qmax >= E4M3_MAX / 2) & (qmax <= E4M3_MAX)).all()
        m, _ = torch.frexp(s.float())
        assert (m == 0.5).all(), "UE8M0 scales must be powers of two"


def test_zero_rows_get_finite_scale():
    x = torch.zeros(3, 256, dtype=torch.bfloat16)
    x[1, 5] = 2.0
    for g in ("token", "group", "tensor"):
        q, s = fp8kern.quantize(x, g)
        assert torch.isfinite(s).all() and (s > 0).all()
        assert (q[0].float() == 0).all() and (q[2].float() == 0).all()
    _, s = fp8kern.quantize(x, "token")
    assert s[0, 0].item() == MIN_SCALE and s[1, 0].item() == f32_div(2, 448)


def test_static_scale_saturates_never_nan():
    x = torch.tensor([[1e4, -1e4, 500.0, 448.0, 1.0, 0.0]], dtype=torch.float32)
    q, s = fp8kern.quantize(x, "tensor", scale=torch.tensor([1.0]))
    assert q.float().tolist() == [[448.0, -448.0, 448.0, 448.0, 1.0, 0.0]]
    assert s.item() == 1.0
    q, _ = fp8kern.quantize(torch.full((2, 4), 65504.0, dtype=torch.float16), "tensor", scale=torch.tensor([1e-3]))
    assert (q.float() == 448).all()


def test_static_per_token_and_group():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 260, generator=gen)
    st = torch.rand(5, generator=gen) + 0.01
    q, s = fp8kern.quantize(x, "token", scale=st)
    expect = (x / st[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    # x * (1/s) and x / s can differ by one fp32 rounding, which can flip an e4m3 rounding tie: compare values.
    assert (q.float() - expect.float()).abs().le(expect.float().abs() * 2.0**-3 + 2.0**-9).all()
    sg = torch.rand(5, 3, generator=gen) + 0.01
    q, _ = fp8kern.quantize(x, "group", scale=sg)
    sf = sg.repeat_interleave(128, dim=1)[:, :260]
    assert ((q.double() * sf.double() - x.double()).abs() <= roundtrip_bound(x, sf)).all()


def test_scale_ub_caps_token_scales():
    x = torch.tensor([[1.0, -2.0], [1000.0, 3.0]])
    q, s = fp8kern.quantize(x, "token", scale_ub=100.0)
    assert s.flatten().tolist() == [f32_div(2, 448), f32_div(100, 448)]
    assert q[1, 0].float().item() == 448.0  # 1000 saturates under the capped scale


def test_nan_input_is_visible():
    x = torch.ones(2, 16)
    x[0, 3] = float("nan")
    q, s = fp8kern.quantize(x, "token")
    assert math.isnan(s[0, 0].item()) and s[1, 0].item() == f32_div(1, 448)
    assert torch.isnan(q[0].float()).all() and not torch.isnan(q[1].float()).any()


def test_leading_dims_and_row_stride():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 200, generator=gen, dtype=torch.float32).to(torch.bfloat16)
    q, s = fp8kern.quantize(x, "group")
    assert q.shape == (2, 3, 200) and s.shape == (2, 3, 2)
    q2, s2 = fp8kern.quantize(x.reshape(6, 200), "group")
    assert torch.equal(q.reshape(6, 200).view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s.reshape(6, 2), s2)
    big = torch.randn(4, 300, generator=gen)
    q3, s3 = fp8kern.quantize(big[:, 50:250], "token")
    q4, s4 = fp8kern.quantize(big[:, 50:250].contiguous(), "token")
    assert torch.equal(q3.view(torch.uint8), q4.view(torch.uint8)) and torch.equal(s3, s4)


def test_empty_rows():
    q, s = fp8kern.quantize(torch.empty(0, 64), "group")
    assert q.shape == (0, 64) and s.shape == (0, 1)
    q, s = fp8kern.quantize(torch.empty(0, 64), "tensor")
    assert s.item() == MIN_SCALE


@pytest.mark.parametrize("granularity,block", [("channel", None), ("tensor", None), ("block", (128, 128)),
                                               ("block", (64, 32))])
def test_quantize_weight(granularity, block):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(300, 200, generator=gen, dtype=torch.float32).to(torch.bfloat16)
    q, s = fp8kern.quantize_weight(w, granularity, block_size=block or (128, 128))
    N, K = w.shape
    if granularity == "channel":
        assert s.shape == (N, 1)
        sf = s.expand(N, K)
    elif granularity == "tensor":
        assert s.shape == (1,)
        sf = s.reshape(1, 1).expand(N, K)
    else:
        bn, bk = block
        assert s.shape == (math.ceil(N / bn), math.ceil(K / bk))
        sf = s.repeat_interleave(bn, 0)[:N].repeat_interleave(bk, 1)[:, :K]
        # Independently: each block's amax maps to 448.
        for i, j in [(0, 0), (s.shape[0] - 1, s.shape[1] - 1)]:
            blk = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].float()
            assert s[i, j].item() == f32_div(blk.abs().max().item(), 448)
    assert ((q.double() * sf.double() - w.double()).abs() <= roundtrip_bound(w, sf)).all()


def test_quantize_weight_ue8m0_block():
    w = torch.randn(256, 384)
    q, s = fp8kern.quantize_weight(w, "block", scale_format="ue8m0")
    assert s.dtype == torch.float8_e8m0fnu and s.shape == (2, 3)
    m, _ = torch.frexp(s.float())
    assert (m == 0.5).all()


def test_group_wider_than_the_row_is_the_row():
    """group_size >= K means one group per row, the per-token result, without padding x to group_size columns
    (2^40 would need terabytes)."""
    x = torch.randn(3, 200)
    q, s = fp8kern.quantize(x, "group", group_size=1 << 40)
    qt, st = fp8kern.quantize(x, "token")
    assert s.shape == (3, 1) and torch.equal(s, st) and torch.equal(q.view(torch.uint8), qt.view(torch.uint8))
