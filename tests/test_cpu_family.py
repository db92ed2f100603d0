"""The compiled CPU family (fp8kern._cpu, csrc/cpu/), the default path of CPU tensors: every instruction set this CPU
runs (forced with fp8kern._backend.set_cpu_isa, as FP8KERN_CPU_ISA does), at 1 and 2 threads, against the float64
oracle (conftest.exact_scaled_mm).

Bound: conftest.fp32_gemm_bound, gamma_{K+3} S + u_out |D| (+ 2^-24 |D| with a bias). It covers this family: every
e4m3 value converts exactly and every product of two is exact in fp32, so the only roundings are the fp32 additions,
at most K - 1 on any product's path in whatever order an instruction set sums (adding the zero padding past K is
exact), plus two for the scales (the scale product sa * sb and its multiply, or with block scales the product and
the fused multiply-add per 128 of K), plus the bias addition and the rounding to the output dtype.
Results must also be bit-identical at 1 and 2 threads (threads split N, never K).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fp8kern
from fp8kern import _backend
from conftest import exact_scaled_mm, fp32_gemm_bound, make_operands

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(_backend._cpu is None, reason=f"fp8kern._cpu is not built: {_backend._CPU_ERROR}")
ISAS = [i for i in ("amx", "avx512", "avx2", "generic") if _backend._cpu is not None and _backend._cpu.isa_supported(i)]


@pytest.fixture(params=ISAS)
def isa(request):
    prev = _backend.cpu_isa()
    _backend.set_cpu_isa(request.param)
    yield request.param
    _backend.set_cpu_isa(prev)


@pytest.fixture
def threads():
    prev = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(prev)


def test_auto_takes_the_cpu_family():
    assert fp8kern.get_backend() == "auto"
    paths = fp8kern.info()["gemm_paths"]
    assert all(p.startswith(f"cpu ({_backend.cpu_isa()}") for p in paths.values()), paths


def run_both_thread_counts(threads, *args, **kw):
    ys = []
    for n in (1, 2):
        threads(n)
        ys.append(fp8kern.scaled_mm(*args, **kw))
    assert torch.equal(ys[0].view(torch.uint8), ys[1].view(torch.uint8)), "results differ between 1 and 2 threads"
    return ys[0]


@pytest.mark.parametrize("layout", ["tensor", "token_channel", "tensor_channel", "block"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
# (40, 136, 8300): the AMX kernel's wide path with K in three slices (4096, 4096, 108), and a second 128-row task of
# 8 rows.
@pytest.mark.parametrize("M,N,K", [(1, 300, 1000), (3, 129, 130), (17, 260, 256), (129, 33, 70), (40, 136, 8300)])
def test_layouts_shapes_dtypes(isa, threads, layout, out_dtype, M, N, K):
    gen = torch.Generator().manual_seed(M * 1000 + N + K)
    a, b, sa, sb = make_operands(M, N, K, layout, gen)
    if out_dtype == torch.float16:
        sa = sa / 256  # keep |D| inside fp16's range
    bias = (torch.randn(N, generator=gen) * 10).to(out_dtype) if M % 2 else None
    y = run_both_thread_counts(threads, a, b, sa, sb, out_dtype=out_dtype, bias=bias)
    D, S = exact_scaled_mm(a, b, sa, sb, bias)
    err = np.abs(y.double().numpy() - D)
    lim = fp32_gemm_bound(D, S, K, out_dtype, bias)
    assert (err <= lim).all(), f"{isa}: worst {float((err - lim).max())} over the bound"


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e8m0fnu])
def test_block_scale_dtypes_and_out_view(isa, threads, scale_dtype):
    """Every block-scale dtype, a bias, and an `out` view with a row stride (its padding untouched)."""
    gen = torch.Generator().manual_seed(7)
    M, N, K = 5, 200, 330
    a, b, sa, sb = make_operands(M, N, K, "block", gen, scale_dtype)
    bias = torch.randn(N, generator=gen).to(torch.bfloat16)
    buf = torch.full((M, N + 8), float("nan"), dtype=torch.bfloat16)
    threads(2)
    fp8kern.scaled_mm(a, b, sa, sb, out_dtype=torch.bfloat16, bias=bias, out=buf[:, 4:N + 4])
    D, S = exact_scaled_mm(a, b, sa, sb, bias)
    err = np.abs(buf[:, 4:N + 4].double().numpy() - D)
    assert (err <= fp32_gemm_bound(D, S, K, torch.bfloat16, bias)).all()
    assert buf[:, :4].isnan().all() and buf[:, N + 4:].isnan().all()


def test_all_256_codes(isa):
    """Each e4m3 code times 1.0, in fp32: the value itself; NaN codes stay NaN. (-0 comes out +0: fp32 sums start
    at +0, as in any GEMM.)"""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(256, 1)
    one = torch.ones(1, 1, dtype=torch.float8_e4m3fn)
    y = fp8kern.scaled_mm(codes, one, torch.tensor(1.0), torch.tensor(1.0), out_dtype=torch.float32).reshape(-1)
    want = codes.reshape(-1).float()
    nan = want.isnan()
    assert torch.equal(y.isnan(), nan)
    assert torch.equal(y[~nan], want[~nan])


def test_grouped_with_empty_experts(isa):
    """The grouped GEMM on the CPU runs the family per non-empty expert; empty experts write nothing."""
    gen = torch.Generator().manual_seed(3)
    G, N, K = 4, 256, 384
    offsets = torch.tensor([0, 3, 3, 10, 10])
    a, _, sa, _ = make_operands(10, N, K, "block", gen)
    b = torch.stack([make_operands(1, N, K, "block", gen)[1] for _ in range(G)])
    sb = torch.exp2(torch.rand(G, math.ceil(N / 128), math.ceil(K / 128), generator=gen) * 4 - 2)
    out = torch.full((10, N), float("nan"), dtype=torch.bfloat16)
    fp8kern.grouped_block_mm(a, sa, b, sb, offsets, out)
    for g in range(G):
        r0, r1 = int(offsets[g]), int(offsets[g + 1])
        if r0 == r1:
            continue
        D, S = exact_scaled_mm(a[r0:r1], b[g], sa[r0:r1], sb[g])
        err = np.abs(out[r0:r1].double().numpy() - D)
        assert (err <= fp32_gemm_bound(D, S, K, torch.bfloat16)).all(), f"expert {g}"


def test_linear_layers_run_on_it():
    """Fp8Linear (per-token and block) takes the family with no change for the user, within the family's bound of the
    float64 product of the layer's own quantized operands (A: the input as the layer quantizes it, B: its weight):
    conftest.fp32_gemm_bound (module docstring), bf16 output, with the bias."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 320, dtype=torch.bfloat16)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    for scheme, gran, blocks in (("dynamic_per_token", "token", None), ("block128", "group", ((1, 128), (128, 128)))):
        layer = fp8kern.Fp8Linear.from_linear(lin, scheme)
        assert fp8kern.ops.gemm.gemm_path(torch.device("cpu"), scheme == "block128", torch.bfloat16, True) == "cpu"
        with torch.no_grad():
            y = layer(x)
        q, s = fp8kern.quantize(x, gran)
        A = fp8kern.reference.dequantize(q, s, blocks[0] if blocks else None).double()
        B = fp8kern.reference.dequantize(layer.weight, layer.weight_scale, blocks[1] if blocks else None).double()
        bias = layer.bias.double()
        D, S = (A @ B.T + bias).numpy(), (A.abs() @ B.abs().T).numpy()
        err = np.abs(y.double().numpy() - D)
        assert (err <= fp32_gemm_bound(D, S, 256, torch.bfloat16, bias)).all(), scheme


def test_forcing_an_isa():
    with pytest.raises(ValueError, match="unknown CPU instruction set 'sse9'"):
        _backend.set_cpu_isa("sse9")
    for name in ("amx", "avx512", "avx2"):
        if not _backend._cpu.isa_supported(name):
            with pytest.raises(ValueError, match="this CPU lacks"):
                _backend.set_cpu_isa(name)
    env = dict(os.environ, FP8KERN_CPU_ISA="generic")
    out = subprocess.run([sys.executable, "-c", "import fp8kern; print(fp8kern.info()['cpu_isa'])"], env=env,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "generic"
    env["FP8KERN_CPU_ISA"] = "bogus"
    bad = subprocess.run([sys.executable, "-c", "import fp8kern"], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "FP8KERN_CPU_ISA='bogus'" in bad.stderr


def test_backend_cpu_refuses_cuda_tensors_by_name(monkeypatch):
    from fp8kern.ops import gemm
    fp8kern.set_backend("cpu")
    try:
        with pytest.raises(NotImplementedError, match="FP8KERN_BACKEND=cpu.*cuda"):
            gemm.gemm_path(torch.device("cuda", 0), False, torch.bfloat16, False)
    finally:
        fp8kern.set_backend("auto")


def test_native_validation():
    """The C++ side validates again: a bad stride from a direct binding call is a ValueError, not a crash."""
    a = torch.zeros(4, 64, dtype=torch.float8_e4m3fn)
    d = torch.empty(4, 8, dtype=torch.float32)
    s = torch.ones(1)
    with pytest.raises(ValueError, match="lda=10 is shorter than a row of A"):
        _backend._cpu.scaled_mm(a.data_ptr(), a.data_ptr(), d.data_ptr(), 4, 4, 64, 10, 64, 8, 0, 0, s.data_ptr(),
                                False, s.data_ptr(), False, False, 0, 0, 1, False)
    with pytest.raises(ValueError, match="output dtype code 3"):
        _backend._cpu.scaled_mm(a.data_ptr(), a.data_ptr(), d.data_ptr(), 4, 4, 64, 64, 64, 8, 3, 0, s.data_ptr(),
                                False, s.data_ptr(), False, False, 0, 0, 1, False)


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to build the C++ test")
def test_cpp_kernel_test(tmp_path):
    """tests/cpu/test_cpu_kernels.cpp, built natively with the same per-file target flags as the package."""
    exe = build_cpp_test(tmp_path, "g++")
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert " 0 failed" in out.stdout


def build_cpp_test(tmp_path, cxx, extra=()):
    """Compile the CPU family and its C++ test with `cxx` (x86-64: with the AVX2 / AVX-512 kernels)."""
    src = ROOT / "csrc" / "cpu"
    flags = ["-O2", "-std=c++17", f"-I{ROOT / 'csrc' / 'include'}", *extra]
    objs, defs = [], []
    machine = subprocess.run([cxx, "-dumpmachine"], capture_output=True, text=True).stdout
    if machine.startswith("x86_64"):
        avx512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vbmi"]
        for name, target, define in (("kernel_avx2", ["-mavx2", "-mfma", "-mf16c"], "FP8KERN_CPU_AVX2"),
                                     ("kernel_avx512", avx512, "FP8KERN_CPU_AVX512"),
                                     ("epilogue_avx512", avx512 + ["-ffp-contract=off"], None),
                                     ("kernel_amx", avx512 + ["-mamx-tile", "-mamx-bf16"], "FP8KERN_CPU_AMX")):
            obj = tmp_path / f"{name}.o"
            subprocess.run([cxx, *flags, *target, "-c", str(src / f"{name}.cpp"), "-o", str(obj)], check=True)
            objs.append(str(obj))
            if define:
                defs.append(f"-D{define}=1")
    exe = tmp_path / "test_cpu_kernels"
    sources = [str(src / f) for f in ("gemm.cpp", "quantize.cpp", "linear.cpp", "dispatch.cpp", "thread_pool.cpp",
                                      "kernel_generic.cpp")]
    subprocess.run([cxx, *flags, *defs, *sources, str(ROOT / "tests" / "cpu" / "test_cpu_kernels.cpp"), *objs,
                    "-pthread", "-ldl", "-o", str(exe)], check=True)
    return exe


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_matches_the_reference_bit_for_bit(x_dtype):
    """Every kind (token, group, tensor; dynamic and static; fp32 and UE8M0 scales; scale_ub) equals the reference
    exactly: same steps, same roundings (csrc/cpu/quantize.cpp), including rows of zeros, NaN rows and a partial
    last group."""
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(37, 300, generator=gen) * torch.exp2(torch.randint(-12, 12, (37, 1), generator=gen).float()))
    x[4] = 0
    x = x.to(x_dtype)
    x_nan = x.clone()
    x_nan[3, 5] = float("nan")
    cases = [(g, f, ub) for g in ("token", "group", "tensor") for f in ("fp32", "ue8m0") for ub in (None, 2.0)]
    for gran, fmt, ub in cases:
        for xx in (x, x_nan):
            q, s = fp8kern.quantize(xx, gran, scale_format=fmt, scale_ub=ub)
            qr, sr = fp8kern.reference.quantize(xx, gran, 128, None, ub, fmt)
            assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)), (gran, fmt, ub)
            assert torch.equal(s.reshape(sr.shape).view(torch.uint8), sr.view(torch.uint8)), (gran, fmt, ub)
    for gran, shape in (("token", (37, 1)), ("tensor", (1,)), ("group", (37, 3))):
        scale = torch.exp2(torch.rand(shape, generator=gen) * 8 - 4)
        q, _ = fp8kern.quantize(x, gran, scale=scale)
        qr, _ = fp8kern.reference.quantize(x, gran, 128, scale)
        assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)), gran


def test_quantize_every_bf16_value():
    """The fp32 -> e4m3 rounding of every bf16 value (static scale 1: q = e4m3(clamp(x, +-448))) equals torch's."""
    x = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).reshape(256, 256)
    q, _ = fp8kern.quantize(x, "tensor", scale=torch.ones(1))
    qr, _ = fp8kern.reference.quantize(x, "tensor", 128, torch.ones(1))
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8))


def test_auto_takes_it_as_a_verified_family(monkeypatch):
    """'auto' runs the CPU family because it is in VERIFIED_FAMILIES, as for the GPU families; without it the CPU
    takes the reference (scaled_mm and quantize), while FP8KERN_BACKEND=cpu still names it."""
    from fp8kern.ops import gemm
    cpu = torch.device("cpu")
    assert "cpu" in _backend.VERIFIED_FAMILIES and gemm.gemm_path(cpu, True, torch.bfloat16, False) == "cpu"
    monkeypatch.setattr(_backend, "VERIFIED_FAMILIES", frozenset())
    assert gemm.gemm_path(cpu, True, torch.bfloat16, False) is None and not _backend.cpu_quant_available()
    fp8kern.set_backend("cpu")
    try:
        assert gemm.gemm_path(cpu, False, torch.float32, True) == "cpu" and _backend.cpu_quant_available()
    finally:
        fp8kern.set_backend("auto")
