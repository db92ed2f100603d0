"""A pytest plugin that runs the GPU tests' own code on the CPU, to find bugs in the tests and in fp8kern's launch
glue before device time is spent on them. It checks everything up to the kernels, not the kernels themselves.

    PYTHONPATH=tools python -m pytest -p fake_cuda tests/test_gpu_quant.py tests/test_gpu_scaled_mm.py tests/test_gpu_experts.py

What it emulates (a CUDA H100, sm_90, 132 SMs; FAKE_CAP / FAKE_SMS change that):
* "cuda" tensors are CPU tensors whose storage is tagged; tags propagate through every aten op (a
  TorchDispatchMode), .cuda() / .to("cuda") / factories with device="cuda" copy and tag, .cpu() copies and untags.
  Tagged tensors report device cuda:0, so library code that follows x.device stays "on the GPU".
* An op mixing "cuda" and CPU tensors (other than 0-d) raises, as torch does; .numpy() of a "cuda" tensor raises.
* Uninitialized "cuda" memory (torch.empty and its kin) is filled with NaN (or 0x7f bytes): reads of memory nothing
  wrote show up as they would on a GPU, where it holds leftovers.
* CUDA graphs: capture records the aten ops, then poisons every output it allocated (NaN, or 0x7f bytes), and
  replay re-runs the ops into the same buffers, so a test passes only if its results come from replay; host
  synchronization, host copies and ops sized by device data (bincount, unique, boolean-mask indexing, ...) during
  capture raise.
* fp8kern's compiled module: every launch (GEMM, block GEMM, quantization, workspace query) goes through the real
  binding's validation, then is emulated from the raw addresses, strides and flags it was given (EmulatedC): the
  reference computes what the kernel's contract says, reading and writing only inside live "cuda" tensors (an
  address range outside them fails the test as an out-of-bounds launch). So fp8kern's Python kernel path (family
  choice, K and row-stride padding, out views, scale layouts, workspaces, capture) runs as it will on the GPU.
It cannot show anything about the kernels' own accuracy, races, memory safety or speed.
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

# Real GPUs are hidden (set before anything initializes CUDA), also on a GPU machine: the emulated launches rely on
# the compiled module finding no device, and no real kernel may ever run on the CPU addresses of these tensors.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
FAKE_SMS = int(os.environ.get("FAKE_SMS", "132"))
FAKE_CAP = tuple(int(v) for v in os.environ.get("FAKE_CAP", "9,0").split(","))
LOG = []  # notes for the report
# Emulated workspace of the grouped kernel (its argument arrays per group, TMA descriptors per SM).
GROUPED_WORKSPACE_PER_GROUP, GROUPED_WORKSPACE_PER_SM = 256, 256

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
# Ops that read device data on the host (or size their output from it), so a real capture fails on them.
SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default, torch.ops.aten.equal.default,
            torch.ops.aten.is_nonzero.default, torch.ops.aten.masked_select.default, torch.ops.aten.item.default,
            torch.ops.aten.argwhere.default, torch.ops.aten.bincount.default, torch.ops.aten._unique.default,
            torch.ops.aten._unique2.default, torch.ops.aten.unique_dim.default,
            torch.ops.aten.unique_consecutive.default, torch.ops.aten.masked_scatter.default}
# Indexing with a boolean (or uint8) mask runs nonzero inside the kernel, where this mode does not see it.
MASK_INDEX_OPS = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default,
                  torch.ops.aten._index_put_impl_.default}


def _syncs(func, args, kwargs) -> bool:
    if func in SYNC_OPS:
        return True
    if func in MASK_INDEX_OPS:
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    if func is torch.ops.aten.repeat_interleave.Tensor or func is torch.ops.aten.repeat_interleave.self_Tensor:
        return kwargs.get("output_size") is None  # its output size is the repeats' sum
    return False


def _in_fp8kern_internal():
    """True when the innermost non-torch frame is inside fp8kern (library code, not the test's)."""
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
            if any_tag and _syncs(func, args, kwargs):
                raise RuntimeError(f"[fakecuda] {func} on a cuda tensor during CUDA graph capture "
                                   "(operation not permitted when stream is capturing)")
        out = func(*args, **kwargs)
        if (any_tag or make_cuda) and func is not torch.ops.aten.copy_.default:
            for o in pytree.tree_leaves(out):
                if isinstance(o, torch.Tensor):
                    tag(o)
            if func in _EMPTY_OPS and (CAP.graph is None or CAP.replaying):
                _poison(out)
        if CAP.graph is not None and not CAP.replaying and (any_tag or make_cuda):
            CAP.graph._record(func, args, kwargs, out)
        return out


# ---------------------------------------------------------------------------------------------------------- tensor API
_orig_to = torch.Tensor.to
_orig_cpu = torch.Tensor.cpu
_orig_numpy = torch.Tensor.numpy
_orig_tolist = torch.Tensor.tolist
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


def _patched_tolist(self):
    if is_tagged(self):
        _capture_copy_check("Tensor.tolist (device->host copy)")
    return _orig_tolist(self)


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


# Uninitialized CUDA memory holds whatever was there: the fake device fills it with NaN (or 0x7f bytes), so code
# that reads memory it never wrote fails visibly, eagerly as in a capture.
_EMPTY_FACTORIES = ("empty", "empty_like", "empty_strided")
_EMPTY_OPS = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default, torch.ops.aten.new_empty.default,
              torch.ops.aten.empty_strided.default, torch.ops.aten.new_empty_strided.default}


def _factory(fn):
    @functools.wraps(fn)
    def w(*args, **kwargs):
        d = kwargs.get("device")
        if _is_cuda_dev(d):
            kwargs["device"] = "cpu"
            if fn.__name__ in ("tensor", "as_tensor") and CAP.graph is not None and not CAP.replaying:
                raise RuntimeError("[fakecuda] torch.tensor(..., device='cuda') during capture (H2D copy)")
            t = tag(fn(*args, **kwargs))
            if fn.__name__ in _EMPTY_FACTORIES and (CAP.graph is None or CAP.replaying):
                _poison(t)  # (a capture poisons every output anyway)
            return t
        return fn(*args, **kwargs)
    return w


class _CpuGenerator(torch.Generator):
    """torch.Generator(device="cuda") -> a CPU generator (the "cuda" tensors live on the CPU)."""

    def __new__(cls, device=None):
        return torch._C.Generator.__new__(cls, "cpu")

    def __init__(self, device=None):
        pass


# ------------------------------------------------------------------------------- launches of the compiled module
_DTYPES = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16, 3: torch.float8_e4m3fn, 4: torch.float8_e8m0fnu}
LAUNCHES = {"emulated": 0}
STREAMK_WORKSPACE = 4 * 128 * 128 * 8  # bytes an emulated stream-K config asks for (any non-zero size would do)


def _region(ptr, dtype, shape, strides, what):
    """A CPU tensor aliasing "device" memory at address ptr with this shape and element strides, after checking that
    every element it spans lies inside one live "cuda" tensor's storage (a launch argument pointing outside any is
    an out-of-bounds access on the GPU)."""
    item = dtype.itemsize
    span = 0 if 0 in shape else (1 + sum((n - 1) * st for n, st in zip(shape, strides))) * item
    if ptr % item:
        raise RuntimeError(f"[fakecuda] launch argument {what}: address {ptr:#x} not aligned to {item} bytes")
    for st in list(_tagged):
        base = st.data_ptr()
        if base <= ptr and ptr + span <= base + st.nbytes():
            with _no_mode():
                return torch.empty(0, dtype=dtype).set_(st, (ptr - base) // item, shape, strides)
    raise RuntimeError(f"[fakecuda] launch argument {what}: {span} bytes at {ptr:#x} ({tuple(shape)} with strides "
                       f"{tuple(strides)}) lie in no live CUDA tensor: out of bounds, or freed")


def _launch(device, stream, resolve, compute):
    """An emulated kernel launch: resolve() maps the raw arguments to bounds-checked views (inputs, outputs) and
    compute(*inputs) returns the outputs' values. It runs now; during CUDA graph capture it is only recorded (capture
    executes nothing, so the outputs are poisoned) and replay resolves the addresses again and runs it. Outputs
    beyond compute's values are scratch (workspaces): checked and poisoned, not written."""
    if device != 0:
        raise RuntimeError(f"[fakecuda] launch on device {device}, but the tensors are on cuda:0")
    if stream != _current[0].cuda_stream:
        raise RuntimeError(f"[fakecuda] launch on stream {stream:#x}, not the current stream "
                           f"{_current[0].cuda_stream:#x}")

    def run(views):
        inputs, outputs = views
        with _no_mode():
            values = compute(*inputs)
            for o, v in zip(outputs, values):
                o.copy_(v)

    views = resolve()  # the bounds are checked at launch (and capture) time
    LAUNCHES["emulated"] += 1
    if CAP.graph is not None and not CAP.replaying:
        # Replay resolves (and bounds-checks) the addresses again. The record holds the capture's views, so their
        # memory stays allocated until replay, as a graph's private memory pool keeps what the capture allocated
        # (such as a workspace freed right after the launch).
        CAP.graph.records.append((lambda _keep=views: run(resolve()), (), {}, [], []))
        for o in views[1]:
            _poison(o)
        return
    run(views)


def _config_name(family, m, n, k, config):
    from fp8kern import _backend
    real = _backend._C._real if isinstance(_backend._C, EmulatedC) else _backend._C
    if config < 0:
        config = real.gemm_select_config(family, m, n, k, FAKE_SMS)
    return real.gemm_configs(family)[config]


class EmulatedC:
    """fp8kern._C with its launches emulated on the CPU, so the GPU tests run fp8kern's whole kernel path (family
    choice, padding, strides, out views, scale layouts, workspaces, streams, graph capture) up to the kernel itself.
    Each launch first calls the real binding: its argument validation must accept the call (which then fails only
    to find a CUDA device, as expected here). Then the kernel's contract is computed from the raw addresses with
    the reference (so results match the reference by construction: this checks the glue, not the kernels), reading
    and writing only memory inside live "cuda" tensors. Not emulated: checks the kernels make once on the device
    (grid limits, shared memory), and the workspace size (stream-K configs ask for STREAMK_WORKSPACE bytes)."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    @staticmethod
    def _validate(fn, args):
        try:
            fn(*args)
        except RuntimeError as e:
            if "CUDA error" in str(e) and "bindings.cpp" in str(e):
                return  # validation passed; the launch stopped at the missing device
            raise
        raise RuntimeError("[fakecuda] the compiled module ran without a CUDA device")

    @staticmethod
    def _workspace_need(family, m, n, k, config):
        return STREAMK_WORKSPACE if "streamk" in _config_name(family, m, n, k, config) else 0

    def gemm_workspace_size(self, *args):
        self._validate(self._real.gemm_workspace_size, args)
        family, _device, _a, _b, _d, m, n, k = args[:8]
        return self._workspace_need(family, m, n, k, args[18])

    def block_workspace_size(self, *args):
        self._validate(self._real.block_workspace_size, args)
        family, _device, _a, _b, _d, m, n, k = args[:8]
        return self._workspace_need(family + "_block", m, n, k, args[15])

    def scaled_mm(self, *args):
        self._validate(self._real.scaled_mm, args)
        (family, device, a, b, d, m, n, k, lda, ldb, ldd, d_dtype, scale_a, a_vec, scale_b, b_vec, bias,
         _fast_accum, config, workspace, workspace_bytes, stream) = args
        from fp8kern.ops import Layout
        layout = Layout("token" if a_vec else "tensor", "channel" if b_vec else "tensor")
        scales = ((scale_a, (m if a_vec else 1,), (1,)), (scale_b, (n if b_vec else 1,), (1,)))
        self._gemm(family, device, stream, a, b, d, m, n, k, lda, ldb, ldd, _DTYPES[d_dtype], bias, config,
                   workspace, workspace_bytes, scales, layout)

    def scaled_mm_block(self, *args):
        self._validate(self._real.scaled_mm_block, args)
        (family, device, a, b, d, m, n, k, lda, ldb, ldd, d_dtype, scale_a, scale_b, bias, config, workspace,
         workspace_bytes, stream) = args
        from fp8kern.ops import Layout
        g, gn = -(-k // 128), -(-n // 128)
        scales = ((scale_a, (m, g), (g, 1)), (scale_b, (gn, g), (g, 1)))
        self._gemm(family + "_block", device, stream, a, b, d, m, n, k, lda, ldb, ldd, _DTYPES[d_dtype], bias,
                   config, workspace, workspace_bytes, scales, Layout("group", "block"))

    def _gemm(self, family, device, stream, a, b, d, m, n, k, lda, ldb, ldd, out_dtype, bias, config, workspace,
              workspace_bytes, scales, layout):
        from fp8kern import reference
        need = self._workspace_need(family, m, n, k, config)
        if workspace_bytes < need:
            raise RuntimeError(f"[fakecuda] {family}: needs {need} bytes of workspace, got {workspace_bytes}")
        (sa, sa_shape, sa_strides), (sb, sb_shape, sb_strides) = scales

        def resolve():  # outputs: d, then the workspace (scratch the kernel writes), if any
            scratch = (_region(workspace, torch.uint8, (workspace_bytes,), (1,), "workspace"),) if workspace_bytes else ()
            inputs = (_region(a, torch.float8_e4m3fn, (m, k), (lda, 1), "a"),
                      _region(b, torch.float8_e4m3fn, (n, k), (ldb, 1), "b"),
                      _region(sa, torch.float32, sa_shape, sa_strides, "scale_a"),
                      _region(sb, torch.float32, sb_shape, sb_strides, "scale_b"),
                      _region(bias, out_dtype, (n,), (1,), "bias") if bias else None)
            return inputs, (_region(d, out_dtype, (m, n), (ldd, 1), "d"),) + scratch

        _launch(device, stream, resolve,
                lambda A, B, SA, SB, bias_t: (reference.scaled_mm(A, B, SA, SB, out_dtype, bias_t, layout),))

    def grouped_workspace_size(self, *args):
        self._validate(self._real.grouped_workspace_size, args)
        groups = args[8]
        return GROUPED_WORKSPACE_PER_GROUP * groups + GROUPED_WORKSPACE_PER_SM * FAKE_SMS

    def grouped_mm(self, *args):
        self._validate(self._real.grouped_mm, args)
        (device, block, a, b, d, scale_a, scale_b, offsets, groups, rows, n, k, lda, ldd, d_dtype, workspace,
         workspace_bytes, stream) = args
        from fp8kern import reference
        from fp8kern.ops import Layout
        need = GROUPED_WORKSPACE_PER_GROUP * groups + GROUPED_WORKSPACE_PER_SM * FAKE_SMS
        if workspace_bytes < need:
            raise RuntimeError(f"[fakecuda] grouped_mm: needs {need} bytes of workspace, got {workspace_bytes}")
        out_dtype = _DTYPES[d_dtype]
        kb, nb = -(-k // 128), -(-n // 128)
        if block:
            sa_shape, sb_shape, layout = (rows, kb), (groups, nb, kb), Layout("group", "block")
        else:
            sa_shape, sb_shape, layout = (rows, 1), (groups, n, 1), Layout("token", "channel")

        def resolve():  # inputs, then outputs: d (read too: rows outside every group keep their values), workspace
            D = _region(d, out_dtype, (rows, n), (ldd, 1), "d")
            inputs = (_region(a, torch.float8_e4m3fn, (rows, k), (lda, 1), "a"),
                      _region(b, torch.float8_e4m3fn, (groups, n, k), (n * k, k, 1), "b"),
                      _region(scale_a, torch.float32, sa_shape, (sa_shape[1], 1), "scale_a"),
                      _region(scale_b, torch.float32, sb_shape, (sb_shape[1] * sb_shape[2], sb_shape[2], 1),
                              "scale_b"),
                      _region(offsets, torch.int64, (groups + 1,), (1,), "offsets"), D)
            return inputs, (D, _region(workspace, torch.uint8, (workspace_bytes,), (1,), "workspace"))

        def compute(A, B, SA, SB, offs, D):
            result = D.clone()
            for g in range(groups):  # the device-side clamp of each range into [0, rows]
                lo = min(max(int(offs[g]), 0), rows)
                hi = min(max(int(offs[g + 1]), lo), rows)
                if hi > lo:
                    result[lo:hi] = reference.scaled_mm(A[lo:hi], B[g], SA[lo:hi], SB[g], out_dtype, None, layout)
            return (result,)

        _launch(device, stream, resolve, compute)

    def linear(self, *args):
        """Fp8Linear's one-call layer: the real binding validates both problems; then the quantization and the GEMM
        are emulated as their own launches would be, with the arguments the binding derives (fp32 scales, q rows of
        `cols`, the GEMM's A = q and K = cols)."""
        self._validate(self._real.linear, args)
        (kind, device, x, x_dtype, rows, cols, x_rs, q, scale, s_rs, gs, q_ws, family, block, b, d, n, ldb, ldd,
         d_dtype, a_vec, scale_b, b_vec, bias, fast_accum, config, workspace, workspace_bytes, stream) = args
        from fp8kern._constants import DTYPE_CODE
        self.quantize(kind, device, x, x_dtype, rows, cols, x_rs, q, cols, scale, DTYPE_CODE[torch.float32], s_rs,
                      0 if kind == "static" else 1, gs, 0.0, q_ws, stream)
        if block:
            self.scaled_mm_block(family, device, q, b, d, rows, n, cols, cols, ldb, ldd, d_dtype, scale, scale_b,
                                 bias, config, workspace, workspace_bytes, stream)
        else:
            self.scaled_mm(family, device, q, b, d, rows, n, cols, cols, ldb, ldd, d_dtype, scale, a_vec, scale_b,
                           b_vec, bias, fast_accum, config, workspace, workspace_bytes, stream)

    def quantize(self, *args):
        self._validate(self._real.quantize, args)
        (kind, device, x, x_dtype, rows, cols, x_rs, q, q_rs, scale, s_dtype, s_rs, s_cs, gs, scale_ub, workspace,
         stream) = args
        from fp8kern import reference
        if kind == "static":  # the kernel reads scale[row * s_rs + (col / gs) * s_cs]: stride 0 broadcasts
            grid = (rows, -(-cols // gs) if s_cs else 1)
        else:
            grid = {"token": (rows, 1), "tensor": (1, 1), "group": (rows, -(-cols // gs))}[kind]
        s_type = _DTYPES[s_dtype]

        def resolve():  # outputs: q and a dynamic scale, then the per-tensor kind's workspace (scratch)
            scratch = (_region(workspace, torch.int32, (1,), (1,), "workspace"),) if kind == "tensor" else ()
            X = _region(x, _DTYPES[x_dtype], (rows, cols), (x_rs, 1), "x")
            Q = _region(q, torch.float8_e4m3fn, (rows, cols), (q_rs, 1), "q")
            S = _region(scale, s_type, grid, (s_rs, s_cs), "scale")
            return ((X, S), (Q,)) if kind == "static" else ((X,), (Q, S) + scratch)

        def compute(X, S=None):
            if kind == "static":
                return (reference.quantize(X, "group" if s_cs else "token", max(gs, 1), scale=S.clone())[0],)
            qr, sr = reference.quantize(X, kind, gs, scale_ub=scale_ub or None,
                                        scale_format="ue8m0" if s_type == torch.float8_e8m0fnu else "fp32")
            return qr, sr.reshape(grid)

        _launch(device, stream, resolve, compute)


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
    torch.Tensor.tolist = _patched_tolist
    torch.Tensor.__deepcopy__ = _patched_deepcopy
    torch.Tensor.device = property(_dev)
    torch.Tensor.is_cuda = property(lambda self: is_tagged(self))
    torch.Tensor.get_device = lambda self: 0 if is_tagged(self) else -1
    torch.Tensor.record_stream = lambda self, s: None
    torch.Tensor.pin_memory = lambda self, *a: self
    FakeCudaMode().__enter__()  # global, never exited

    os.environ.setdefault("FP8KERN_BACKEND", "auto")
    from fp8kern import _backend
    if _backend._C is None:
        raise RuntimeError("[fakecuda] fp8kern._C is not built: the kernel path cannot be emulated")
    _backend._C = EmulatedC(_backend._C)
    _backend._raw_stream = None  # torch's raw stream getter would ask the real CUDA runtime; use the fake streams
    # the reference path warns 'no compiled quantization kernel' on "cuda"; that warning is a harness artifact
    import warnings
    warnings.filterwarnings("ignore", message="fp8kern: no compiled quantization kernel")
    warnings.filterwarnings("ignore", message="fp8kern: the fused quantization kernels have not been verified")


install()


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"fakecuda: {LAUNCHES['emulated']} kernel launches emulated")
    msgs = sorted({m for m in LOG if "cross-device" in m})
    if msgs:
        terminalreporter.write_line("fakecuda cross-device ops:")
        for m in msgs:
            terminalreporter.write_line("  " + m)
