"""GPU: Fp8Experts (MoE experts, one FP8 GEMM per expert and projection on row slices of the gathered tokens)
against the float64 oracle of experts_oracle.py, with the GEMM arithmetic bound of the GPU kernels (gpu_acc)."""

import pytest
import torch

import fp8kern
from conftest import requires_gpu
from experts_oracle import check_experts, exact_rows, gpu_acc, routing
from fp8kern import _backend
from fp8kern.nn import Fp8Experts

pytestmark = [pytest.mark.gpu, requires_gpu]

SCHEMES = [("dynamic_per_token", "channel", "fp32"), ("dynamic_per_token", "tensor", "fp32"),
           ("dynamic_per_tensor", "channel", "fp32"), ("static_per_tensor", "tensor", "fp32"),
           ("block128", "block", "fp32"), ("block128", "block", "ue8m0")]
# (experts, hidden, intermediate, tokens, top_k): unaligned H and I (K % 16 != 0, partial blocks, padded gate/up
# rows), and a model-like one (H, I multiples of 128, up to 8 of 16 experts per token).
SIZES = [(6, 200, 96, 11, 2), (16, 1024, 384, 40, 8)]


@pytest.fixture(params=["sm90", "sm89"])
def family(request):
    if request.param not in _backend.compiled_families():
        pytest.skip(f"{request.param} kernels not compiled")
    cap = torch.cuda.get_device_capability()
    if request.param == "sm90" and cap != (9, 0):
        pytest.skip("sm90 kernels need an H100/H200 (sm_90)")
    prev = fp8kern.get_backend()
    fp8kern.set_backend(request.param)
    yield request.param
    fp8kern.set_backend(prev)


def random_experts(E, H, I, scheme, gran, scale_format, seed=0, positive=False) -> Fp8Experts:
    """An Fp8Experts on the CPU with quantized random weights whose rows differ widely in size (all positive when
    positive: no cancellation, for the test that the bound sees an error)."""
    g = torch.Generator().manual_seed(seed)
    m = Fp8Experts(E, H, I, scheme, weight_granularity=gran, scale_format=scale_format)
    with torch.no_grad():
        for e in range(E):
            for role in ("gate", "up", "down"):
                wq, ws = m.projection(e, role)
                n, k = wq.shape
                # positive sums grow like K, signed ones like sqrt(K): sized so that fp16 outputs stay far from 65504
                base = torch.rand(n, k, generator=g) * (2 / k) if positive else torch.randn(n, k, generator=g) * 0.05
                w = base * torch.exp2(torch.rand(n, 1, generator=g) * 4 - 2)
                q, s = fp8kern.quantize_weight(w, gran, scale_format=scale_format)
                wq.copy_(q)
                ws.copy_(s.reshape(-1, 1).expand(ws.shape) if gran == "tensor" else s.reshape(ws.shape))
    return m


def set_static_scales(m: Fp8Experts, x: torch.Tensor) -> None:
    """Static input scales: 2 * amax / 448 of x, and 8 * amax / 448 of the float64 h = silu(G x) * (U x) of every
    expert: margins so that the oracle's upper bound on the computed activations (which for h includes the gate/up
    GEMMs' worst-case error, at K = 1024 a few times |h|) stays clear of clipping, as its bound needs."""
    X = x.double()
    amax_h = 0.0
    for e in range(m.num_experts):
        gq, gs = m.projection(e, "gate")
        uq, us = m.projection(e, "up")
        G, U = gq.double() * gs.double(), uq.double() * us.double()  # per-channel scales
        amax_h = max(amax_h, float((torch.nn.functional.silu(X @ G.T) * (X @ U.T)).abs().max()))
    with torch.no_grad():
        m.gate_up_input_scale.fill_(2 * float(X.abs().max()) / 448)
        m.down_input_scale.fill_(8 * amax_h / 448)


@pytest.mark.parametrize("scheme,gran,scale_format", SCHEMES)
@pytest.mark.parametrize("E,H,I,T,k", SIZES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("data", ["exact", "random"])
def test_experts_against_float64(family, scheme, gran, scale_format, E, H, I, T, k, dtype, data):
    """data 'exact': positive weights and activations exact in e4m3 (rows of different sizes), where the bound is
    tight (a few percent: a wrong slice, scale or expert fails); 'random': signed data, where it is loose (sums of
    |terms| against sums with cancellation) but the signs and the clipping-free static scales are exercised."""
    exact = data == "exact"
    m = random_experts(E, H, I, scheme, gran, scale_format, positive=exact)
    g = torch.Generator().manual_seed(T)
    # Per-row and per-group scales keep rows of different sizes exact; one per-tensor scale needs one size.
    row_exp = [-6 + t % 4 for t in range(T)] if scheme in ("dynamic_per_token", "block128") else None
    x = (exact_rows(T, H, row_exp=row_exp, seed=T) if exact else torch.randn(T, H, generator=g)).to(dtype)
    idx, w = routing(T, E, k, seed=T)
    if scheme == "static_per_tensor":
        set_static_scales(m, x)
        if exact:
            m.gate_up_input_scale.fill_(2.0**-6)  # amax / 448 of these rows: exact, and nothing clips
    out = m.to("cuda")(x.cuda(), idx.cuda(), w.cuda())
    torch.cuda.synchronize()
    assert out.device.type == "cuda" and out.dtype == dtype
    check_experts(m.to("cpu"), x, idx, w, out=out.cpu(), acc=gpu_acc, x_exact=exact)


@pytest.mark.parametrize("scheme,gran,scale_format", [SCHEMES[0], SCHEMES[4]])
def test_experts_one_token_expert_first(family, scheme, gran, scale_format):
    """The first active expert gets one token and the next ones several: the GEMMs after the first reuse its
    validation, and a one-row slice's per-row scale must not turn the layout per-tensor for them. Positive data,
    exact activations and rows 8x apart in size make a misread scale fail the bound."""
    m = random_experts(6, 200, 96, scheme, gran, scale_format, positive=True)
    x = exact_rows(5, 200, row_exp=[-6, -3, 0, 3, 6])
    idx = torch.tensor([[0, 1], [1, 2], [2, 3], [1, 4], [5, 3]])  # expert 0: one token; 1: three
    w = torch.full((5, 2), 0.5)
    out = m.to("cuda")(x.cuda(), idx.cuda(), w.cuda()).cpu()
    check_experts(m.to("cpu"), x, idx, w, out=out, acc=gpu_acc, x_exact=True)


def test_experts_bound_catches_a_wrong_expert(family):
    """With positive data and activations exact in e4m3 (448 * 2^-6 in every 1x128 group, so the scales are 2^-6),
    the GPU bound sees the output of a module whose experts 1 and 2 are exchanged."""
    m = random_experts(6, 200, 96, "dynamic_per_token", "channel", "fp32", positive=True)
    other = random_experts(6, 200, 96, "dynamic_per_token", "channel", "fp32", positive=True)
    with torch.no_grad():
        for buf in (other.gate_up_weight, other.gate_up_scale, other.down_weight, other.down_scale):
            buf[[1, 2]] = buf[[2, 1]]
    x = exact_rows(11, 200, seed=3)
    idx, w = routing(11, 6, 2)
    good = m.to("cuda")(x.cuda(), idx.cuda(), w.cuda()).cpu()  # .to moves the module itself
    bad = other.to("cuda")(x.cuda(), idx.cuda(), w.cuda()).cpu()
    m.to("cpu")
    check_experts(m, x, idx, w, out=good, acc=gpu_acc, x_exact=True)
    with pytest.raises(AssertionError, match="exceeds the bound"):
        check_experts(m, x, idx, w, out=bad, acc=gpu_acc, x_exact=True)


# On sm90 the experts run both projections as one grouped launch each, with no host synchronization. (That each row
# takes its own expert's static scales is tested on the CPU, test_experts.test_grouped_flow_against_float64: the
# bound here does not see a scale that is wrong without clipping.)

@pytest.fixture
def sm90_only():
    if "sm90" not in _backend.compiled_families() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the grouped kernel needs the sm90 family on an H100/H200")
    prev = fp8kern.get_backend()
    fp8kern.set_backend("sm90")
    yield
    fp8kern.set_backend(prev)


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("scheme,gran,scale_format", SCHEMES)
def test_experts_grouped_against_float64(sm90_only, grouped, scheme, gran, scale_format):
    """The grouped path and the per-expert one (grouped=False) against the oracle, on exact positive data where the
    bound is tight; with block scales I = 320 pads gate and up to 384 rows each (a zero block between them)."""
    m = random_experts(16, 512, 320, scheme, gran, scale_format, positive=True)
    per_row = scheme in ("dynamic_per_token", "block128")
    x = exact_rows(40, 512, row_exp=[-6 + t % 4 for t in range(40)] if per_row else None, seed=2)
    idx, w = routing(40, 16, 4, seed=2)
    if scheme == "static_per_tensor":
        set_static_scales(m, x)
        m.gate_up_input_scale.fill_(2.0**-6)  # amax / 448 of these rows: exact, and nothing clips
    m.grouped = grouped
    m.to("cuda")
    assert m._grouped_runs(x.cuda()) == grouped
    out = m(x.cuda(), idx.cuda(), w.cuda()).cpu()
    check_experts(m.to("cpu"), x, idx, w, out=out, acc=gpu_acc, x_exact=True)


def test_experts_grouped_value_checks(sm90_only, monkeypatch):
    """With value checks on, rows routed to no expert (never computed: their quantized scales may hold anything) do
    not trip the scale checks (test_grouped_block_mm_value_checks shows it deterministically)."""
    m = random_experts(8, 256, 128, "block128", "block", "fp32", positive=True).to("cuda")
    x = exact_rows(12, 256, seed=7)
    idx, w = routing(12, 8, 2, seed=7)  # holds the no-expert index
    monkeypatch.setitem(_backend._state, "check_values", True)
    out = m(x.cuda(), idx.cuda(), w.cuda())
    check_experts(m.to("cpu"), x, idx, w, out=out.cpu(), acc=gpu_acc, x_exact=True)


@pytest.mark.parametrize("scheme,gran,scale_format", [SCHEMES[4], SCHEMES[0], SCHEMES[2], SCHEMES[3]])
def test_experts_grouped_cuda_graph(sm90_only, scheme, gran, scale_format):
    """The grouped layer captured in a CUDA graph, replayed on other tokens and routing (the per-expert row counts
    change: they are computed and read on the device). Both routings hold the no-expert index, whose rows no GEMM
    writes (the fake device poisons them at capture): a per-tensor dynamic scale must not see them."""
    m = random_experts(8, 256, 128, scheme, gran, scale_format, positive=True)
    x0, x1 = exact_rows(12, 256, seed=4), exact_rows(12, 256, seed=5)
    if scheme == "static_per_tensor":
        set_static_scales(m, x1)
        m.gate_up_input_scale.fill_(2.0**-6)
    m.to("cuda")
    (idx0, w0), (idx1, w1) = routing(12, 8, 2, seed=4), routing(12, 8, 2, seed=5)
    idx1[5, 0] = 8  # two rows routed nowhere at replay, one at capture
    xs, idxs, ws = x0.cuda(), idx0.cuda(), w0.cuda()
    m(xs, idxs, ws)  # warm-up outside the capture (workspace sizes, quantizer setup)
    assert m._grouped_runs(xs)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = m(xs, idxs, ws)
    for dst, src in ((xs, x1), (idxs, idx1), (ws, w1)):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    check_experts(m.to("cpu"), x1, idx1, w1, out=out.cpu(), acc=gpu_acc, x_exact=True)


def test_experts_grouped_bad_index_gives_nan(sm90_only, monkeypatch):
    """An index outside [0, E] cannot raise without a host read: its token's row is NaN, the other rows are those of
    the same call with that index replaced by E (no expert). With value checks on, it raises."""
    m = random_experts(8, 256, 128, "block128", "block", "fp32").to("cuda")
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16).cuda()
    idx = torch.tensor([[3], [-1], [5], [11], [0], [8]], device="cuda")
    w = torch.ones(6, 1, device="cuda")
    out = m(x, idx, w)
    fixed = m(x, torch.where((idx < 0) | (idx > 8), 8, idx), w)
    bad = torch.tensor([False, True, False, True, False, False], device="cuda")
    assert out[bad].isnan().all() and not out[~bad].isnan().any()
    assert torch.equal(out[~bad], fixed[~bad])
    monkeypatch.setitem(_backend._state, "check_values", True)
    with pytest.raises(ValueError, match="outside"):
        m(x, idx, w)
