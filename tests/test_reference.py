"""fp8kern.reference.scaled_mm (the oracle of every kernel) against an independent float64 computation.

Tolerance: conftest.fp32_gemm_bound, a worst-case rounding bound per element (dequantization, fp32 summation of K
products, bias add, conversion to out_dtype). Scales vary over 2^-6..2^2 per row / block, so a scale applied to the
wrong row, column or block moves results by far more than this bound (test_bound_catches_one_wrong_block_scale).
"""

import numpy as np
import pytest
import torch

import fp8kern
from conftest import LAYOUTS, MODEL_NK, OUT_DTYPES, SHAPES, exact_scaled_mm, fp32_gemm_bound, make_operands


def check(a, b, sa, sb, out_dtype, bias=None, result=None):
    if result is None:
        result = fp8kern.scaled_mm(a, b, sa, sb, out_dtype=out_dtype, bias=bias)
    D, S = exact_scaled_mm(a, b, sa, sb, bias)
    err = np.abs(result.double().numpy() - D)
    bound = fp32_gemm_bound(D, S, a.shape[1], out_dtype, bias)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), f"error {err[worst]} > bound {bound[worst]} at {worst} (value {D[worst]})"
    return err, bound


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_every_layout_and_shape(layout, M, N, K):
    gen = torch.Generator().manual_seed(M * 7919 + N * 31 + K)
    a, b, sa, sb = make_operands(M, N, K, layout, gen)
    assert fp8kern.infer_layout(a, b, sa, sb).name in (layout.split("_")[0] if layout == "tensor" else layout,
                                                      "token_channel", "tensor", "block")
    check(a, b, sa, sb, torch.float32)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("layout", ["token_channel", "block"])
def test_out_dtypes_and_bias(out_dtype, layout):
    gen = torch.Generator().manual_seed(11)
    a, b, sa, sb = make_operands(37, 150, 300, layout, gen)
    sa = sa / 64  # keep |D| below fp16's 65504 (overflow to inf is fp16's own behaviour, not under test here)
    bias = (torch.randn(150, generator=gen) * 1000).to(out_dtype)
    check(a, b, sa, sb, out_dtype, bias=bias)
    check(a, b, sa, sb, out_dtype)


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16, torch.float8_e8m0fnu])
def test_block_scale_dtypes(scale_dtype):
    gen = torch.Generator().manual_seed(5)
    a, b, sa, sb = make_operands(9, 260, 520, "block", gen, scale_dtype)
    assert sa.dtype == scale_dtype
    check(a, b, sa, sb, torch.float32)


def test_block_scales_column_major():
    """A-scales stored column-major (stride (1, M)), as TMA-based kernels want them, mean the same numbers."""
    gen = torch.Generator().manual_seed(6)
    a, b, sa, sb = make_operands(20, 256, 640, "block", gen)
    sa_cm = sa.t().contiguous().t()
    assert sa_cm.stride() == (1, 20)
    check(a, b, sa_cm, sb, torch.float32)


@pytest.mark.parametrize("N,K", MODEL_NK)
def test_model_shapes(N, K):
    gen = torch.Generator().manual_seed(N + K)
    for layout in ("token_channel", "block"):
        a, b, sa, sb = make_operands(3, N, K, layout, gen)
        check(a, b, sa, sb, torch.bfloat16)


def test_bound_catches_one_wrong_block_scale():
    """The tolerance has teeth: doubling one 128x128 block scale of b must be detected."""
    gen = torch.Generator().manual_seed(8)
    a, b, sa, sb = make_operands(8, 256, 384, "block", gen)
    wrong = sb.clone()
    wrong[1, 2] *= 2
    result = fp8kern.scaled_mm(a, b, sa, wrong, out_dtype=torch.float32)
    with pytest.raises(AssertionError):
        check(a, b, sa, sb, torch.float32, result=result)


def test_out_argument_with_row_stride():
    gen = torch.Generator().manual_seed(9)
    a, b, sa, sb = make_operands(6, 40, 64, "token_channel", gen)
    big = torch.full((6, 50), float("nan"), dtype=torch.bfloat16)
    out = big[:, 5:45]
    r = fp8kern.scaled_mm(a, b, sa, sb, out=out)
    assert r is out
    check(a, b, sa, sb, torch.bfloat16, result=out)
    assert torch.isnan(big[:, :5]).all() and torch.isnan(big[:, 45:]).all(), "wrote outside the out view"


def test_python_float_scale():
    gen = torch.Generator().manual_seed(10)
    a, b, _, sb = make_operands(4, 32, 48, "tensor", gen)
    check(a, b, torch.tensor(0.25), sb, torch.float32, result=fp8kern.scaled_mm(a, b, 0.25, sb, out_dtype=torch.float32))


def test_empty_m_returns_empty_without_compute():
    a = torch.empty(0, 64, dtype=torch.float8_e4m3fn)
    b = torch.zeros(32, 64, dtype=torch.float8_e4m3fn)
    r = fp8kern.scaled_mm(a, b, torch.ones(0), torch.ones(32))
    assert r.shape == (0, 32) and r.dtype == torch.bfloat16


def test_dequantize_matches_expand():
    gen = torch.Generator().manual_seed(12)
    w = torch.randn(300, 200, generator=gen)
    q, s = fp8kern.quantize_weight(w, "block")
    d = fp8kern.reference.dequantize(q, s, block_size=(128, 128))
    rows, cols = np.arange(300)[:, None] // 128, np.arange(200)[None, :] // 128
    expected = q.float().numpy() * s.numpy()[rows, cols]
    assert np.array_equal(d.numpy(), expected)
    with pytest.raises(ValueError, match="block_size"):
        fp8kern.reference.dequantize(q, s)


def test_reference_stands_alone():
    """The oracle imports nothing of fp8kern but its constants: it must not depend on the code it judges."""
    import ast

    tree = ast.parse(open(fp8kern.reference.__file__, encoding="utf-8").read())
    imported = {(n.level, n.module) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {(0, a.name) for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    ours = {(level, mod) for level, mod in imported if level > 0 or (mod or "").startswith("fp8kern")}
    assert ours == {(1, "_constants")}, ours


def test_reference_reads_the_layout_from_scale_shapes():
    """Without a layout the oracle reads each scale's block from its shape, as infer_layout does, and refuses a
    shape that fits none (here a 1x128-group scale given for b, whose blocks are 128x128)."""
    gen = torch.Generator().manual_seed(3)
    for layout in LAYOUTS:
        a, b, sa, sb = make_operands(5, 136, 200, layout, gen)
        assert torch.equal(fp8kern.reference.scaled_mm(a, b, sa, sb, torch.float32),
                           fp8kern.reference.scaled_mm(a, b, sa, sb, torch.float32,
                                                       layout=fp8kern.infer_layout(a, b, sa, sb)))
    a, b, sa, _ = make_operands(5, 136, 200, "block", gen)
    with pytest.raises(ValueError, match=r"scale_b of shape \(136, 2\) fits no layout for b"):
        fp8kern.reference.scaled_mm(a, b, sa, torch.ones(136, 2), torch.float32)
