"""Bad input raises a Python exception that names the argument, what was given and what is expected."""

import pytest
import torch

import fp8kern

F8 = torch.float8_e4m3fn


def ops(M=4, N=8, K=32):
    a = torch.ones(M, K).to(F8)
    b = torch.ones(N, K).to(F8)
    return a, b, torch.ones(M), torch.ones(N)


@pytest.mark.parametrize("mutate,exc,pattern", [
    (lambda a, b, sa, sb: (a.float(), b, sa, sb), TypeError, r"a has dtype torch.float32, expected torch.float8_e4m3fn"),
    (lambda a, b, sa, sb: (a, b.to(torch.float8_e5m2), sa, sb), TypeError, r"b has dtype torch.float8_e5m2"),
    (lambda a, b, sa, sb: (a.reshape(2, 2, 32), b, sa, sb), ValueError, r"a has shape \(2, 2, 32\), expected 2-D"),
    (lambda a, b, sa, sb: (a, b[0], sa, sb), ValueError, r"b has shape \(32,\), expected 2-D"),
    (lambda a, b, sa, sb: (a, b[:, :16].contiguous(), sa, sb), ValueError, r"a has K=32 columns but b has shape \(8, 16\)"),
    (lambda a, b, sa, sb: (a[:, :0], b[:, :0], sa, sb), ValueError, r"K=0"),
    (lambda a, b, sa, sb: (a, b, torch.ones(3), sb), ValueError, r"scale_a has shape \(3,\), which fits no layout"),
    (lambda a, b, sa, sb: (a, b, sa, torch.ones(1, 8)), ValueError, r"scale_b has shape \(1, 8\).*reshape\(-1\)"),
    (lambda a, b, sa, sb: (a, b, sa, torch.ones(7)), ValueError, r"scale_b has shape \(7,\)"),
    (lambda a, b, sa, sb: (a, b, torch.ones(4, 1), torch.ones(1, 1, 1, 2)), ValueError, r"scale_b has shape"),
    (lambda a, b, sa, sb: (a, b, sa.double(), sb), TypeError, r"scale_a has dtype torch.float64, expected torch.float32"),
    (lambda a, b, sa, sb: (a, b, sa, sb.to(torch.float8_e8m0fnu)), TypeError, r"scale_b has dtype torch.float8_e8m0fnu"),
    (lambda a, b, sa, sb: (a, b, "1.0", sb), TypeError, r"scale_a must be a torch.Tensor"),
    (lambda a, b, sa, sb: (a.t(), b, sa, sb), ValueError, r"a has K=4 columns|a of shape"),
    (lambda a, b, sa, sb: (a, b, torch.tensor([1.0, float("nan"), 1, 1]), sb), ValueError,
     r"scale_a holds 1 non-finite or non-positive value\(s\) \(first at flat index 1: nan\)"),
    (lambda a, b, sa, sb: (a, b, sa, -sb), ValueError, r"scale_b holds 8 non-finite or non-positive"),
    (lambda a, b, sa, sb: (a, b, sa, sb * float("inf")), ValueError, r"scale_b holds 8 non-finite"),
    (lambda a, b, sa, sb: (a, b, sa, torch.zeros(())), ValueError, r"scale_b holds 1 non-finite or non-positive"),
])
def test_scaled_mm_bad_operands(mutate, exc, pattern):
    a, b, sa, sb = mutate(*ops())
    with pytest.raises(exc, match=pattern):
        fp8kern.scaled_mm(a, b, sa, sb)


def test_non_contiguous_operands():
    a, b, sa, sb = ops(M=8, N=8, K=8)
    with pytest.raises(ValueError, match=r"a of shape \(8, 8\) has strides \(1, 8\).*a.contiguous\(\)"):
        fp8kern.scaled_mm(a.t(), b, sa, sb)
    with pytest.raises(ValueError, match=r"b of shape .* transposed view, like torch._scaled_mm"):
        fp8kern.scaled_mm(a, b.t(), sa, sb)
    with pytest.raises(ValueError, match=r"a of shape \(4, 8\) has strides \(16, 2\)"):
        fp8kern.scaled_mm(torch.ones(4, 16).to(F8)[:, ::2], b, torch.ones(4), sb)


def test_block_layout_mismatches():
    a, b, _, _ = ops(M=4, N=256, K=384)
    with pytest.raises(ValueError, match=r"scale_a of shape \(4, 3\) is per-1x128-group .* needs scale_b of shape \(2, 3\)"):
        fp8kern.scaled_mm(a, b, torch.ones(4, 3), torch.ones(256))
    with pytest.raises(ValueError, match=r"scale_b of shape \(2, 3\) is per-128x128-block but scale_a .* \(4, 3\)"):
        fp8kern.scaled_mm(a, b, torch.ones(4), torch.ones(2, 3))


def test_out_dtype_bias_and_out():
    a, b, sa, sb = ops()
    with pytest.raises(TypeError, match=r"out_dtype=torch.int32, expected one of"):
        fp8kern.scaled_mm(a, b, sa, sb, out_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"bias has shape \(4,\), expected \(N,\)=\(8,\)"):
        fp8kern.scaled_mm(a, b, sa, sb, bias=torch.ones(4))
    with pytest.raises(TypeError, match=r"bias has dtype torch.int64 but out_dtype=torch.bfloat16"):
        fp8kern.scaled_mm(a, b, sa, sb, bias=torch.ones(8, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"bias has dtype torch.float32 but out_dtype=torch.bfloat16.*bias.to"):
        fp8kern.scaled_mm(a, b, sa, sb, bias=torch.ones(8))
    with pytest.raises(ValueError, match=r"bias has strides \(2,\), expected contiguous"):
        fp8kern.scaled_mm(a, b, sa, sb, bias=torch.ones(16, dtype=torch.bfloat16)[::2])
    with pytest.raises(ValueError, match=r"out has shape \(4, 9\), expected \(M, N\)=\(4, 8\)"):
        fp8kern.scaled_mm(a, b, sa, sb, out=torch.empty(4, 9, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match=r"out has dtype torch.float32 but out_dtype=torch.bfloat16"):
        fp8kern.scaled_mm(a, b, sa, sb, out=torch.empty(4, 8))
    with pytest.raises(ValueError, match=r"out has strides \(1, 4\)"):
        fp8kern.scaled_mm(a, b, sa, sb, out=torch.empty(8, 4, dtype=torch.bfloat16).t())


def test_mixed_devices():
    a, b, sa, sb = ops()
    with pytest.raises(ValueError, match=r"scale_b is on meta but a is on cpu"):
        fp8kern.scaled_mm(a, b, sa, sb.to("meta"))


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(x=torch.ones(4, 8, dtype=torch.int32)), TypeError, r"x has dtype torch.int32, expected"),
    (dict(x=torch.ones(4, 0)), ValueError, r"K=0"),
    (dict(x=torch.tensor(1.0)), ValueError, r"0-d tensor"),
    (dict(x=torch.ones(8, 4).t()), ValueError, r"x of shape \(4, 8\) has strides \(1, 4\).*x.contiguous\(\)"),
    (dict(x=torch.ones(4, 8), granularity="row"), ValueError, r"granularity='row', expected"),
    (dict(x=torch.ones(4, 8), granularity="group", group_size=0), ValueError, r"group_size=0"),
    (dict(x=torch.ones(4, 8), scale_format="e8m0"), ValueError, r"scale_format='e8m0'"),
    (dict(x=torch.ones(4, 8), scale_ub=-1.0), ValueError, r"scale_ub=-1.0, expected a float > 0 that fits float32"),
    (dict(x=torch.ones(4, 8), scale_ub=1e-50), ValueError, r"scale_ub=1e-50, expected a float > 0 that fits float32"),
    (dict(x=torch.ones(4, 8), scale_ub=1e39), ValueError, r"scale_ub=1e\+39, expected a float > 0 that fits float32"),
    (dict(x=torch.ones(4, 8), scale_ub=torch.tensor(1.0)), TypeError, r"scale_ub must be a Python float"),
    (dict(x=torch.ones(4, 8), scale=torch.ones(3)), ValueError, r"scale has shape \(3,\), expected \(4, 1\)"),
    (dict(x=torch.ones(4, 8), granularity="tensor", scale=torch.ones(1, dtype=torch.float64)), TypeError,
     r"scale has dtype torch.float64"),
    (dict(x=torch.ones(4, 8), granularity="tensor", scale=torch.zeros(1)), ValueError, r"scale holds 1 non-finite"),
    (dict(x=torch.ones(4, 8), granularity="tensor", scale=torch.ones(1), scale_format="ue8m0"), ValueError,
     r"apply to dynamic quantization"),
    (dict(x=[1.0, 2.0]), TypeError, r"x must be a torch.Tensor"),
])
def test_quantize_bad_input(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fp8kern.quantize(**kwargs)


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(w=torch.ones(4, 8, 2)), ValueError, r"w has shape \(4, 8, 2\), expected 2-D"),
    (dict(w=torch.ones(4, 8).to(F8)), TypeError, r"w has dtype torch.float8_e4m3fn"),
    (dict(w=torch.ones(4, 8), granularity="token"), ValueError, r"granularity='token', expected 'channel'"),
    (dict(w=torch.ones(4, 8), granularity="block", block_size=(128,)), ValueError, r"block_size=\(128,\)"),
])
def test_quantize_weight_bad_input(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fp8kern.quantize_weight(**kwargs)


def test_backend_names():
    with pytest.raises(ValueError, match=r"backend='sm100', expected one of"):
        fp8kern.set_backend("sm100")
