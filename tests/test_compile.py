"""torch.library registration: the ops pass opcheck and trace under torch.compile with the same results as eager."""

import pytest
import torch

import fp8kern
from conftest import make_operands

# test_schema is left out: its checker multiplies the outputs, which torch does not implement for fp8 on the CPU.
CHECKS = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("layout", ["token_channel", "block", "tensor"])
def test_opcheck_scaled_mm(layout):
    gen = torch.Generator().manual_seed(1)
    a, b, sa, sb = make_operands(5, 130, 200, layout, gen)
    sa, sb = sa.reshape(sa.shape or (1,)), sb.reshape(sb.shape or (1,))
    torch.library.opcheck(torch.ops.fp8kern.scaled_mm, (a, b, sa, sb, torch.bfloat16, None, False), test_utils=CHECKS)
    torch.library.opcheck(torch.ops.fp8kern.scaled_mm, (a, b, sa, sb, torch.float32, torch.ones(130), True), test_utils=CHECKS)
    out = torch.empty(5, 130, dtype=torch.float16)
    torch.library.opcheck(torch.ops.fp8kern.scaled_mm_out, (a, b, sa, sb, torch.float16, None, False, out), test_utils=CHECKS)


@pytest.mark.parametrize("granularity", ["token", "tensor", "group"])
def test_opcheck_quantize(granularity):
    x = torch.randn(6, 300)
    torch.library.opcheck(torch.ops.fp8kern.quantize, (x, granularity, 128, None, None, "fp32"), test_utils=CHECKS)
    torch.library.opcheck(torch.ops.fp8kern.quantize, (x, granularity, 128, None, None, "ue8m0"), test_utils=CHECKS)


def test_compiled_linear_matches_eager():
    gen = torch.Generator().manual_seed(2)
    w_q, w_s = fp8kern.quantize_weight(torch.randn(96, 256, generator=gen))
    bias = torch.randn(96, generator=gen)

    def f(x):
        x_q, x_s = fp8kern.quantize(x.reshape(-1, x.shape[-1]))
        return fp8kern.scaled_mm(x_q, w_q, x_s, w_s, out_dtype=torch.float32, bias=bias)

    x = torch.randn(2, 7, 256, generator=gen)
    compiled = torch.compile(f, fullgraph=True)
    assert torch.equal(compiled(x), f(x))


def test_compiled_out_variant():
    gen = torch.Generator().manual_seed(3)
    a, b, sa, sb = make_operands(4, 40, 64, "token_channel", gen)
    out = torch.empty(4, 40)

    def f(a, b, sa, sb, out):
        return fp8kern.scaled_mm(a, b, sa, sb, out_dtype=torch.float32, out=out)

    torch.compile(f, fullgraph=True)(a, b, sa, sb, out)
    assert torch.equal(out, fp8kern.scaled_mm(a, b, sa, sb, out_dtype=torch.float32))
