"""On a GPU: torch's FP8 GEMM path and the dequantizing path against the float64 oracle, the path backend 'auto'
takes where no fp8kern family is verified, and both paths under CUDA graph capture. Skips without a GPU; CI runs it
on the fake CUDA device (tools/fake_cuda.py), where torch's CPU GEMMs stand in for the GPU's.

Tolerances. torch's FP8 GEMM runs on the tensor cores, whose FP8 accumulator is narrower than fp32; cuBLASLt does not
state how often it promotes partial sums, so its bound is the one derived for an accumulation that never promotes
(test_gpu_scaled_mm.bound with fast=True: 2^-13 per 32 of K). The dequantizing GEMM: dequant_bound
(tests/test_gemm_paths.py), which assumes the GEMM reduces in fp32: the tests switch off torch's permission for
cuBLAS to reduce 16-bit GEMMs in reduced precision (on by default; docs/layouts.md says so).
"""

import pytest
import torch

import fp8kern
from conftest import LAYOUTS, OUT_DTYPES, make_operands
from fp8kern.ops import gemm, torch_gemm
from test_gemm_paths import check, dequant_bound
from test_gpu_scaled_mm import bound


def tensor_core_bound(fast):
    return lambda D, S, K, out_dtype, bias=None: bound(D, S, K, out_dtype, fast)

# Any CUDA GPU (these paths need no compiled fp8kern kernel, so sm_80 runs them too).
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]

SHAPES = [(1, 16, 16), (3, 5, 7), (7, 130, 200), (33, 129, 257), (64, 4096, 4096), (300, 2112, 7168)]


@pytest.fixture
def backend():
    prev = fp8kern.get_backend()
    matmul = torch.backends.cuda.matmul
    reduced = matmul.allow_bf16_reduced_precision_reduction, matmul.allow_fp16_reduced_precision_reduction
    matmul.allow_bf16_reduced_precision_reduction = matmul.allow_fp16_reduced_precision_reduction = False
    yield fp8kern.set_backend
    matmul.allow_bf16_reduced_precision_reduction, matmul.allow_fp16_reduced_precision_reduction = reduced
    fp8kern.set_backend(prev)


def operands(M, N, K, layout, seed):
    a, b, sa, sb = make_operands(M, N, K, layout, torch.Generator().manual_seed(seed))
    return a, b, sa, sb, (a.cuda(), b.cuda(), sa.cuda(), sb.cuda())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_torch_path(backend, layout, M, N, K):
    dev = torch.device("cuda", torch.cuda.current_device())
    why = torch_gemm.unsupported_reason(dev, layout == "block", torch.float32, False, forced=True)
    if why:
        pytest.skip(why)
    backend("torch")
    a, b, sa, sb, on_gpu = operands(M, N, K, layout, M + N + K)
    check(fp8kern.scaled_mm(*on_gpu, out_dtype=torch.float32).cpu(), a, b, sa, sb, torch.float32,
          bound=tensor_core_bound(fast=True))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_dequant_path(backend, layout, M, N, K):
    backend("dequant")
    a, b, sa, sb, on_gpu = operands(M, N, K, layout, M * 3 + N + K)
    check(fp8kern.scaled_mm(*on_gpu, out_dtype=torch.float32).cpu(), a, b, sa, sb, torch.float32,
          bound=dequant_bound)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_default_path(backend, layout, out_dtype):
    """Whatever 'auto' takes on this GPU (a verified family, torch's FP8 GEMM or the dequantizing GEMM) meets that
    path's bound, with a bias and into a NaN-poisoned out view."""
    backend("auto")
    dev = torch.device("cuda", torch.cuda.current_device())
    path = gemm.gemm_path(dev, layout == "block", out_dtype, True)
    a, b, sa, sb, (ga, gb, gsa, gsb) = operands(37, 264, 520, layout, 9)
    sa, gsa = sa / 64, gsa / 64  # keep |D| below fp16's 65504
    bias = (torch.randn(264, generator=torch.Generator().manual_seed(1)) * 100).to(out_dtype)
    buf = torch.full((37, 272), float("nan"), dtype=out_dtype, device="cuda")
    fp8kern.scaled_mm(ga, gb, gsa, gsb, out_dtype=out_dtype, bias=bias.cuda(), out=buf[:, 4:268])
    check(buf[:, 4:268].cpu(), a, b, sa, sb, out_dtype, bias,
          bound=dequant_bound if path == "dequant" else tensor_core_bound(fast=path == "torch"))
    assert buf[:, :4].isnan().all() and buf[:, 268:].isnan().all()


@pytest.mark.parametrize("name", ["torch", "dequant"])
def test_paths_capture_in_cuda_graphs(backend, name):
    """A captured call replays with new operand values in the same buffers (no host read in either path)."""
    dev = torch.device("cuda", torch.cuda.current_device())
    if name == "torch" and torch_gemm.unsupported_reason(dev, False, torch.bfloat16, False, forced=True):
        pytest.skip(torch_gemm.unsupported_reason(dev, False, torch.bfloat16, False, forced=True))
    backend(name)
    _, _, _, _, (a, b, sa, sb) = operands(16, 256, 512, "token_channel", 3)
    fp8kern.scaled_mm(a, b, sa, sb)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fp8kern.scaled_mm(a, b, sa, sb)
    a2, b2, sa2, sb2 = operands(16, 256, 512, "token_channel", 4)[4]
    for t, new in ((a, a2), (b, b2), (sa, sa2), (sb, sb2)):
        t.copy_(new)
    graph.replay()
    assert torch.equal(y, fp8kern.scaled_mm(a, b, sa, sb))
