"""Which implementation runs: the backend setting, the compiled module fp8kern._C and its kernel families, the
families verified on a GPU, and the per-process switches (value checks, printing the path taken).

FP8KERN_BACKEND=auto|reference|sm89|sm90|torch|dequant|cpu picks at import (fp8kern.set_backend changes it later);
FP8KERN_PRINT_CONFIG=1 prints the path taken for each new problem shape. The GEMM path for a call (a compiled
family, torch's FP8 GEMM, the dequantizing GEMM or the reference) is decided in ops/gemm.py: gemm_path.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

try:
    from . import _C
    _C_ERROR = None
except ImportError as e:  # pure-Python install, a build without nvcc, or the module failed to load
    _C = None
    _C_ERROR = e
try:
    from . import _cpu
    _CPU_ERROR = None
except ImportError as e:  # pure-Python install (no C++ compiler), or the module failed to load
    _cpu = None
    _CPU_ERROR = e

# auto: the best verified path for the device; reference: the pure-PyTorch oracle; sm89 / sm90: a compiled kernel
# family, verified or not; torch: torch's own FP8 GEMM (torch._scaled_mm); dequant: dequantize, then the ordinary GEMM;
# cpu: the compiled CPU family (CPU tensors; what auto takes there).
BACKENDS = ("auto", "reference", "sm89", "sm90", "torch", "dequant", "cpu")
# Compiled targets, listed in errors: the GEMM families and the GPUs they serve.
SUPPORTED = "sm_89 (Ada: L4, L40S, RTX 4090) and sm_90a (Hopper: H100, H200)"


def _env_cpu_isa() -> None:
    """FP8KERN_CPU_ISA=avx512|avx2|generic forces the CPU family's instruction set (auto: the best this CPU runs)."""
    name = os.environ.get("FP8KERN_CPU_ISA", "").strip().lower()
    if name and _cpu is not None:
        try:
            _cpu.set_isa(name)
        except ValueError as e:
            raise ValueError(f"FP8KERN_CPU_ISA={name!r}: {e}") from e


def _env_backend() -> str:
    name = os.environ.get("FP8KERN_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"FP8KERN_BACKEND={name!r}, expected one of {BACKENDS}")
    return name


_state = {"backend": _env_backend(), "print_config": os.environ.get("FP8KERN_PRINT_CONFIG", "") == "1",
          "check_values": os.environ.get("FP8KERN_CHECK_VALUES", "") == "1", "seen": set(), "warned": set()}


def set_backend(name: str) -> None:
    """Force a GEMM path: 'auto' (default), 'reference', 'sm89', 'sm90' (CUDA tensors), 'cpu' (CPU tensors), 'torch'
    or 'dequant' (any device)."""
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}, expected one of {BACKENDS}")
    _state["backend"] = name


def get_backend() -> str:
    return _state["backend"]


def set_value_checks(enabled: bool) -> None:
    """Check scale values (finite, > 0) of CUDA tensors too. Costs a device synchronization per call, so it is
    off by default on CUDA (CPU tensors are always checked); FP8KERN_CHECK_VALUES=1 turns it on at import."""
    _state["check_values"] = bool(enabled)


def value_checks_on(device: torch.device) -> bool:
    """Whether a call on `device` checks values (reading them on the host). CUDA checks cannot run inside a CUDA
    graph capture (a host read fails it): there they raise, saying so, instead of the capture's own error."""
    if device.type == "cpu":
        return True
    if _state["check_values"] and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("fp8kern: value checks (FP8KERN_CHECK_VALUES=1 / set_value_checks(True)) read values on "
                           "the host, which a CUDA graph capture does not allow; call fp8kern.set_value_checks(False) "
                           "before capturing")
    return _state["check_values"]


_env_cpu_isa()


def cpu_family_reason() -> str | None:
    """Why the CPU family cannot run here (None when it can)."""
    if _cpu is None:
        return (f"fp8kern._cpu is not built ({_CPU_ERROR}); reinstall fp8kern on a machine with a C++17 compiler "
                "(pip install .)")
    return None


def cpu_quant_available() -> bool:
    """Whether fp8kern.quantize of CPU tensors runs the CPU family (backend 'auto' or 'cpu' with fp8kern._cpu built);
    other backends keep the reference, the oracle."""
    backend = _state["backend"]
    return _cpu is not None and (backend == "cpu" or (backend == "auto" and "cpu" in VERIFIED_FAMILIES))


def cpu_isa() -> str | None:
    """The CPU family's instruction set in use ('avx512', 'avx2' or 'generic'), None without the family."""
    return _cpu.isa() if _cpu is not None else None


def set_cpu_isa(name: str) -> None:
    """Force the CPU family's instruction set: 'avx512', 'avx2', 'generic', or 'auto' (the best this CPU runs). A
    set this CPU lacks is a ValueError (FP8KERN_CPU_ISA does the same at import)."""
    if _cpu is None:
        raise RuntimeError(cpu_family_reason())
    _cpu.set_isa(name)


def compiled_archs() -> list[str]:
    return _C.compiled_archs().split(",") if _C is not None else []


_arch_cache: dict = {}


def device_arch(device: torch.device) -> int:
    """Compute capability as major*10+minor, cached per device (it is asked on every call)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    arch = _arch_cache.get(index)
    if arch is None:
        major, minor = torch.cuda.get_device_capability(index)
        arch = _arch_cache[index] = major * 10 + minor
    return arch


def quant_kernels_available(device: torch.device) -> bool:
    """Whether fp8kern.quantize runs its fused kernels here: on a GPU of sm_89 or newer (their PTX is JIT-compiled
    above the compiled archs), once they are verified on a GPU ('quant' in VERIFIED_FAMILIES) or when
    FP8KERN_BACKEND names a kernel family (sm90 / sm89: an explicit choice of unverified kernels, as for GEMMs)."""
    if _C is None or device.type != "cuda" or device_arch(device) < 89:
        return False
    backend = _state["backend"]
    return backend in FAMILY_ARCH or (backend == "auto" and "quant" in VERIFIED_FAMILIES)


def quant_fallback_reason(device: torch.device) -> str | None:
    """Why fp8kern.quantize uses the reference on this CUDA device (None when that is what was asked for)."""
    if _state["backend"] == "reference":
        return None
    if _C is not None and device_arch(device) >= 89:
        return ("the fused quantization kernels have not been verified on a GPU yet; using the pure-PyTorch "
                "reference (correct, slower). FP8KERN_BACKEND=sm90 or sm89 runs them")
    return "no compiled quantization kernel for this GPU; using the pure-PyTorch reference (correct, slower)"


# Kernel families verified where they run, with backend 'auto' the only ones it takes (a compiled but unverified family
# runs only when FP8KERN_BACKEND names it):
# - GPU families, once their GPU tests and benchmark have passed on a lent GPU (results in benchmarks/results/): GEMM
#   families ('sm90', 'sm89') and 'quant' (the activation quantization kernels); none yet;
# - 'cpu', the CPU family: its tests run in CI on every instruction set the CI machine has (tests/test_cpu_family.py,
#   tests/cpu/test_cpu_kernels.cpp, also for aarch64 under qemu); benchmark results in benchmarks/results/cpu_*.
VERIFIED_FAMILIES: frozenset = frozenset({"cpu"})
# The arch each family's kernels need.
FAMILY_ARCH = {"sm90": 90, "sm89": 89}


_families_of: list = [None, []]  # [the module asked, its families]: asked once per module, read on every call


def _families() -> list[str]:
    if _C is None:
        return []
    if _families_of[0] is not _C:
        _families_of[:] = [_C, list(_C.gemm_families())]
    return _families_of[1]


def compiled_families() -> list[str]:
    """GEMM families compiled into _C."""
    return list(_families())


def compiled_family(device: torch.device) -> str | None:
    """The compiled scaled_mm family that runs on this device: under 'auto' a verified family for its arch (sm_90 ->
    sm90, sm_89 -> sm89), under 'sm90' / 'sm89' that family even unverified (with a warning once; an error naming the
    reason where it cannot run here), else None (the CPU, other backends, or no verified family for this GPU)."""
    backend = _state["backend"]
    if device.type != "cuda" or backend not in ("auto", "sm90", "sm89"):
        return None
    arch = device_arch(device)
    families = _families()
    want = ("sm90" if arch == 90 else "sm89" if arch == 89 else None) if backend == "auto" else backend
    usable = want in families and (arch == FAMILY_ARCH[want] if want == "sm90" else arch >= FAMILY_ARCH.get(want, 99))
    if backend == "auto":
        return want if usable and want in VERIFIED_FAMILIES else None
    if usable:
        if want not in VERIFIED_FAMILIES:
            warn_once(f"unverified-{want}", f"fp8kern: the {want} GEMM kernels have not been verified on a GPU yet "
                                            "(running them because FP8KERN_BACKEND selects them)")
        return want
    name = torch.cuda.get_device_name(device)
    why = (f"fp8kern._C is not built ({_C_ERROR})" if _C is None
           else f"compiled GEMM families: {', '.join(families) or 'none'}; {want} needs sm_{FAMILY_ARCH[want]}"
                + ("" if want == "sm90" else " or newer"))
    raise NotImplementedError(
        f"FP8KERN_BACKEND={backend}: fp8kern's {backend} kernels cannot run on {name} (sm_{arch}): {why}. Supported "
        f"targets: {SUPPORTED}. Unset FP8KERN_BACKEND (or fp8kern.set_backend('auto')) for the best path this GPU has.")


def device_label(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3 (sm_90)': a CUDA device as messages name it."""
    return f"{torch.cuda.get_device_name(device)} (sm_{device_arch(device)})"


def config_name(family: str, M: int, N: int, K: int, sm_count: int) -> str:
    """Name of the kernel config select_config picks for a problem on a GPU with sm_count multiprocessors (needs the
    compiled module, not a GPU)."""
    return _C.gemm_configs(family)[_C.gemm_select_config(family, M, N, K, sm_count)]


def sm_count(device: torch.device) -> int:
    """Multiprocessor count of a CUDA device (cached)."""
    index = torch.cuda.current_device() if device.index is None else device.index
    n = _sm_counts.get(index)
    if n is None:
        n = _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return n


_sm_counts: dict = {}

# The current stream's raw handle: torch's internal getter where the build has it (a fraction of the cost of
# torch.cuda.current_stream, which builds a Stream object per call), else the public API.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def current_stream(index: int) -> int:
    """cudaStream_t of the current stream on CUDA device `index`, as an int."""
    if _raw_stream is not None:
        return _raw_stream(index)
    return torch.cuda.current_stream(index).cuda_stream


def note_path(op: str, key: tuple, path: str) -> None:
    """FP8KERN_PRINT_CONFIG=1: print the path chosen the first time a problem shape is seen."""
    if _state["print_config"] and (op, key) not in _state["seen"]:
        _state["seen"].add((op, key))
        print(f"fp8kern: {op} {key} -> {path}", file=sys.stderr)


def warn_once(key: str, message: str) -> None:
    if key not in _state["warned"]:
        _state["warned"].add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
