"""The GEMM paths besides fp8kern's own kernels, on the CPU, against the independent float64 oracle
(conftest.exact_scaled_mm):

- torch's FP8 GEMM (FP8KERN_BACKEND=torch): the CPU's torch._scaled_mm runs per-tensor and row-wise scaling, through
  the same glue a GPU uses (scale shapes, the per-tensor-with-per-row mix, bias, out views; the 16-alignment padding
  is GPU-only and checked here by calling the glue as a GPU would).
- the dequantizing GEMM (FP8KERN_BACKEND=dequant), every layout and scale dtype, one and several weight slices.
- the glue for torch's block-wise GEMM, against the scale layouts torch documents for it (it runs on sm_90 only).
- which path a simulated GPU takes (sm_80, 89, 90, 100, 120), and the fallback when torch refuses a problem.

Tolerances. torch's FP8 GEMM keeps the e4m3 operands exact and accumulates in fp32, so it meets
conftest.fp32_gemm_bound like the kernels. The dequantizing GEMM rounds each dequantized operand to the output dtype
(relative error eps = u + 2^-24: the float32 product x * scale, then the rounding to a dtype of unit roundoff u),
which moves each product by at most (2 eps + eps^2) |a b|; its GEMM then sums in fp32 (gamma_K S, S = sum |a b|),
rounds once to the output dtype (u |D|), and a bias may be added after a rounding of the product (u S more).
"""

import numpy as np
import pytest
import torch

import fp8kern
from conftest import (LAYOUTS, OUT_DTYPES, SHAPES, UNIT_ROUNDOFF, exact_scaled_mm, fp32_gemm_bound,
                      make_operands)
from fp8kern import _backend
from fp8kern.ops import dequant_gemm, gemm, torch_gemm
from fp8kern.ops.layout import _BLOCK_LAYOUT

PLAIN = [name for name in LAYOUTS if name != "block"]


@pytest.fixture
def backend():
    prev = fp8kern.get_backend()
    yield fp8kern.set_backend
    fp8kern.set_backend(prev)


def dequant_bound(D, S, K, out_dtype, bias=None):
    u, u32 = UNIT_ROUNDOFF[out_dtype], 2.0**-24
    eps = u + u32 if out_dtype is not torch.float32 else u32
    gamma = (K + 3) * u32 / (1 - (K + 3) * u32)
    err = (2 * eps + eps * eps) * S + gamma * (1 + eps) ** 2 * S + (u * S if bias is not None else 0)
    tiny = 2.0**-24 if out_dtype == torch.float16 else 2.0**-133
    return err * (1 + u) + u * np.abs(D) + tiny


def check(result, a, b, sa, sb, out_dtype, bias=None, bound=fp32_gemm_bound):
    D, S = exact_scaled_mm(a, b, sa, sb, bias)
    err = np.abs(result.double().numpy() - D)
    lim = bound(D, S, a.shape[1], out_dtype, bias)
    worst = np.unravel_index(np.argmax(err - lim), err.shape)
    assert (err <= lim).all(), f"error {err[worst]} > bound {lim[worst]} at {worst} (value {D[worst]})"


def counting(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


# ---------------------------------------------------------------------------------------------------------------
# torch's FP8 GEMM


@pytest.mark.parametrize("path,layout", [("torch", name) for name in PLAIN] + [("dequant", name) for name in LAYOUTS])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_every_layout_and_shape(backend, monkeypatch, path, layout, M, N, K):
    """torch's FP8 GEMM on every layout it runs on the CPU, the dequantizing GEMM on every layout, each call made
    by the path named (counted)."""
    backend(path)
    calls = counting(monkeypatch, *((torch, "_scaled_mm") if path == "torch" else (dequant_gemm, "run")))
    a, b, sa, sb = make_operands(M, N, K, layout, torch.Generator().manual_seed(M * 7 + N * 3 + K))
    check(fp8kern.scaled_mm(a, b, sa, sb, out_dtype=torch.float32), a, b, sa, sb, torch.float32,
          bound=dequant_bound if path == "dequant" else fp32_gemm_bound)
    assert calls == [1]


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("layout", ["tensor", "token_channel", "token_tensor"])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_torch_path_out_dtypes_bias_and_out_views(backend, M, N, K, layout, out_dtype):
    backend("torch")
    gen = torch.Generator().manual_seed(12 + M + N + K)
    a, b, sa, sb = make_operands(M, N, K, layout, gen)
    sa = sa / 64  # keep |D| below fp16's 65504
    bias = (torch.randn(N, generator=gen) * 1000).to(out_dtype)
    check(fp8kern.scaled_mm(a, b, sa, sb, out_dtype=out_dtype, bias=bias), a, b, sa, sb, out_dtype, bias)
    buf = torch.full((M, N + 10), float("nan"), dtype=out_dtype)
    y = fp8kern.scaled_mm(a, b, sa, sb, out_dtype=out_dtype, out=buf[:, 3:N + 3])
    assert y.data_ptr() == buf[:, 3:N + 3].data_ptr()
    check(buf[:, 3:N + 3], a, b, sa, sb, out_dtype)
    assert buf[:, :3].isnan().all() and buf[:, N + 3:].isnan().all()


@pytest.mark.parametrize("layout", PLAIN)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_torch_path_gpu_padding(monkeypatch, layout, out_dtype):
    """On a GPU the glue pads K and N to multiples of 16 for cuBLASLt and drops the padded outputs; the CPU's
    torch._scaled_mm runs the padded problem as the GPU's would (its operands are checked to be padded)."""
    seen = []
    real = torch._scaled_mm

    def scaled_mm_16(a, b, sa, sb, **kw):
        seen.append((a.shape, b.shape, sa.shape, sb.shape))
        assert a.shape[1] % 16 == 0 and b.shape[1] % 16 == 0 and b.stride() == (1, a.shape[1])
        return real(a, b, sa, sb, **kw)

    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm_16)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    gen = torch.Generator().manual_seed(13)
    a, b, sa, sb = make_operands(5, 130, 200, layout, gen)
    bias = torch.randn(130, generator=gen).to(out_dtype)
    y = torch_gemm.run(a, b, sa, sb, out_dtype, bias, fp8kern.infer_layout(a, b, sa, sb), False, None)
    monkeypatch.undo()
    assert seen and seen[0][0] == (5, 208) and seen[0][1] == (208, 144)
    check(y, a, b, sa, sb, out_dtype, bias)


def test_torch_path_refuses_what_torch_cannot_run(backend):
    backend("torch")
    a, b, sa, sb = make_operands(4, 256, 256, "block", torch.Generator().manual_seed(1))
    with pytest.raises(NotImplementedError, match="FP8KERN_BACKEND=torch: torch's CPU FP8 GEMM has no block-wise"):
        fp8kern.scaled_mm(a, b, sa, sb)


def test_torch_refusal_falls_back_to_the_dequantizing_path(backend, monkeypatch):
    """When torch raises for a problem the rule said it runs, the call is answered by the dequantizing path, a
    warning says so once, and the same kind of problem goes there directly afterwards. Under FP8KERN_BACKEND=torch
    the refusal is an error instead."""
    def refuse(*a, **k):
        raise RuntimeError("Rowwise scaling is not currently supported on your device")

    backend("auto")
    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    monkeypatch.setattr(gemm, "gemm_path", lambda *a: "torch")
    monkeypatch.setattr(torch_gemm, "_reasons", {})
    monkeypatch.setitem(_backend._state, "warned", set())
    a, b, sa, sb = make_operands(6, 40, 64, "token_channel", torch.Generator().manual_seed(2))
    with pytest.warns(RuntimeWarning, match="torch's FP8 GEMM torch refused it .*not currently supported"):
        y = fp8kern.scaled_mm(a, b, sa, sb, out_dtype=torch.float32)
    check(y, a, b, sa, sb, torch.float32, bound=dequant_bound)
    assert "torch refused it" in torch_gemm.unsupported_reason(a.device, False, torch.float32, False)
    backend("torch")
    with pytest.raises(RuntimeError, match="FP8KERN_BACKEND=torch: torch's FP8 GEMM refused this problem"):
        fp8kern.scaled_mm(a, b, sa, sb, out_dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# The dequantizing GEMM


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("layout", ["token_channel", "block"])
def test_dequant_path_out_dtypes_bias_and_slices(backend, monkeypatch, layout, out_dtype):
    """Several weight and activation slices (CHUNK_BYTES shrunk to 128 rows), a bias, and an out view."""
    backend("dequant")
    monkeypatch.setattr(dequant_gemm, "CHUNK_BYTES", 1)
    gen = torch.Generator().manual_seed(14)
    a, b, sa, sb = make_operands(300, 390, 260, layout, gen)
    sa = sa / 64
    bias = (torch.randn(390, generator=gen) * 1000).to(out_dtype)
    check(fp8kern.scaled_mm(a, b, sa, sb, out_dtype=out_dtype, bias=bias), a, b, sa, sb, out_dtype, bias,
          bound=dequant_bound)
    buf = torch.full((300, 400), float("nan"), dtype=out_dtype)
    fp8kern.scaled_mm(a, b, sa, sb, out_dtype=out_dtype, out=buf[:, 5:395])
    check(buf[:, 5:395], a, b, sa, sb, out_dtype, bound=dequant_bound)
    assert buf[:, :5].isnan().all() and buf[:, 395:].isnan().all()


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16, torch.float8_e8m0fnu])
def test_dequant_path_block_scale_dtypes(backend, scale_dtype):
    backend("dequant")
    a, b, sa, sb = make_operands(9, 260, 520, "block", torch.Generator().manual_seed(5), scale_dtype)
    check(fp8kern.scaled_mm(a, b, sa, sb, out_dtype=torch.float32), a, b, sa, sb, torch.float32,
          bound=dequant_bound)


def test_dequant_bound_catches_a_wrong_block_scale(backend):
    """The bound has teeth: one 128x128 block scale doubled is detected."""
    backend("dequant")
    a, b, sa, sb = make_operands(8, 256, 384, "block", torch.Generator().manual_seed(8))
    wrong = sb.clone()
    wrong[1, 2] *= 2
    with pytest.raises(AssertionError):
        check(fp8kern.scaled_mm(a, b, sa, wrong, out_dtype=torch.bfloat16), a, b, sa, sb, torch.bfloat16,
              bound=dequant_bound)


# ---------------------------------------------------------------------------------------------------------------
# torch's block-wise GEMM: fp8kern's arguments against the contract torch documents


def documented_blockwise(a_p, b_t, sa, sb):
    """float64 value of torch's block-wise GEMM as documented: a [M, K], b_t [K, N] (a column-major view), scale_a
    [M, K/128] (1x128: row m, K block k), scale_b [L4, N/128] (128x128: K block k, N block n), K a multiple of 128."""
    M, K = a_p.shape
    N = b_t.shape[1]
    assert K % 128 == 0 and b_t.shape[0] == K
    ks = np.arange(K) // 128
    A = a_p.float().double().numpy() * sa.double().numpy()[:, ks]
    B = b_t.float().double().numpy() * sb.double().numpy()[ks][:, np.arange(N) // 128]
    return A @ B


@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (5, 136, 200), (37, 300, 520), (128, 256, 512), (16, 128, 1280)])
def test_blockwise_args_meet_torchs_contract(M, N, K):
    a, b, sa, sb = make_operands(M, N, K, "block", torch.Generator().manual_seed(M + N + K))
    a_p, b_p, sa_t, sb_t = torch_gemm.blockwise_args(a, b, sa, sb)
    kb, nb = -(-K // 128), -(-N // 128)
    Mp, Np, L4 = -(-M // 16) * 16, -(-N // 16) * 16, -(-kb // 4) * 4
    assert a_p.shape == (Mp, kb * 128) and b_p.shape == (Np, kb * 128) and a_p.is_contiguous() and b_p.is_contiguous()
    assert sa_t.dtype == sb_t.dtype == torch.float32
    # outer-dim-major (torch accepts any stride for a dimension of size 1, as it lays out the same bytes)
    assert sa_t.shape == (Mp, kb) and sa_t.stride(0) == 1 and (kb == 1 or sa_t.stride(1) == Mp)
    assert sb_t.shape == (L4, nb) and sb_t.stride() == (1, L4)
    assert not a_p[M:].float().any() and not a_p[:, K:].float().any() and not b_p[N:].float().any()
    D, S = exact_scaled_mm(a, b, sa, sb)
    got = documented_blockwise(a_p, b_p.t(), sa_t, sb_t)[:M, :N]
    assert (np.abs(got - D) <= 1e-12 * S + 1e-300).all()


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_blockwise_glue_end_to_end(monkeypatch, out_dtype, with_bias):
    """torch_gemm.run on a block-scaled problem, with torch.nn.functional.scaled_mm replaced by an emulation of its
    documented contract (which checks the recipes and layouts it is given, then computes in fp32)."""
    scaling = torch.nn.functional.ScalingType

    def emulated(mat_a, mat_b, scale_a, recipe_a, scale_b, recipe_b, output_dtype=torch.bfloat16, **kw):
        assert recipe_a == scaling.BlockWise1x128 and recipe_b == scaling.BlockWise128x128 and not kw
        assert mat_a.dtype == mat_b.dtype == torch.float8_e4m3fn and mat_b.t().is_contiguous()
        assert scale_a.stride(0) == 1 and scale_b.stride(0) == 1
        return torch.from_numpy(documented_blockwise(mat_a, mat_b, scale_a, scale_b)).float().to(output_dtype)

    monkeypatch.setattr(torch_gemm, "_F_SCALED_MM", emulated)
    gen = torch.Generator().manual_seed(21)
    a, b, sa, sb = make_operands(7, 200, 300, "block", gen, torch.float8_e8m0fnu)
    sa = (sa.float() / 64).to(torch.float8_e8m0fnu)  # exact: a power of two
    bias = (torch.randn(200, generator=gen) * 100).to(out_dtype) if with_bias else None
    y = torch_gemm.run(a, b, sa, sb, out_dtype, bias, _BLOCK_LAYOUT, False, None)
    assert y.shape == (7, 200) and y.dtype == out_dtype and y.is_contiguous()
    check(y, a, b, sa, sb, out_dtype, bias)


# ---------------------------------------------------------------------------------------------------------------
# Which path a GPU takes


# arch -> expected path of (per-tensor, per-token x per-channel, block-scaled) under 'auto' with no verified family
EXPECTED = {80: ("dequant", "dequant", "dequant"), 86: ("dequant", "dequant", "dequant"),
            89: ("torch", "torch", "dequant"), 90: ("torch", "torch", "dequant"),
            100: ("torch", "torch", "dequant"), 120: ("torch", "torch", "dequant")}


@pytest.fixture
def simulated_gpu(monkeypatch, backend):
    def make(arch, cuda="13.0", verified=()):
        monkeypatch.setattr(_backend, "device_arch", lambda device: arch)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"simulated sm_{arch}")
        monkeypatch.setattr(torch.version, "cuda", cuda)
        monkeypatch.setattr(torch.version, "hip", None)
        monkeypatch.setattr(_backend, "VERIFIED_FAMILIES", frozenset(verified))
        monkeypatch.setattr(torch_gemm, "_reasons", {})
        return torch.device("cuda", 0)
    return make


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_auto_path_by_arch(simulated_gpu, backend, arch):
    dev = simulated_gpu(arch)
    backend("auto")
    got = tuple(gemm.gemm_path(dev, block, torch.bfloat16, False) for block in (False, False, True))
    assert got == EXPECTED[arch]
    paths = gemm.describe_paths(dev)
    assert paths["token_channel"] == ("torch._scaled_mm" if arch >= 89 else
                                      f"dequantize + GEMM (sm_{arch} has no FP8 tensor cores (torch's FP8 GEMM "
                                      "needs sm_89 or newer))")
    why = {90: "have not been run on a GPU yet"}.get(arch, "runs on sm_90 only" if arch >= 89 else "no FP8 tensor")
    assert why in paths["block"]


def test_verified_family_first_then_torch_then_dequant(simulated_gpu, backend, monkeypatch):
    backend("auto")
    dev = simulated_gpu(90, verified={"sm90"})
    if "sm90" in _backend.compiled_families():
        assert [gemm.gemm_path(dev, block, torch.bfloat16, False) for block in (False, True)] == ["sm90", "sm90"]
    dev = simulated_gpu(90, cuda="12.4")
    assert "needs torch >= 2.9 built with CUDA >= 12.9" in torch_gemm.unsupported_reason(dev, True, torch.bfloat16,
                                                                                         False, forced=True)
    dev = simulated_gpu(90)
    monkeypatch.setattr(torch_gemm, "BLOCKWISE_GLUE_VERIFIED", True)
    assert gemm.gemm_path(dev, True, torch.bfloat16, False) == "torch"
    dev = simulated_gpu(89, verified={"sm89"})
    if "sm89" in _backend.compiled_families():
        assert gemm.gemm_path(dev, False, torch.float16, True) == "sm89"


def test_named_backends_on_simulated_gpus(simulated_gpu, backend):
    dev = simulated_gpu(80)
    backend("torch")
    with pytest.raises(NotImplementedError, match=r"FP8KERN_BACKEND=torch: sm_80 has no FP8 tensor cores"):
        gemm.gemm_path(dev, False, torch.bfloat16, False)
    backend("dequant")
    assert gemm.gemm_path(dev, True, torch.bfloat16, False) == "dequant"
    backend("reference")
    assert gemm.gemm_path(dev, True, torch.bfloat16, False) is None
    if "sm90" in _backend.compiled_families():
        dev = simulated_gpu(89)
        backend("sm90")
        with pytest.raises(NotImplementedError, match=r"FP8KERN_BACKEND=sm90: .*simulated sm_89 \(sm_89\).*needs sm_90"):
            gemm.gemm_path(dev, False, torch.bfloat16, False)
    dev = simulated_gpu(90)
    backend("torch")
    _backend._state["warned"].discard("torch-blockwise-unverified")
    with pytest.warns(RuntimeWarning, match="block-wise FP8 GEMM have not been run on a GPU"):
        assert gemm.gemm_path(dev, True, torch.bfloat16, False) == "torch"


def test_dequant_warning_names_the_gpu_and_the_cost(simulated_gpu, backend, monkeypatch):
    dev = simulated_gpu(80)
    backend("auto")
    monkeypatch.setitem(_backend._state, "warned", set())
    with pytest.warns(RuntimeWarning, match=r"simulated sm_80 \(sm_80\) runs block-scaled FP8 GEMMs by dequantizing"
                                            r".*no FP8 tensor cores.*bf16 GEMM speed"):
        gemm._warn_dequant_once(dev, True, torch.bfloat16, False)


@pytest.mark.parametrize("name,layout", [("torch", "token_channel"), ("torch", "tensor"), ("dequant", "block"),
                                         ("dequant", "token_channel")])
def test_paths_under_torch_compile(backend, name, layout):
    """The registered op passes opcheck on each path, and a compiled call gives the eager result."""
    from test_compile import CHECKS

    backend(name)
    a, b, sa, sb = make_operands(5, 130, 200, layout, torch.Generator().manual_seed(1))
    sa, sb = sa.reshape(sa.shape or (1,)), sb.reshape(sb.shape or (1,))
    torch.library.opcheck(torch.ops.fp8kern.scaled_mm, (a, b, sa, sb, torch.bfloat16, None, False), test_utils=CHECKS)
    out = torch.empty(5, 130, dtype=torch.float16)
    torch.library.opcheck(torch.ops.fp8kern.scaled_mm_out, (a, b, sa, sb, torch.float16, None, False, out),
                          test_utils=CHECKS)
    torch._dynamo.reset()
    f = torch.compile(lambda *t: fp8kern.scaled_mm(*t, out_dtype=torch.float32), fullgraph=True)
    assert torch.equal(f(a, b, sa, sb), fp8kern.scaled_mm(a, b, sa, sb, out_dtype=torch.float32))
    torch._dynamo.reset()
