"""GPU: the sm90 and sm89 scaled_mm kernels against an independent float64 computation (conftest.exact_scaled_mm).

Tolerance, per element, with S = sum_k |a_deq * b_deq| (bounds any summation's error) and D the exact result:
- FP8 tensor cores (Hopper WGMMA; Ada mma.sync is assumed no better) sum each K=32 step into its accumulator keeping at least 13 significant bits (the reduced
  precision of FP8 tensor-core accumulation), so one step errs by at most 2^-13 of the magnitudes it adds,
  which are bounded by S.
- Promoted (default) mode moves partial sums into fp32 every 128 of K: at most 4 steps, 4 * 2^-13 * S = 2^-11 * S,
  plus ceil(K/128) fp32 additions (gamma * S, gamma = (ceil(K/128) + 3) * 2^-24 with 3 epilogue roundings).
- Fast-accum mode accumulates all K/32 steps in the MMA: (K/32) * 2^-13 * S.
- The conversion to out_dtype adds u_out * |D| (u = 2^-8 bf16, 2^-11 fp16, 2^-24 fp32).
Scales span 2^-6..2^2 per row and column, so a scale applied to the wrong row or column (or a stale output element)
is far outside the bound; test_bound_catches_wrong_scale checks that on this GPU.
"""

import math

import numpy as np
import pytest
import torch

import fp8kern
from conftest import UNIT_ROUNDOFF, exact_scaled_mm, make_operands, requires_gpu
from fp8kern import _backend

pytestmark = [pytest.mark.gpu, requires_gpu]


def _use(family):
    """Skip unless this GPU can run the family's compiled kernels; otherwise select it for the test."""
    if family not in _backend.compiled_families():
        pytest.skip(f"{family} kernels not compiled")
    cap = torch.cuda.get_device_capability()
    if family == "sm90" and cap != (9, 0):
        pytest.skip("sm90 kernels need an H100/H200 (sm_90)")
    if family == "sm89" and cap < (8, 9):
        pytest.skip("sm89 kernels need sm_89 or newer")
    prev = fp8kern.get_backend()
    fp8kern.set_backend(family)
    return prev


@pytest.fixture(params=["sm90", "sm89"])
def family(request):
    """Per-tensor / per-token x per-channel kernels: the Hopper family and the Ada family (which also runs on
    Hopper, for testing)."""
    prev = _use(request.param)
    yield request.param
    fp8kern.set_backend(prev)


@pytest.fixture(params=["sm90", "sm89"])
def block_family(request):
    """Block-scaled kernels: Hopper's (CUTLASS blockwise WGMMA) and Ada's (mma.sync, scales in the mainloop)."""
    prev = _use(request.param)
    yield request.param
    fp8kern.set_backend(prev)


def bound(D, S, K, out_dtype, fast):
    steps = math.ceil(K / 32)
    mma = (steps if fast else min(steps, 4)) * 2.0**-13
    gamma = (math.ceil(K / 128) + 3) * 2.0**-24
    return (mma + gamma) * S + UNIT_ROUNDOFF[out_dtype] * np.abs(D) + 2.0**-24


def run_and_check(M, N, K, layout, out_dtype=torch.bfloat16, bias=False, fast=False, seed=0, out=None,
                  scale_dtype=torch.float32, a_scales_col_major=False):
    gen = torch.Generator().manual_seed(seed or (M * 131 + N * 7 + K))
    a, b, sa, sb = make_operands(M, N, K, layout, gen, scale_dtype)
    if a_scales_col_major:
        sa = sa.t().contiguous().t()
    if out_dtype == torch.float16:
        # Keep |D| inside fp16's range (M = 200 reaches |D| ~ 7.4e4 with sa / 64). Divided in fp32, as e8m0 has no
        # division; the expected values are computed from these same scales.
        sa = (sa.float() / 256).to(sa.dtype)
    bias_t = (torch.randn(N, generator=gen) * 10).to(out_dtype) if bias else None
    args = [a.cuda(), b.cuda(), sa.cuda() if not a_scales_col_major else sa.t().cuda().t(), sb.cuda()]
    y = fp8kern.scaled_mm(*args, out_dtype=out_dtype, bias=bias_t.cuda() if bias else None, out=out,
                          fast_accum=fast)
    torch.cuda.synchronize()
    D, S = exact_scaled_mm(a, b, sa, sb, bias_t)
    err = np.abs(y.double().cpu().numpy() - D)
    lim = bound(D, S, K, out_dtype, fast)
    worst = np.unravel_index(np.argmax(err - lim), err.shape)
    assert np.isfinite(y.double().cpu().numpy()).all(), "non-finite output"
    assert (err <= lim).all(), f"M={M} N={N} K={K} {layout}: error {err[worst]} > {lim[worst]} at {worst}"
    return y


@pytest.mark.parametrize("M", list(range(1, 129)))
def test_m_sweep(family, M):
    run_and_check(M, 256, 512, "token_channel")


@pytest.mark.parametrize("layout", ["tensor", "token_channel", "tensor_channel", "token_tensor"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M", [1, 17, 64, 200])
def test_layouts_dtypes_bias(family, layout, out_dtype, M):
    run_and_check(M, 384, 1024, layout, out_dtype, bias=True)
    run_and_check(M, 384, 1024, layout, out_dtype, bias=False)


@pytest.mark.parametrize("M,N,K", [(1, 130, 200), (5, 7, 16), (33, 129, 257), (77, 1000, 40), (130, 3420, 576),
                                   (3, 6840, 3420)])
def test_unaligned_shapes(family, M, N, K):
    """K % 16 != 0 and N not a multiple of 8 go through the padded paths."""
    run_and_check(M, N, K, "token_channel", bias=True)


@pytest.mark.parametrize("N,K", [(6144, 4096), (4096, 14336), (2112, 7168)])
@pytest.mark.parametrize("M", [1, 16, 128, 1024])
def test_model_shapes(family, N, K, M):
    run_and_check(M, N, K, "token_channel")


@pytest.mark.parametrize("M", [1, 64, 512])
def test_fast_accum(family, M):
    run_and_check(M, 512, 2048, "token_channel", fast=True)


def test_poisoned_out_view(family):
    """Every element of an out= view is written, nothing outside it is touched."""
    # 304 columns: a 608-byte row stride and a 16-byte offset view, so the kernel writes the view itself (a stride
    # that TMA cannot use would go through a padded buffer and a copy, and test only the copy).
    big = torch.full((70, 304), float("nan"), dtype=torch.bfloat16, device="cuda")
    view = big[:, 8:264]
    run_and_check(70, 256, 512, "token_channel", out=view)
    assert torch.isnan(big[:, :8]).all() and torch.isnan(big[:, 264:]).all()


def test_one_row_operands_with_odd_strides(family):
    """A [1, K] view's row stride is meaningless (torch calls it contiguous); it must not be passed to the kernel."""
    gen = torch.Generator().manual_seed(8)
    a, b, sa, sb = make_operands(1, 1, 32, "token_channel", gen)
    a_big = torch.zeros(1, 40, dtype=torch.uint8)
    a_big[:, :32] = a.view(torch.uint8)
    a_view = a_big.view(a.dtype).cuda()[:, :32]  # stride (40, 1)
    b_view = b.cuda().reshape(32).as_strided((1, 32), (0, 1))
    assert a_view.is_contiguous() and a_view.stride(0) == 40 and b_view.stride(0) == 0
    y = fp8kern.scaled_mm(a_view, b_view, sa.cuda(), sb.cuda(), out_dtype=torch.float32)
    D, S = exact_scaled_mm(a, b, sa, sb)
    assert (np.abs(y.double().cpu().numpy() - D) <= bound(D, S, 32, torch.float32, False)).all()


def test_bound_catches_wrong_scale(family):
    gen = torch.Generator().manual_seed(3)
    a, b, sa, sb = make_operands(64, 256, 512, "token_channel", gen)
    wrong = sb.clone()
    wrong[5] *= 2
    y = fp8kern.scaled_mm(a.cuda(), b.cuda(), sa.cuda(), wrong.cuda(), out_dtype=torch.float32)
    D, S = exact_scaled_mm(a, b, sa, sb)
    assert not (np.abs(y.double().cpu().numpy() - D) <= bound(D, S, 512, torch.float32, False)).all()


def capture_and_replay(M, N, K, layout):
    """Capture one scaled_mm in a CUDA graph, refill its inputs with new data, replay, and check the result."""
    a, b, sa, sb = (t.cuda() for t in make_operands(M, N, K, layout, torch.Generator().manual_seed(4)))
    fp8kern.scaled_mm(a, b, sa, sb)  # warm-up (allocates the shared workspace) outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = fp8kern.scaled_mm(a, b, sa, sb)
    a2, b2, sa2, sb2 = make_operands(M, N, K, layout, torch.Generator().manual_seed(5))
    for dst, src in zip((a, b, sa, sb), (a2, b2, sa2, sb2)):
        dst.copy_(src)
    g.replay()
    torch.cuda.synchronize()
    D, S = exact_scaled_mm(a2, b2, sa2, sb2)
    assert (np.abs(y.double().cpu().numpy() - D) <= bound(D, S, K, torch.bfloat16, False)).all()


@pytest.mark.parametrize("M,N,K", [(32, 512, 1024), (128, 4096, 4096)])  # sm90 runs the second with stream-K
def test_cuda_graph_capture(family, M, N, K):
    """A captured call replays on new data (stream-K's workspace comes from the graph's pool, zeroed in the graph)."""
    capture_and_replay(M, N, K, "token_channel")


def test_value_checks_refuse_capture(family, monkeypatch):
    """Value checks read scales on the host: inside a capture they raise a clear error before touching the stream
    (eagerly they run)."""
    monkeypatch.setitem(_backend._state, "check_values", True)
    a, b, sa, sb = (t.cuda() for t in make_operands(4, 256, 256, "token_channel", torch.Generator().manual_seed(6)))
    fp8kern.scaled_mm(a, b, sa, sb)
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match=r"call fp8kern.set_value_checks\(False\) before capturing"):
        with torch.cuda.graph(g):
            fp8kern.scaled_mm(a, b, sa, sb)


# Block-scaled (1x128 x 128x128): both kernels promote every 128 of K, so the promoted-mode bound applies.

@pytest.mark.parametrize("K", [1024, 2048])  # sm90 splits K = 2048 with stream-K (2 x tiles < SMs, K > 1024)
@pytest.mark.parametrize("M", [1, 2, 3, 7, 16, 31, 64, 100, 128, 129, 1000])
def test_block_m_sweep(block_family, M, K):
    run_and_check(M, 512, K, "block")


@pytest.mark.parametrize("M,N,K", [(8, 8192, 8192), (5, 130, 1152), (1, 7168, 18432)])
def test_block_stream_k_shapes(block_family, M, N, K):
    """Decode shapes that sm90 runs with stream-K: partial M/N blocks and units starting mid-K."""
    run_and_check(M, N, K, "block", bias=True)


def test_block_cuda_graph_capture(block_family):
    """A captured block-scaled call (stream-K on sm90: its workspace comes from the graph's pool) replays on new
    data."""
    capture_and_replay(16, 4096, 4096, "block")


@pytest.mark.parametrize("M,N,K", [(5, 130, 200), (17, 7168, 2112), (64, 300, 1000), (8, 2112, 7168),
                                   (33, 256, 640), (4, 24576, 1536), (3, 100, 40)])
def test_block_partial_blocks_and_odd_k_blocks(block_family, M, N, K):
    """N and K not multiples of 128 (partial edge blocks), (K/128) % 4 != 0, K < 128."""
    run_and_check(M, N, K, "block", bias=True)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e8m0fnu])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_block_scale_and_out_dtypes(block_family, scale_dtype, out_dtype):
    run_and_check(48, 384, 768, "block", out_dtype, bias=True, scale_dtype=scale_dtype)


def test_block_column_major_a_scales(block_family):
    run_and_check(40, 256, 896, "block", a_scales_col_major=True)


def test_block_from_quantize(block_family):
    """fp8kern.quantize(granularity='group') output feeds the block kernel with no layout conversion."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(37, 1000, generator=g).to(torch.bfloat16).cuda()
    w = torch.randn(520, 1000, generator=g).to(torch.bfloat16).cuda()
    xq, xs = fp8kern.quantize(x, "group")
    wq, ws = fp8kern.quantize_weight(w, "block")
    y = fp8kern.scaled_mm(xq, wq, xs, ws, out_dtype=torch.float32)
    D, S = exact_scaled_mm(xq.cpu(), wq.cpu(), xs.cpu(), ws.cpu())
    assert (np.abs(y.double().cpu().numpy() - D) <= bound(D, S, 1000, torch.float32, False)).all()


def _every_config():
    """(query family, config index) for every config of every compiled family's table."""
    out = []
    for family in _backend.compiled_families():
        for query in (family, family + "_block"):
            out += [(query, i) for i in range(len(_backend._C.gemm_configs(query)))]
    return out


@pytest.mark.parametrize("query,config", _every_config())
@pytest.mark.parametrize("M,N,K", [(1, 512, 1024), (17, 300, 1000), (32, 64, 128), (33, 130, 40), (100, 2112, 7168),
                                   (129, 384, 896), (300, 7168, 512), (128, 4096, 16384)])
def test_every_config(monkeypatch, query, config, M, N, K):
    """Each config of each table, whatever select_config would pick for the shape: M and N edges inside and across
    tiles, K < 128, K % 16 != 0, partial last blocks."""
    family = query.split("_")[0]
    prev = _use(family)
    try:
        monkeypatch.setitem(fp8kern.ops.gemm_launch._config_override, query, config)
        run_and_check(M, N, K, "block" if query.endswith("_block") else "token_channel", bias=True)
    finally:
        fp8kern.set_backend(prev)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_block_fp8_linear(block_family, dtype):
    """Quantize + block GEMM in one call: the GPU quantizer is bit-exact with the reference, so the GEMM bound holds
    against the CPU-quantized operands."""
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(2, 19, 700, generator=g) * 3).to(dtype)
    wq, ws = fp8kern.quantize_weight(torch.randn(300, 700, generator=g), "block")
    bias = torch.randn(300, generator=g).to(dtype)
    y = fp8kern.block_fp8_linear(x.cuda(), wq.cuda(), ws.cuda(), bias.cuda())
    assert y.shape == (2, 19, 300) and y.dtype == dtype
    xq, xs = fp8kern.quantize(x.reshape(-1, 700), "group")
    D, S = exact_scaled_mm(xq, wq, xs, ws, bias)
    err = np.abs(y.reshape(-1, 300).double().cpu().numpy() - D)
    assert (err <= bound(D, S, 700, dtype, False)).all()


@pytest.mark.parametrize("scheme", ["dynamic_per_token", "dynamic_per_tensor", "static_per_tensor", "block128"])
@pytest.mark.parametrize("N", [304, 300])
def test_fp8_linear_planned_forward(family, scheme, N):
    """Fp8Linear's planned forward (ops/linear_plan.py) on a compiled family: from addresses, activations and scales
    in one buffer (N = 304: output rows in whole 16-byte units), or through _quantize_impl and run_gemm (N = 300).
    The GPU quantizer is bit-exact with the reference, so the GEMM bound holds against the CPU-quantized
    operands; a second forward reuses the plan."""
    g = torch.Generator().manual_seed(8)
    lin = torch.nn.Linear(704, N).bfloat16()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, 704, generator=g) / 16)
        lin.bias.copy_(torch.randn(N, generator=g))
    static = {"input_scale": 0.03} if scheme.startswith("static") else {}
    layer = fp8kern.Fp8Linear.from_linear(lin, scheme, **static)
    x = (torch.randn(2, 9, 704, generator=g) * 3).bfloat16()
    x2 = x.reshape(-1, 704)
    if scheme == "static_per_tensor":
        xq, xs = fp8kern.quantize(x2, "tensor", scale=layer.input_scale)
    else:
        xq, xs = fp8kern.quantize(x2, {"dynamic_per_token": "token", "dynamic_per_tensor": "tensor",
                                       "block128": "group"}[scheme])
    D, S = exact_scaled_mm(xq, layer.weight, xs, layer.weight_scale, layer.bias)
    layer = layer.cuda()
    for _ in range(2):
        y = layer(x.cuda())
        assert y.shape == (2, 9, N) and y.dtype == torch.bfloat16
        # N = 304: one fp8kern._C.linear call; N = 300: the quantization and GEMM launches apart
        assert layer.__dict__["_plan"].run.__name__ == ("run" if N % 8 == 0 else "run_tensors")
        err = np.abs(y.reshape(-1, N).double().cpu().numpy() - D)
        assert (err <= bound(D, S, 704, torch.bfloat16, False)).all()


@pytest.mark.parametrize("scheme", ["dynamic_per_token", "block128"])
@pytest.mark.parametrize("warm", [True, False])
def test_fp8_linear_planned_forward_in_cuda_graph(family, scheme, warm):
    """A captured Fp8Linear forward replays on new data: planned before the capture (warm) or first called inside it
    (then unplanned: a plan is never built during a capture), and the eager forward after it plans and agrees."""
    g = torch.Generator().manual_seed(9)
    lin = torch.nn.Linear(512, 256).bfloat16()
    layer = fp8kern.Fp8Linear.from_linear(lin, scheme).cuda()
    x = (torch.randn(8, 512, generator=g) * 2).bfloat16().cuda()
    if warm:
        layer(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    assert (layer.__dict__.get("_plan") is not None) == warm
    x2 = (torch.randn(8, 512, generator=g) * 2).bfloat16()
    x.copy_(x2.cuda())
    graph.replay()
    torch.cuda.synchronize()
    eager = layer(x)
    assert layer.__dict__["_plan"].run is not None
    xq, xs = fp8kern.quantize(x2, "group" if scheme == "block128" else "token")
    D, S = exact_scaled_mm(xq, layer.weight.cpu(), xs, layer.weight_scale.cpu(), layer.bias.cpu())
    for out in (y, eager):
        err = np.abs(out.double().cpu().numpy() - D)
        assert (err <= bound(D, S, 512, torch.bfloat16, False)).all()


# Grouped block-scaled GEMM (MoE experts, sm90 only): one launch over groups of rows, offsets read on the device.
# Each group's rows are a block-scaled GEMM like the ones above, so the same promoted-mode bound applies per group.

@pytest.fixture
def sm90_grouped():
    prev = _use("sm90")
    yield
    fp8kern.set_backend(prev)


def grouped_operands(counts, N, K, scale_dtype=torch.float32, extra_rows=0, seed=8):
    """a [rows, K], scale_a [rows, ceil(K/128)], b [G, N, K], scale_b [G, ceil(N/128), ceil(K/128)] on the CPU;
    rows = sum(counts) + extra_rows (rows that belong to no group)."""
    gen = torch.Generator().manual_seed(seed)
    rows = sum(counts) + extra_rows
    a, _, sa, _ = make_operands(rows, 8, K, "block", gen, scale_dtype)
    bs = [make_operands(1, N, K, "block", gen, scale_dtype) for _ in counts]
    return a, sa, torch.stack([t[1] for t in bs]), torch.stack([t[3] for t in bs])


def check_grouped(y, a, sa, b, sb, offsets, out_dtype, K):
    offs = [int(v) for v in offsets]
    for g in range(len(offs) - 1):
        lo, hi = offs[g], offs[g + 1]
        if hi > lo:
            D, S = exact_scaled_mm(a[lo:hi], b[g], sa[lo:hi], sb[g])
            err = np.abs(y[lo:hi].double().numpy() - D)
            assert (err <= bound(D, S, K, out_dtype, False)).all(), f"group {g} rows {lo}:{hi}: max error {err.max()}"


@pytest.mark.parametrize("counts", [(0, 5, 0, 130, 1, 0), (64,), (0, 0, 3), (1, 1, 1, 1, 1, 1, 1, 1, 1, 1)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float8_e8m0fnu])
@pytest.mark.parametrize("N,K", [(384, 640), (264, 400)])
def test_grouped_block_mm(sm90_grouped, counts, out_dtype, scale_dtype, N, K):
    """Empty groups (first, last, between), one-row groups, a group over a 128-row tile; 7 rows in no group keep the
    output's previous contents; K / 128 = 5 (odd) and N = 384 (3 blocks), or partial last blocks in N and K."""
    a, sa, b, sb = grouped_operands(counts, N, K, scale_dtype, extra_rows=7)
    if out_dtype == torch.float16:
        sa = (sa.float() / 256).to(sa.dtype)  # |D| inside fp16's range, as in run_and_check
    offsets = torch.tensor([0] + np.cumsum(counts).tolist(), dtype=torch.int64)
    assert fp8kern.ops.grouped_supported(torch.device("cuda"), N, K, out_dtype)
    y = torch.full((a.shape[0], N), 7.0, dtype=out_dtype, device="cuda")
    fp8kern.ops.grouped_block_mm(a.cuda(), sa.cuda(), b.cuda(), sb.cuda(), offsets.cuda(), y)
    torch.cuda.synchronize()
    y = y.cpu()
    check_grouped(y, a, sa, b, sb, offsets, out_dtype, K)
    assert (y[int(offsets[-1]):] == 7.0).all(), "rows outside every group were written"


@pytest.mark.parametrize("counts", [(0, 5, 0, 130, 1, 0), (1, 1, 1, 1, 1, 1, 1, 1, 1, 1)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("N,K", [(384, 640), (264, 400)])
def test_grouped_scaled_mm(sm90_grouped, counts, out_dtype, N, K):
    """Per-row x per-channel scales in the grouped kernel's epilogue (one pointer per group into each vector), with
    the same group patterns and shapes as the block-scaled test."""
    gen = torch.Generator().manual_seed(10)
    rows = sum(counts) + 7
    a, _, sa, _ = make_operands(rows, 8, K, "token_channel", gen)  # sa [rows, 1]
    if out_dtype == torch.float16:
        sa = sa / 256
    bs = [make_operands(1, N, K, "token_channel", gen) for _ in counts]
    b, sb = torch.stack([t[1] for t in bs]), torch.stack([t[3] for t in bs])  # sb [G, N]
    offsets = torch.tensor([0] + np.cumsum(counts).tolist(), dtype=torch.int64)
    y = torch.full((rows, N), 7.0, dtype=out_dtype, device="cuda")
    fp8kern.grouped_scaled_mm(a.cuda(), sa.reshape(-1).cuda(), b.cuda(), sb.cuda(), offsets.cuda(), y)
    torch.cuda.synchronize()
    y = y.cpu()
    check_grouped(y, a, sa, b, sb, offsets, out_dtype, K)
    assert (y[int(offsets[-1]):] == 7.0).all(), "rows outside every group were written"


def test_grouped_block_mm_offsets_clamped(sm90_grouped):
    """Offsets outside [0, rows] are clamped on the device (no out-of-bounds access): [-3, 4, rows + 50] runs group 0
    on rows 0:4 and group 1 on rows 4:rows."""
    a, sa, b, sb = grouped_operands((4, 20), 256, 512)
    rows = a.shape[0]
    y = torch.zeros((rows, 256), dtype=torch.float32, device="cuda")
    offsets = torch.tensor([-3, 4, rows + 50], dtype=torch.int64)
    fp8kern.ops.grouped_block_mm(a.cuda(), sa.cuda(), b.cuda(), sb.cuda(), offsets.cuda(), y)
    check_grouped(y.cpu(), a, sa, b, sb, torch.tensor([0, 4, rows]), torch.float32, 512)
    # A range that ends before it starts is empty, and so is one that starts past the rows.
    y.fill_(5.0)
    fp8kern.ops.grouped_block_mm(a.cuda(), sa.cuda(), b.cuda(), sb.cuda(), torch.tensor([0, 4, 2]).cuda(), y)
    check_grouped(y.cpu(), a, sa, b, sb, torch.tensor([0, 4, 4]), torch.float32, 512)
    assert (y[4:] == 5.0).all()
    b3, sb3 = torch.cat([b, b[:1]]), torch.cat([sb, sb[:1]])
    fp8kern.ops.grouped_block_mm(a.cuda(), sa.cuda(), b3.cuda(), sb3.cuda(),
                                 torch.tensor([0, rows, rows + 5, rows + 9]).cuda(), y)
    check_grouped(y.cpu(), a, sa, b3, sb3, torch.tensor([0, rows, rows, rows]), torch.float32, 512)


def test_grouped_block_mm_value_checks(sm90_grouped, monkeypatch):
    """With value checks on, scales of rows outside every group are not checked (they are never read), those inside
    are."""
    a, sa, b, sb = grouped_operands((3, 5), 256, 512, extra_rows=4)
    sa[8:] = float("nan")
    y = torch.zeros((12, 256), dtype=torch.float32, device="cuda")
    monkeypatch.setitem(_backend._state, "check_values", True)
    offsets = torch.tensor([0, 3, 8]).cuda()
    fp8kern.ops.grouped_block_mm(a.cuda(), sa.cuda(), b.cuda(), sb.cuda(), offsets, y)
    check_grouped(y.cpu(), a, sa, b, sb, offsets.cpu(), torch.float32, 512)
    with pytest.raises(ValueError, match="scale_a holds 16 non-finite"):
        fp8kern.ops.grouped_block_mm(a.cuda(), sa.cuda(), b.cuda(), sb.cuda(), torch.tensor([0, 3, 12]).cuda(), y)
    # Offsets are checked too (the kernel would clamp them: wrong rows, silently).
    with pytest.raises(ValueError, match=r"offsets must be non-decreasing within \[0, 12\], got \[0, 5, 3\]"):
        fp8kern.ops.grouped_block_mm(a.cuda(), sa.cuda(), b.cuda(), sb.cuda(), torch.tensor([0, 5, 3]).cuda(), y)


def test_grouped_block_mm_unaligned_views(sm90_grouped):
    """a, b and out as views whose data does not start on 16 bytes (TMA needs it): a and b are copied, out is
    computed in a copy and copied back, rows outside every group keeping their contents."""
    N, K = 256, 384
    a, sa, b, sb = grouped_operands((5, 9), N, K, extra_rows=3)
    rows = a.shape[0]

    def shifted(t, by):  # t's values in a view that starts `by` elements into a larger buffer
        buf = torch.empty(t.numel() + by, dtype=t.dtype, device="cuda")
        view = buf[by:].view(t.shape)
        view.copy_(t)
        return view

    a_v, b_v = shifted(a, 8), shifted(b, 8)
    y = shifted(torch.full((rows, N), 7.0), 2)  # float32: 8 bytes in
    assert a_v.data_ptr() % 16 and b_v.data_ptr() % 16 and y.data_ptr() % 16
    offsets = torch.tensor([0, 5, 14])
    fp8kern.ops.grouped_block_mm(a_v, sa.cuda(), b_v, sb.cuda(), offsets.cuda(), y)
    y = y.cpu()
    check_grouped(y, a, sa, b, sb, offsets, torch.float32, K)
    assert (y[14:] == 7.0).all(), "rows outside every group were written"


def test_grouped_block_mm_cuda_graph(sm90_grouped):
    """Captured once, replayed with other offsets and data: the row ranges are read on the device at replay."""
    N, K = 512, 1024
    a, sa, b, sb = grouped_operands((10, 0, 30), N, K)
    dev = [t.cuda() for t in (a, sa, b, sb)]
    offsets = torch.tensor([0, 10, 10, 40], dtype=torch.int64, device="cuda")
    y = torch.zeros((40, N), dtype=torch.bfloat16, device="cuda")
    fp8kern.ops.grouped_block_mm(*dev, offsets, y)  # warm-up: the workspace size query runs outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fp8kern.ops.grouped_block_mm(*dev, offsets, y)
    a2, sa2, b2, sb2 = grouped_operands((3, 25, 12), N, K, seed=9)
    for dst, src in zip(dev, (a2, sa2, b2, sb2)):
        dst.copy_(src)
    offsets.copy_(torch.tensor([0, 3, 28, 40]))
    g.replay()
    torch.cuda.synchronize()
    check_grouped(y.cpu(), a2, sa2, b2, sb2, offsets.cpu(), torch.bfloat16, K)
