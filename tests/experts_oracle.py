"""The float64 oracle and derived error bound for Fp8Experts (MoE routed experts with e4m3 weights), shared by
the CPU tests (test_experts.py) and the GPU tests (test_gpu_experts.py).

The oracle: for each routed (token t, slot j) with expert e, y = D (silu(G x) * (U x)) in float64 with G, U, D the
expert's stored e4m3 weights times their scales, out[t] = sum_j w_tj y_tj. The bound on |out - oracle| follows the
arithmetic fp8kern does, step by step (u = the output dtype's unit roundoff: 2^-8 bf16, 2^-11 fp16, 2^-24 fp32):

1. gate/up GEMM (as an Fp8Linear, see test_checkpoints.check_layers_against_float64): with s_x the activation scale
   of the element, B = (E + F)(1 + u) + u |exact|, E = (2^-4 |x| + 2^-10 s_x) @ |W|^T (e4m3 rounding of x),
   F = acc ((1 + 2^-4) |x| + 2^-10 s_x) @ |W|^T (the GEMM's arithmetic: in fp32, acc = gamma_{K+2},
   gamma_m = m 2^-24 / (1 - m 2^-24); on FP8 tensor cores, gpu_acc).
   The e4m3 rounding term uses 2^-4 + 2^-23 instead of 2^-4: x / s is rounded to fp32 first.
2. h = silu(g) * u in the output dtype: silu is L-Lipschitz with L = 1.1 (max |silu'| = 1.0998...), evaluated in fp32
   (relative error below 2^-20) and rounded (u): the computed a = silu(g~) errs by
   da <= (u + 2^-19)(|silu(g)| + L B_g) + L B_g (2^-19 covers 2^-20 and the u 2^-20 cross term), and a * u~
   rounded (u) by
   dh <= u (|silu(g)| + da)(|u| + B_u) + da (|u| + B_u) + |silu(g)| B_u   (a u~ - silu(g) u = (a - silu(g)) u~ +
   silu(g) (u~ - u)).
3. down GEMM on h~ (|h~| <= |h| + dh, its activation scale from that bound): dy <= |D| @ dh + B_d, with B_d as in 1.
4. out = index_add of (y~ * w) cast to the output dtype: each term errs by |w| dy plus its rounding (<= 2u of
   A = |w| (|y| + dy)), and each of the k additions by u of the partial sum (<= 2u sum A), so
   |out - oracle| <= sum_j (|w_j| dy_j) + 2u (k + 1) sum_j A_j.
Every rounding to the output dtype also errs by up to eta absolute below the dtype's normal range (half its
subnormal spacing: 2^-134 bf16, 2^-25 fp16, 2^-150 fp32), added once per rounding: to each GEMM output, to a, to h,
and 2 (k + 1) eta to the combination.
Activation scales s: amax / 448 of the element's row (token) or 1x128 group, or of the whole input (tensor: every
token of x for gate_up, routed or not, as Fp8Experts quantizes x before gathering), at least 2^-126, doubled for
UE8M0 rounding; the stored input scale for static layers (asserted not to clip). The oracle is for SiLU experts
(asserted); fp16 overflow is not modelled (tests keep values far below 65504).
"""

from __future__ import annotations

import math

import torch

import fp8kern
from conftest import dynamic_scale_bound
from fp8kern.nn import Fp8Experts

U_OUT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
# Absolute error of one rounding to the dtype below its normal range: half its subnormal spacing.
ETA = {torch.bfloat16: 2.0**-134, torch.float16: 2.0**-25, torch.float32: 2.0**-150}
L_SILU = 1.1


def fp32_acc(K: int) -> float:
    """acc of a GEMM summed in fp32 (the reference path): gamma_{K+2}."""
    m = K + 2
    return m * 2.0**-24 / (1 - m * 2.0**-24)


def gpu_acc(K: int) -> float:
    """acc of fp8kern's GPU GEMMs in their default (promoted) accumulation, as test_gpu_scaled_mm derives it: at most
    4 FP8 tensor-core K=32 steps at 2^-13 each before each fp32 promotion, plus ceil(K/128) + 3 fp32 roundings."""
    return 4 * 2.0**-13 + (math.ceil(K / 128) + 3) * 2.0**-24


def deq64(q: torch.Tensor, s: torch.Tensor, block: bool) -> torch.Tensor:
    n, k = q.shape
    Q, S = q.double(), s.double()
    if not block:
        return Q * S.reshape(n, 1)
    return Q * S[(torch.arange(n) // 128)[:, None], (torch.arange(k) // 128)[None, :]]


def act_scale(m: Fp8Experts, A: torch.Tensor, static: torch.Tensor | None, tensor_amax=None) -> torch.Tensor:
    """Upper bound on the activation scale of each element of A [rows, K] (A: upper bounds on |activations|).
    tensor_amax: for a per-tensor scale, the amax it is taken over when that is more than A's (the gate_up input
    is quantized over every token, routed or not)."""
    rows, K = A.shape
    if static is not None:
        s = static.double().reshape(-1, 1).expand(rows, K)
        assert bool((A <= 448 * s).all()), "static input scale would clip: the bound would not hold"
        return s
    return dynamic_scale_bound(A, m.act_granularity, m.scale_format, tensor_amax or 0.0)


def gemm_bound(X: torch.Tensor, s: torch.Tensor, W: torch.Tensor, u: float, exact: bool = False,
               acc=fp32_acc) -> torch.Tensor:
    """Step 1's B without the u |exact| and underflow terms: X [rows, K] (bounds on |x|), s [rows, K], W [N, K]
    float64. exact: the activations are exact in e4m3 (no rounding term E). acc(K): the GEMM's arithmetic error
    factor. The e4m3 rounding term is 2^-4 + 2^-23: x / s is itself rounded to fp32 first."""
    gamma = acc(W.shape[1])
    E_ = 0 if exact else ((2.0**-4 + 2.0**-23) * X + 2.0**-10 * s) @ W.abs().T
    F = gamma * (((1 + 2.0**-4) * X + 2.0**-10 * s) @ W.abs().T)
    return (E_ + F) * (1 + u)


def check_experts(m: Fp8Experts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None,
                  x_exact: bool = False, acc=fp32_acc):
    """out (default m(x, idx, w)) against the float64 oracle within the bound in the module docstring.
    x_exact: x holds values that its activation scales represent exactly in e4m3 (asserted): quantizing x is then
    exact, and step 1 keeps only the arithmetic and output-rounding terms. acc: see gemm_bound (gpu_acc for outputs
    computed on a GPU). m, x, idx, w on the CPU."""
    out = m(x, idx, w) if out is None else out
    assert "silu" in type(m.act_fn).__name__.lower(), f"the oracle computes SiLU experts, not {m.act_fn}"
    if x_exact:
        if m.dynamic:
            gran = m.act_granularity
            q, s = fp8kern.reference.quantize(x.float(), gran, scale_format=m.scale_format)
            s_el = s.reshape(-1, 1) if gran != "group" else s.repeat_interleave(128, dim=1)[:, :x.shape[1]]
        else:  # one static scale shared by every expert
            s_el = m.gate_up_input_scale[:1].float()
            assert bool((m.gate_up_input_scale == s_el).all()), "x_exact needs one gate_up input scale"
            q, _ = fp8kern.reference.quantize(x.float(), "tensor", scale=s_el)
        assert torch.equal(q.float() * s_el.float(), x.float()), "x is not exact in e4m3"
    assert out.shape == x.shape and out.dtype == x.dtype
    u, eta = U_OUT[x.dtype], ETA[x.dtype]
    block = m.weight_granularity == "block"
    T, k = idx.shape
    pairs = [(t, j, int(idx[t, j])) for t in range(T) for j in range(k) if int(idx[t, j]) < m.num_experts]
    X = x.double()
    W = {(e, r): deq64(*m.projection(e, r), block) for e in range(m.num_experts) for r in ("gate", "up", "down")}
    # Step 1 for all rows at once (the activation scale of a tensor-scaled input spans every token).
    rows = torch.stack([X[t] for t, _, _ in pairs])
    static_gu = torch.stack([m.gate_up_input_scale[e] for *_, e in pairs]) if not m.dynamic else None
    s_x = act_scale(m, rows.abs(), static_gu, tensor_amax=float(X.abs().max()))
    g = torch.stack([W[e, "gate"] @ X[t] for t, _, e in pairs])
    up = torch.stack([W[e, "up"] @ X[t] for t, _, e in pairs])
    B_g = torch.stack([gemm_bound(rows[i:i + 1].abs(), s_x[i:i + 1], W[e, "gate"], u, x_exact, acc)[0]
                       for i, (*_, e) in enumerate(pairs)]) + u * g.abs() + eta
    B_u = torch.stack([gemm_bound(rows[i:i + 1].abs(), s_x[i:i + 1], W[e, "up"], u, x_exact, acc)[0]
                       for i, (*_, e) in enumerate(pairs)]) + u * up.abs() + eta
    sg = torch.nn.functional.silu(g)
    da = (u + 2.0**-19) * (sg.abs() + L_SILU * B_g) + L_SILU * B_g + eta
    dh = u * (sg.abs() + da) * (up.abs() + B_u) + da * (up.abs() + B_u) + sg.abs() * B_u + eta
    h = sg * up
    Hb = h.abs() + dh
    static_d = torch.stack([m.down_input_scale[e] for *_, e in pairs]) if not m.dynamic else None
    s_h = act_scale(m, Hb, static_d)
    y = torch.stack([W[e, "down"] @ h[i] for i, (*_, e) in enumerate(pairs)])
    prop = torch.stack([W[e, "down"].abs() @ dh[i] for i, (*_, e) in enumerate(pairs)])  # |D| @ dh
    B_d = torch.stack([gemm_bound(Hb[i:i + 1], s_h[i:i + 1], W[e, "down"], u, acc=acc)[0]
                       for i, (*_, e) in enumerate(pairs)]) + u * (y.abs() + prop) + eta  # |D h~| <= |D h| + |D| @ dh
    dy = prop + B_d
    ref = torch.zeros_like(X)
    bound_w = torch.zeros_like(X)
    A = torch.zeros_like(X)
    for i, (t, j, e) in enumerate(pairs):
        wt = abs(float(w[t, j]))
        ref[t] += float(w[t, j]) * y[i]
        bound_w[t] += wt * dy[i]
        A[t] += wt * (y[i].abs() + dy[i])
    bound = bound_w + 2 * u * (k + 1) * A + 2 * (k + 1) * eta
    err = (out.double() - ref).abs()
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), (f"|out - ref| = {float(err.flatten()[worst])} exceeds the bound "
                                        f"{float(bound.flatten()[worst])} at flat index {worst}")
    return out


def routing(T: int, E: int, k: int, seed: int = 0, sentinel: bool = True):
    """top_k_index [T, k] covering every expert (T * k >= E; and, when sentinel, the no-expert index E once), with
    softmax router weights."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    for e in range(E):
        idx[e // k, e % k] = e
    if sentinel:
        idx[-1, 1] = E
    w = torch.softmax(torch.randn(T, k, generator=g), dim=-1)
    return idx, w


def exact_rows(T: int, H: int, row_exp=None, seed: int = 0) -> torch.Tensor:
    """[T, H] fp32 positive e4m3 values times 2^row_exp[t] (default -6), with 448 * 2^row_exp[t] in every 1x128
    group: per-token and per-group scales come out as 2^row_exp[t] exactly, so quantizing these activations is
    exact (check_experts' x_exact)."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.rand(T, H, generator=g) * 448).to(torch.float8_e4m3fn).float()
    q[:, ::128] = 448
    e = torch.tensor(row_exp if row_exp is not None else [-6] * T, dtype=torch.float32)
    return q * torch.exp2(e)[:, None]
