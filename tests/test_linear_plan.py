"""Fp8Linear's plan (ops/linear_plan.py): the planned forward computes what the unplanned one does, bit for bit,
and a plan is never used after what it was built from changed: every cached fact is re-checked when it can change
(weights replaced by load_state_dict, .to(), assignment or .data; scales changed in place; the backend switched;
inference tensors, which track no version, never planned)."""

import copy
import io

import pytest
import torch

import fp8kern
from fp8kern import _backend
from fp8kern.ops import linear_plan

SCHEMES = ["dynamic_per_token", "dynamic_per_tensor", "static_per_tensor", "block128"]


def layer(scheme, K=300, N=131, bias=True, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g) / 16)
        if bias:
            lin.bias.copy_(torch.randn(N, generator=g))
    lin = lin.bfloat16()
    extra = {"input_scale": 0.02} if scheme.startswith("static") else {}
    return fp8kern.nn.Fp8Linear.from_linear(lin, scheme, **extra, **kw)


def unplanned(m, x):
    """The forward without a plan (what every other path and torch.compile run)."""
    saved = linear_plan.linear_runner
    try:
        linear_plan_off()
        return m(x)
    finally:
        fp8kern.nn.linear_runner = saved


def linear_plan_off():
    fp8kern.nn.linear_runner = lambda module: None


def planned(m):
    return m.__dict__.get("_plan") is not None and m.__dict__["_plan"].run is not None


@pytest.mark.parametrize("scheme", SCHEMES + ["block128-ue8m0"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_planned_equals_unplanned(scheme, dtype):
    """Same operations (quantize, then the GEMM), so the same bits, for 2-D, 3-D, strided, one-row and empty inputs."""
    kw = {"scale_format": "ue8m0"} if scheme.endswith("ue8m0") else {}
    m = layer(scheme.replace("-ue8m0", ""), **kw).to(dtype)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(7, 300, generator=g), torch.randn(2, 3, 300, generator=g), torch.randn(1, 300, generator=g),
          torch.randn(5, 600, generator=g)[:, ::2], torch.randn(4, 310, generator=g)[:, :300],
          torch.randn(0, 300, generator=g)]
    for x in xs:
        x = x.to(dtype)
        y = m(x)
        assert planned(m)
        ref = unplanned(m, x)
        assert y.shape == ref.shape == (*x.shape[:-1], 131) and y.dtype == dtype
        assert torch.equal(y.view(torch.uint8) if y.numel() else y, ref.view(torch.uint8) if ref.numel() else ref)


@pytest.mark.parametrize("scheme", ["dynamic_per_token", "block128-ue8m0"])
def test_load_state_dict_rebuilds_the_plan(scheme):
    """load_state_dict copies into the same tensors: their version counters move, so the next forward re-plans and
    uses the new weights, scales and bias. The cases hold derived copies a stale plan would reuse: the bias cast to
    an fp32 input's dtype, and UE8M0 block scales converted to fp32."""
    kw = {"scale_format": "ue8m0"} if scheme.endswith("ue8m0") else {}
    name = scheme.replace("-ue8m0", "")
    m, other = layer(name, seed=0, **kw), layer(name, seed=5, **kw)
    x = torch.randn(3, 300).float()
    before = m(x)
    m.load_state_dict(other.state_dict())
    after = m(x)
    assert torch.equal(after, other(x))
    assert not torch.equal(after, before)


@pytest.mark.parametrize("change", ["to_float", "assign", "data", "bias_inplace", "deepcopy"])
def test_replaced_tensors_rebuild_the_plan(change):
    m = layer("block128", seed=0, bias=change == "bias_inplace")
    other = layer("block128", seed=3, bias=False)
    x = torch.randn(2, 300).bfloat16()
    m(x)
    if change == "to_float":  # new tensors (the e4m3 weight keeps its dtype); output follows the input dtype
        m = m.float()
        assert torch.equal(m(x.float()), unplanned(m, x.float()))
    elif change == "bias_inplace":
        with torch.no_grad():
            m.bias.add_(1.0)
        assert torch.equal(m(x), unplanned(copy.deepcopy(m), x))
    elif change == "deepcopy":
        m2 = copy.deepcopy(m)
        assert torch.equal(m2(x), m(x))
        with torch.no_grad():
            m2.weight_scale.mul_(2)
        assert not torch.equal(m2(x), m(x))
    else:
        if change == "assign":
            m.weight = other.weight.clone()
            m.weight_scale = other.weight_scale.clone()
        else:  # same tensor objects, new storage (the old one freed): the data address is part of the key
            m.weight.data = other.weight.clone()
            m.weight_scale.data = other.weight_scale.clone()
        assert torch.equal(m(x), other(x))


def test_scale_values_rechecked_when_changed_in_place():
    """The weight scale's values are checked once per plan: an in-place change moves the version, so a NaN written
    after the first forward is still refused, with the message every path gives."""
    m = layer("dynamic_per_token")
    x = torch.randn(2, 300).bfloat16()
    m(x)
    with torch.no_grad():
        m.weight_scale[7] = float("nan")
    with pytest.raises(ValueError, match=r"scale_b holds 1 non-finite or non-positive value\(s\) \(first at flat "
                                         r"index 7: nan\)"):
        m(x)
    s = layer("static_per_tensor")
    s(x)
    with torch.no_grad():
        s.input_scale.fill_(0.0)
    with pytest.raises(ValueError, match="scale holds 1 non-finite or non-positive"):
        s(x)


def test_backend_switch_rebuilds_the_plan():
    m = layer("dynamic_per_token")
    x = torch.randn(2, 300).bfloat16()
    m(x)
    try:
        fp8kern.set_backend("reference")
        y = m(x)
        assert m.__dict__["_plan"].run is None  # the reference is not planned
        q, s = fp8kern.reference.quantize(x)
        assert torch.equal(y, fp8kern.reference.scaled_mm(q, m.weight, s, m.weight_scale, torch.bfloat16, m.bias))
    finally:
        fp8kern.set_backend("auto")
    m(x)
    assert planned(m)


def test_inference_tensors_are_not_planned():
    with torch.inference_mode():
        m = layer("dynamic_per_token")
        x = torch.randn(2, 300).bfloat16()
        y = m(x)
    assert m.__dict__.get("_plan") is None
    assert torch.equal(y, unplanned(m, x))


def test_save_and_deepcopy_drop_the_plan():
    """The plan holds launch closures: torch.save and copy.deepcopy leave it out, and the copy plans its own."""
    m = layer("block128")
    x = torch.randn(2, 300).bfloat16()
    y = m(x)
    m2 = copy.deepcopy(m)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    m3 = torch.load(buf, weights_only=False)
    assert m2.__dict__.get("_plan") is None and torch.equal(m2(x), y) and torch.equal(m3(x), y)


def test_input_errors_unchanged():
    """Per call only the input is checked; its errors are those of the unplanned forward."""
    m = layer("dynamic_per_token")
    m(torch.randn(2, 300).bfloat16())
    with pytest.raises(ValueError, match="input has 299 features in the last dim, expected 300"):
        m(torch.randn(2, 299).bfloat16())
    with pytest.raises(TypeError, match="input dtype torch.float64"):
        m(torch.randn(2, 300, dtype=torch.float64))
    with pytest.raises(ValueError, match="is on meta but a is on cpu|is on cpu but a is on meta"):
        m(torch.empty(2, 300, dtype=torch.bfloat16, device="meta"))


def test_native_linear_validation():
    """The C++ side validates the fused call again: a bad group size or stride is a ValueError, not a crash."""
    x = torch.zeros(4, 64, dtype=torch.bfloat16)
    w = torch.zeros(8, 64, dtype=torch.float8_e4m3fn)
    s = torch.ones(8)
    d = torch.empty(4, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="group quantization goes with block scales"):
        _backend._cpu.linear(1, x.data_ptr(), 2, 4, 64, 64, False, 0, 0.0, w.data_ptr(), 8, 64, s.data_ptr(), True,
                             False, 0, d.data_ptr(), 8, 2, 0, 1)
    with pytest.raises(ValueError, match="ldd=3 is shorter than a row of D"):
        _backend._cpu.linear(0, x.data_ptr(), 2, 4, 64, 64, False, 0, 0.0, w.data_ptr(), 8, 64, s.data_ptr(), True,
                             False, 0, d.data_ptr(), 3, 2, 0, 1)
