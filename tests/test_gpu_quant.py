"""GPU: the fused quantization kernels against fp8kern.reference, bit for bit.

The kernels do the reference's steps in the same fp32 operations (amax, amax / 448 rounded once, the floor,
power-of-two round-up, reciprocal rounded once, one product, round-to-nearest-even saturating e4m3 conversion), all
correctly rounded IEEE operations, so q and scales must be identical bytes, not merely close. The reference runs on
the CPU copy of the input, so the two share no code path.
"""


import pytest
import torch

import fp8kern
from conftest import requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(autouse=True)
def fused_kernels():
    """Run the fused kernels: until they are verified, the default backend uses the reference instead, and naming a
    kernel family (any: the quantization kernels are the same) selects them."""
    prev = fp8kern.get_backend()
    fp8kern.set_backend("sm89")
    assert fp8kern._backend.quant_kernels_available(torch.device("cuda")), "the tests would check the reference"
    yield
    fp8kern.set_backend(prev)


def ref(x, **kw):
    """Reference on the CPU (a static scale copied there too); scales compared as bytes."""
    kw = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    q, s = fp8kern.reference.quantize(x.cpu().reshape(-1, x.shape[-1]), **kw)
    return q, s


def same_bytes(a, b):
    """Byte equality, except that NaN encodings are not compared bit for bit: IEEE leaves a NaN's sign and payload
    to the hardware (the GPU makes canonical NaNs, x86 propagates the input's), so any NaN matches any NaN."""
    a, b = a.cpu().contiguous(), b.cpu().contiguous()
    assert a.dtype == b.dtype and a.numel() == b.numel()
    nan_a, nan_b = torch.isnan(a.float()).reshape(-1), torch.isnan(b.float()).reshape(-1)
    assert torch.equal(nan_a, nan_b), f"NaN positions differ: {int((nan_a != nan_b).sum())} elements"
    ua, ub = a.view(torch.uint8).reshape(a.numel(), -1), b.view(torch.uint8).reshape(b.numel(), -1)
    bad = ((ua != ub).any(dim=1) & ~nan_a).nonzero()
    assert bad.numel() == 0, (f"{bad.numel()} of {a.numel()} elements differ, first at {int(bad[0])}: "
                              f"{ua[bad[0]].tolist()} vs {ub[bad[0]].tolist()}")


def poison_allocator(nbytes):
    """Leave NaN bytes (0x7f in e4m3) in the caching allocator's next block of this size."""
    torch.empty(nbytes, dtype=torch.uint8, device="cuda").fill_(0x7F)
    torch.cuda.synchronize()


def check(x, granularity, **kw):
    poison_allocator(x.numel())
    q, s = fp8kern.quantize(x, granularity, **kw)
    torch.cuda.synchronize()
    rq, rs = ref(x, granularity=granularity, **kw)
    same_bytes(q.reshape(rq.shape), rq)
    if kw.get("scale") is None:
        same_bytes(s.reshape(rs.shape), rs)
    return q, s


def randx(M, K, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # Per-row magnitudes from 2^-10 to 2^10, so scales differ and some values land in e4m3's subnormal range.
    x = torch.randn(M, K, generator=g) * torch.exp2(torch.randint(-10, 10, (M, 1), generator=g).float())
    return x.to(dtype).cuda()


# Vector path (K multiple of 8), scalar path (odd K), long rows past the register cache (K = 20000).
SHAPES = [(1, 1), (1, 8), (3, 7), (16, 128), (33, 300), (127, 4096), (128, 4104), (5, 20000), (300, 576)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", ["token", "tensor", "group"])
@pytest.mark.parametrize("scale_format", ["fp32", "ue8m0"])
@pytest.mark.parametrize("M,K", SHAPES)
def test_dynamic_parity(dtype, granularity, scale_format, M, K):
    check(randx(M, K, dtype, M * 31 + K), granularity, scale_format=scale_format)


@pytest.mark.parametrize("M", range(1, 129, 9))
def test_m_sweep(M):
    for g in ("token", "group", "tensor"):
        check(randx(M, 7168, torch.bfloat16, M), g)


@pytest.mark.parametrize("group_size", [32, 64, 100, 128, 256, 512])
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_sizes(group_size, dtype):
    """Power-of-two groups up to 32 vectors take the shuffle path; others (100, 512) the warp-per-group path."""
    check(randx(19, 1000, dtype, group_size), "group", group_size=group_size)


@pytest.mark.parametrize("granularity", ["token", "tensor", "group"])
def test_row_strided_and_misaligned(granularity):
    big = randx(40, 1100, torch.bfloat16, 7)
    check(big[:, 64:1088], granularity)      # row stride 2200 bytes, not a multiple of 16: scalar path
    check(big[:, 1:1025], granularity)       # misaligned base pointer: scalar path
    big8 = randx(40, 1152, torch.bfloat16, 8)
    check(big8[:, 128:1152], granularity)    # aligned rows with a row stride: vector path


@pytest.mark.parametrize("granularity", ["token", "tensor", "group"])
def test_static_scales(granularity):
    x = randx(50, 640, torch.bfloat16, 9)
    grid = {"token": (50, 1), "tensor": (1,), "group": (50, 5)}[granularity]
    g = torch.Generator().manual_seed(1)
    scale = (torch.rand(grid, generator=g) * 0.01 + 1e-4).cuda()
    q, _ = check(x, granularity, scale=scale)
    assert not torch.isnan(q.float()).any(), "static quantization must saturate, not overflow to NaN"


def test_scale_ub_zero_rows_and_nan():
    x = randx(8, 512, torch.float16, 10)
    x[2] = 0
    x[5, 17] = float("nan")
    x[6] *= 1000
    for g in ("token", "group", "tensor"):
        check(x, g)
    check(x, "token", scale_ub=0.5)


@pytest.mark.parametrize("granularity", ["token", "group", "tensor"])
def test_broadcast_rows_and_wide_groups(granularity):
    """An expanded row (row stride 0) is read-only input the kernels may read many times; a group wider than K is
    the whole row (one group)."""
    x = randx(1, 640, torch.bfloat16, 14).expand(6, 640)
    assert x.stride(0) == 0
    check(x, granularity)
    # A group wider than K is the row's one group: the reference with group_size=K computes the same (without
    # padding x to 2^31 columns on the host).
    x = randx(3, 200, torch.float16, 15)
    q, sc = fp8kern.quantize(x, "group", group_size=1 << 31)
    torch.cuda.synchronize()
    rq, rs = ref(x, granularity="group", group_size=200)
    same_bytes(q, rq)
    same_bytes(sc.reshape(rs.shape), rs)


def test_cuda_graph_capture():
    x = randx(64, 4096, torch.bfloat16, 11)
    outs = {}
    fp8kern.quantize(x, "tensor")  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for g in ("token", "tensor", "group"):
            outs[g] = fp8kern.quantize(x, g)
    x.copy_(randx(64, 4096, torch.bfloat16, 12))
    graph.replay()
    torch.cuda.synchronize()
    for g, (q, s) in outs.items():
        rq, rs = ref(x, granularity=g)
        same_bytes(q, rq)
        same_bytes(s.reshape(rs.shape), rs)


def test_other_stream_and_device_index():
    x = randx(32, 1024, torch.bfloat16, 13)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        q, sc = fp8kern.quantize(x, "group")
    s.synchronize()
    rq, rs = ref(x, granularity="group")
    same_bytes(q, rq)
    same_bytes(sc, rs)


def test_reference_backend_runs_scaled_mm_on_gpu():
    x = randx(16, 256, torch.bfloat16, 14)
    w = randx(64, 256, torch.bfloat16, 15)
    xq, xs = fp8kern.quantize(x)
    wq, ws = fp8kern.quantize_weight(w)
    prev = fp8kern.get_backend()
    fp8kern.set_backend("reference")
    try:
        y = fp8kern.scaled_mm(xq, wq, xs, ws, out_dtype=torch.float32)
    finally:
        fp8kern.set_backend(prev)
    expect = fp8kern.reference.scaled_mm(xq.cpu(), wq.cpu(), xs.cpu(), ws.cpu(), torch.float32)
    # Same math on another device: fp32 GEMMs may sum in another order; bound as in test_reference (K=256).
    err = (y.cpu().double() - expect.double()).abs()
    S = (xq.cpu().double() * xs.cpu().double()).abs() @ (wq.cpu().double() * ws.cpu().double()).abs().t()
    assert (err <= 2 * (256 + 3) * 2.0**-24 * S + 2.0**-140).all()
