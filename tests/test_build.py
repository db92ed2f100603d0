"""The compiled module: built when CUDA is required, holding device code for every requested arch."""

import glob
import os
import shutil
import subprocess

import pytest

import fp8kern
from fp8kern import _backend

REQUIRED = os.environ.get("FP8KERN_REQUIRE_CUDA", "") == "1"


def test_compiled_module_present_when_required():
    if not REQUIRED:
        pytest.skip("FP8KERN_REQUIRE_CUDA is not set; a reference-only install is allowed")
    assert _backend._C is not None, f"fp8kern._C failed to import: {_backend._C_ERROR}"
    want = os.environ.get("FP8KERN_CUDA_ARCHS", "89;90a").split(";")
    assert fp8kern.info()["compiled_archs"] == want


def _cuobjdump(*args: str) -> str:
    """cuobjdump's listing of the compiled module. A module with device code that cannot be read is a broken set-up
    (tools/run.sh installs cuobjdump and nvdisasm from their wheels), so a missing or failing tool fails the test."""
    tool = shutil.which("cuobjdump")
    if tool is None:
        pytest.fail("fp8kern._C holds device code but cuobjdump is not on PATH: run the tests through "
                    "tools/run.sh, or pip install -r requirements-dev.txt and put site-packages/nvidia/cu*/bin on PATH")
    run = subprocess.run([tool, *args], capture_output=True, text=True)
    if run.returncode != 0:
        pytest.fail(f"cuobjdump {' '.join(args[:-1])} failed (exit {run.returncode}): {run.stderr.strip()[:500]} "
                    "(-sass needs nvdisasm beside cuobjdump: pip install -r requirements-dev.txt)")
    return run.stdout


def test_device_code_for_each_arch():
    """cuobjdump --list-elf lists one cubin per kernel file and arch (sm_89 and sm_90a by default)."""
    if _backend._C is None:
        pytest.skip("fp8kern._C is not built (no nvcc: the pure-Python install)")
    listing = _cuobjdump("--list-elf", _backend._C.__file__)
    sources = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(
        os.path.dirname(__file__), "..", "csrc", "**", "*.cu"), recursive=True))
    assert sources, "no .cu sources found"
    archs = _backend.compiled_archs()
    for src in sources:
        # Hopper kernels (wgmma, TMA) are built for sm_90a only; everything else for every requested arch.
        for arch in (["90a"] if "_sm90" in src else archs):
            if arch in archs:
                assert f"{src}.sm_{arch}.cubin" in listing, f"{src} has no sm_{arch} device code:\n{listing}"


def _sass_kernels(arch: str, name_fragment: str) -> list[str]:
    """SASS blocks (one per kernel) of the compiled module for arch whose mangled name holds name_fragment."""
    if _backend._C is None or arch not in _backend.compiled_archs():
        pytest.skip(f"no sm_{arch} code in this build")
    sass = _cuobjdump("-sass", "-arch", f"sm_{arch}", _backend._C.__file__)
    return [blk for blk in sass.split("Function : ")[1:] if name_fragment in blk.split("\n", 1)[0]]


def test_sm90_sass_has_fp8_wgmma():
    """The Hopper kernels run FP8 WGMMA (QGMMA ... E4M3.E4M3 in SASS), not a slow fallback."""
    kernels = _sass_kernels("90a", "GemmUniversal")
    assert kernels, "no CUTLASS GEMM kernels in the sm_90a code"
    for blk in kernels:
        assert "QGMMA" in blk and "E4M3.E4M3" in blk, f"kernel without FP8 WGMMA: {blk.splitlines()[0][:120]}"


# 3 tile configs x 3 output dtypes, per-token ones in both accumulation modes
@pytest.mark.parametrize("fragment,count", [("DefaultGemmWithVisitor", 18), ("blockwise_kernel", 9)])
def test_sm89_sass_has_fp8_mma(fragment, count):
    """The Ada kernels run FP8 mma.sync (QMMA.16832.F32.E4M3.E4M3 in sm_89 SASS): both families, three tile configs
    per output dtype each."""
    kernels = _sass_kernels("89", fragment)
    assert len(kernels) >= count, f"expected {count} sm89 {fragment} kernels in the sm_89 code, found {len(kernels)}"
    for blk in kernels:
        assert "QMMA.16832.F32.E4M3.E4M3" in blk, f"kernel without FP8 mma: {blk.splitlines()[0][:120]}"
