"""torch.library registration: the ops pass opcheck and trace under torch.compile with the same results as eager."""

import pytest
import torch

import fp8kern
from conftest import compile_recording, host_reads, make_operands

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
    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))  # inductor
    torch._dynamo.reset()
    compiled, graphs = compile_recording(f)
    assert torch.equal(compiled(x), f(x))
    torch._dynamo.reset()
    assert len(graphs) == 1 and "fp8kern.scaled_mm.default" in graphs[0] and not host_reads(graphs[0]), graphs


@pytest.mark.parametrize("block", [True, False])
def test_opcheck_grouped_mm(monkeypatch, block):
    """The grouped GEMM op (its kernel stood in for by the per-group GEMMs, as off Hopper)."""
    monkeypatch.setattr(fp8kern.ops.grouped, "_grouped_mm_impl", fp8kern.ops.grouped._grouped_mm_per_group)
    gen = torch.Generator().manual_seed(4)
    a, sa = fp8kern.quantize(torch.randn(9, 256, generator=gen), "group" if block else "token")
    b, sb = zip(*(fp8kern.quantize_weight(torch.randn(136, 256, generator=gen), "block" if block else "channel")
                  for _ in range(3)))
    b, sb = torch.stack(b), torch.stack(sb)
    out = torch.zeros(9, 136)
    offsets = torch.tensor([0, 4, 4, 8])
    torch.library.opcheck(torch.ops.fp8kern.grouped_mm_out, (a, sa, b, sb, offsets, out, block), test_utils=CHECKS)


def test_compiled_out_variant():
    gen = torch.Generator().manual_seed(3)
    a, b, sa, sb = make_operands(4, 40, 64, "token_channel", gen)
    out = torch.empty(4, 40)

    def f(a, b, sa, sb, out):
        return fp8kern.scaled_mm(a, b, sa, sb, out_dtype=torch.float32, out=out)

    torch.compile(f, fullgraph=True)(a, b, sa, sb, out)
    assert torch.equal(out, fp8kern.scaled_mm(a, b, sa, sb, out_dtype=torch.float32))
