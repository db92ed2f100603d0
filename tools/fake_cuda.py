"""A pytest plugin that runs the GPU tests' own code on the CPU, to find bugs in the tests before device time is
spent on them. It checks the test code, not the kernels: fp8kern's reference path stands in for every kernel.

    PYTHONPATH=tools python -m pytest -p fake_cuda tests/test_gpu_quant.py tests/test_gpu_scaled_mm.py

What it emulates (a CUDA H100, sm_90, 132 SMs; FAKE_CAP / FAKE_SMS change that):
* "cuda" tensors are CPU tensors whose storage is tagged; tags propagate through every aten op (a
  TorchDispatchMode), .cuda() / .to("cuda") / factories with device="cuda" copy and tag, .cpu() copies and untags.
  Tagged tensors report device cuda:0, so library code that follows x.device stays "on the GPU".
* An op mixing "cuda" and CPU tensors (other than 0-d) raises, as torch does; .numpy() of a "cuda" tensor raises.
* CUDA graphs: capture records the aten ops, then poisons every output it allocated (NaN, or 0x7f bytes), and
  replay re-runs the ops into the same buffers, so a test passes only if its results come from replay; host
  synchronization or host copies during capture raise.
* fp8kern: gemm_family() runs its own logic (so backend errors are raised as on a GPU), then the reference runs;
  the quantization kernels are replaced by the reference too.
It cannot show anything about kernel accuracy, races, memory safety or speed.
"""

import contextlib
import functools
import os
import traceback
import types
import weakref

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

FAKE_SMS = int(os.environ.get("FAKE_SMS", "132"))
FAKE_CAP = tuple(int(v) for v in os.environ.get("FAKE_CAP", "9,0").split(","))
LOG = []  # notes for the report

_tagged = weakref.WeakSet()


def _st(t):
    try:
        return t.untyped_storage()
    except Exception:
        return None


def is_tagged(t):
    s = _st(t)
    return s is not None and s in _tagged


def tag(t):
    s = _st(t)
    if s is not None:
        _tagged.add(s)
    return t


def untag(t):
    s = _st(t)
    if s is not None:
        _tagged.discard(s)
    return t


def _is_cuda_dev(d):
    if d is None:
        return False
    if isinstance(d, str):
        return d.startswith("cuda")
    if isinstance(d, torch.device):
        return d.type == "cuda"
    if isinstance(d, int):
        return True  # device index -> cuda
    return False


class _Capture:
    graph = None
    replaying = False


CAP = _Capture()

ALLOW_MIX = {torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default, torch.ops.aten.index.Tensor,
             torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default, torch.ops.aten.lift_fresh.default,
             torch.ops.aten.set_.source_Storage_storage_offset, torch.ops.aten.set_.source_Tensor}
SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default, torch.ops.aten.equal.default,
            torch.ops.aten.is_nonzero.default, torch.ops.aten.masked_select.default, torch.ops.aten.item.default}


def _in_fp8kern_internal():
    """True when the innermost non-torch frame is inside fp8kern (the stand-in for a kernel)."""
    for fr in reversed(traceback.extract_stack()[:-3]):
        fn = fr.filename
        if "/torch/" in fn or fn.endswith("fake_cuda.py"):
            continue
        return "/fp8kern/" in fn and "/tests/" not in fn
    return False


class FakeCudaMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        make_cuda = False
        if _is_cuda_dev(kwargs.get("device")):
            kwargs["device"] = torch.device("cpu")
            make_cuda = True
        flat = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        tags = [is_tagged(t) for t in flat]
        any_tag = any(tags)
        if any_tag and not all(tags) and func not in ALLOW_MIX:
            bad = [tuple(t.shape) for t, tg in zip(flat, tags) if not tg and t.dim() > 0]
            if bad:
                where = "fp8kern-internal" if _in_fp8kern_internal() else "TEST/TOOL CODE"
                msg = (f"[fakecuda] cross-device op {func} ({where}): cuda and cpu tensors, cpu shapes {bad}")
                LOG.append(msg)
                raise RuntimeError("Expected all tensors to be on the same device " + msg)
        if CAP.graph is not None and not CAP.replaying:
            if func in SYNC_OPS and any_tag:
                raise RuntimeError(f"[fakecuda] {func} on a cuda tensor during CUDA graph capture "
                                   "(operation not permitted when stream is capturing)")
        out = func(*args, **kwargs)
        if (any_tag or make_cuda) and func is not torch.ops.aten.copy_.default:
            for o in pytree.tree_leaves(out):
                if isinstance(o, torch.Tensor):
                    tag(o)
        if CAP.graph is not None and not CAP.replaying and (any_tag or make_cuda):
            CAP.graph._record(func, args, kwargs, out)
        return out


# ---------------------------------------------------------------------------------------------------------- tensor API
_orig_to = torch.Tensor.to
_orig_cpu = torch.Tensor.cpu
_orig_numpy = torch.Tensor.numpy
_orig_deepcopy = torch.Tensor.__deepcopy__


def _capture_copy_check(what):
    if CAP.graph is not None and not CAP.replaying:
        raise RuntimeError(f"[fakecuda] {what} during CUDA graph capture (host<->device copy not capturable)")


def _to_cuda_copy(t, dtype=None):
    if is_tagged(t):
        return t if dtype is None or dtype == t.dtype else _orig_to(t, dtype=dtype)
    _capture_copy_check("host->device copy")
    r = t.detach().clone() if dtype is None or dtype == t.dtype else _orig_to(t, dtype=dtype, copy=True)
    if t.requires_grad and r.is_leaf:
        r.requires_grad_(t.requires_grad)
    return tag(r)


def _to_cpu_copy(t, dtype=None):
    if not is_tagged(t):
        return t if dtype is None or dtype == t.dtype else _orig_to(t, dtype=dtype)
    _capture_copy_check("device->host copy")
    with _no_mode():
        r = t.clone() if dtype is None or dtype == t.dtype else _orig_to(t, dtype=dtype, copy=True)
    return untag(r)


def _patched_to(self, *args, **kwargs):
    device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
    if device is None:
        return _orig_to(self, *args, **kwargs)
    if device.type == "cuda":
        return _to_cuda_copy(self, dtype)
    if device.type == "cpu":
        return _to_cpu_copy(self, dtype)
    return _orig_to(self, *args, **kwargs)


def _patched_cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
    return _to_cuda_copy(self)


def _patched_cpu(self, memory_format=torch.preserve_format):
    return _to_cpu_copy(self)


def _patched_numpy(self, *a, **k):
    if is_tagged(self):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to "
                        "host memory first. [fakecuda]")
    return _orig_numpy(self, *a, **k)


def _patched_deepcopy(self, memo):
    r = _orig_deepcopy(self, memo)
    if is_tagged(self):
        tag(r)
    return r


_orig_device = torch._C.TensorBase.device
_orig_is_cuda = torch._C.TensorBase.is_cuda


def _dev(self):
    return torch.device("cuda", 0) if is_tagged(self) else _orig_device.__get__(self)


@contextlib.contextmanager
def _no_mode():
    with torch.utils._python_dispatch._disable_current_modes():
        yield


# ----------------------------------------------------------------------------------------------------- torch.cuda API
class FakeStream:
    _n = 0

    def __init__(self, device=None, priority=0, **kw):
        FakeStream._n += 1
        self.cuda_stream = FakeStream._n
        self.device = torch.device("cuda", 0)

    def wait_stream(self, s):
        pass

    def wait_event(self, e):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def record_event(self, event=None):
        return event or FakeEvent()

    def __eq__(self, o):
        return isinstance(o, FakeStream) and o.cuda_stream == self.cuda_stream

    def __hash__(self):
        return self.cuda_stream


_default_stream = FakeStream()
_current = [_default_stream]


@contextlib.contextmanager
def _stream_ctx(s):
    prev = _current[0]
    if s is not None:
        _current[0] = s
    try:
        yield
    finally:
        _current[0] = prev


class FakeEvent:
    _t = 0.0

    def __init__(self, enable_timing=False, blocking=False, interprocess=False):
        self.t = None

    def record(self, stream=None):
        FakeEvent._t += 1.0
        self.t = FakeEvent._t

    def synchronize(self):
        pass

    def query(self):
        return True

    def wait(self, stream=None):
        pass

    def elapsed_time(self, other):
        if self.t is None or other.t is None:
            raise RuntimeError("[fakecuda] elapsed_time on an unrecorded event")
        return 0.01 * (other.t - self.t)


def _poison(t):
    with _no_mode():
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e8m0fnu, torch.uint8, torch.int8):
            t.view(torch.uint8).fill_(0x7F if t.dtype != torch.float8_e8m0fnu else 0xFF)
        elif t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype == torch.bool:
            t.fill_(True)
        else:
            t.fill_(0x5A5A)


class FakeCUDAGraph:
    def __init__(self, *a, **k):
        self.records = []
        self.captured = False

    def _record(self, func, args, kwargs, out):
        outs = [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        alias = []
        rets = func._schema.returns
        for i, o in enumerate(outs):
            ai = rets[i].alias_info if i < len(rets) else None
            alias.append(ai is not None)
        self.records.append((func, args, kwargs, outs, alias))

    def capture_begin(self, *a, **k):
        pass

    def capture_end(self):
        pass

    def replay(self):
        if not self.captured:
            raise RuntimeError("[fakecuda] replay of a graph that was never captured")
        CAP.replaying = True
        try:
            for func, args, kwargs, outs, alias in self.records:
                res = func(*args, **kwargs)
                rl = [r for r in pytree.tree_leaves(res) if isinstance(r, torch.Tensor)]
                with _no_mode():
                    for o, r, a in zip(outs, rl, alias):
                        if not a and o.untyped_storage().data_ptr() != r.untyped_storage().data_ptr():
                            o.copy_(r)
        finally:
            CAP.replaying = False

    def reset(self):
        self.records = []

    def pool(self):
        return (0, 0)


@contextlib.contextmanager
def _graph_ctx(cuda_graph, pool=None, stream=None, capture_error_mode="global"):
    if CAP.graph is not None:
        raise RuntimeError("[fakecuda] nested capture")
    CAP.graph = cuda_graph
    side = stream or FakeStream()
    try:
        with _stream_ctx(side):
            yield cuda_graph
    finally:
        CAP.graph = None
    cuda_graph.captured = True
    # Real capture runs nothing: poison every fresh output so only replay can fill them.
    for func, args, kwargs, outs, alias in cuda_graph.records:
        for o, a in zip(outs, alias):
            if not a:
                _poison(o)


def _factory(fn):
    @functools.wraps(fn)
    def w(*args, **kwargs):
        d = kwargs.get("device")
        if _is_cuda_dev(d):
            kwargs["device"] = "cpu"
            if fn.__name__ in ("tensor", "as_tensor") and CAP.graph is not None and not CAP.replaying:
                raise RuntimeError("[fakecuda] torch.tensor(..., device='cuda') during capture (H2D copy)")
            return tag(fn(*args, **kwargs))
        return fn(*args, **kwargs)
    return w


class _CpuGenerator(torch.Generator):
    """torch.Generator(device="cuda") -> a CPU generator (the "cuda" tensors live on the CPU)."""

    def __new__(cls, device=None):
        return torch._C.Generator.__new__(cls, "cpu")

    def __init__(self, device=None):
        pass


def install():
    tc = torch.cuda
    tc.is_available = lambda: True
    tc.device_count = lambda: 1
    tc.current_device = lambda: 0
    tc.is_initialized = lambda: True
    tc._lazy_init = lambda: None
    tc.init = lambda: None
    tc.get_device_capability = lambda device=None: FAKE_CAP
    tc.get_device_name = lambda device=None: "NVIDIA H100 80GB HBM3 [fakecuda]"
    tc.get_device_properties = lambda device=None: types.SimpleNamespace(
        multi_processor_count=FAKE_SMS, total_memory=80 << 30, name="NVIDIA H100 [fakecuda]", major=FAKE_CAP[0],
        minor=FAKE_CAP[1], L2_cache_size=50 << 20)
    tc.synchronize = lambda device=None: None
    tc._sleep = lambda cycles: None
    tc.Stream = FakeStream
    tc.Event = FakeEvent
    tc.stream = _stream_ctx
    tc.current_stream = lambda device=None: _current[0]
    tc.default_stream = lambda device=None: _default_stream
    tc.CUDAGraph = FakeCUDAGraph
    tc.graph = _graph_ctx
    tc.is_current_stream_capturing = lambda: CAP.graph is not None and not CAP.replaying
    tc.device = lambda d=None: contextlib.nullcontext()
    tc.set_device = lambda d: None
    tc.manual_seed = lambda seed: None
    tc.manual_seed_all = lambda seed: None
    tc.empty_cache = lambda: None
    tc.memory_allocated = lambda device=None: 0
    tc.max_memory_allocated = lambda device=None: 0
    tc.reset_peak_memory_stats = lambda device=None: None
    for name in ("empty", "zeros", "ones", "full", "randn", "rand", "randint", "arange", "tensor", "as_tensor",
                 "empty_strided", "linspace", "eye", "zeros_like", "ones_like", "empty_like", "full_like",
                 "randn_like", "rand_like", "randperm", "normal"):
        setattr(torch, name, _factory(getattr(torch, name)))
    torch.Generator = _CpuGenerator
    torch.Tensor.to = _patched_to
    torch.Tensor.cuda = _patched_cuda
    torch.Tensor.cpu = _patched_cpu
    torch.Tensor.numpy = _patched_numpy
    torch.Tensor.__deepcopy__ = _patched_deepcopy
    torch.Tensor.device = property(_dev)
    torch.Tensor.is_cuda = property(lambda self: is_tagged(self))
    torch.Tensor.get_device = lambda self: 0 if is_tagged(self) else -1
    torch.Tensor.record_stream = lambda self, s: None
    torch.Tensor.pin_memory = lambda self, *a: self
    FakeCudaMode().__enter__()  # global, never exited

    os.environ.setdefault("FP8KERN_BACKEND", "auto")
    os.environ["FP8KERN_FAKE_CUDA"] = "1"  # tests that assert a kernel path is taken know it is not
    from fp8kern import _backend
    orig_family = _backend.gemm_family

    def gemm_family(device):
        fam = orig_family(device)  # raises as on the GPU (e.g. backend 'auto' with no verified family)
        if fam is not None:
            LOG.append(f"gemm family {fam} -> reference stand-in")
        return None

    _backend.gemm_family = gemm_family
    _backend.quant_kernels_available = lambda device: False
    # the reference path warns 'no compiled quantization kernel' on "cuda"; that warning is a harness artifact
    import warnings
    warnings.filterwarnings("ignore", message="fp8kern: no compiled quantization kernel")
    warnings.filterwarnings("ignore", message="fp8kern: the fused quantization kernels have not been verified")


install()


def pytest_terminal_summary(terminalreporter):
    msgs = sorted({m for m in LOG if "cross-device" in m})
    if msgs:
        terminalreporter.write_line("fakecuda cross-device ops:")
        for m in msgs:
            terminalreporter.write_line("  " + m)
