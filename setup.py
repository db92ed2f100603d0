"""Builds fp8kern's compiled modules with CMake (pybind11's cmake_example pattern): fp8kern._cpu, the CPU kernel family,
wherever a C++17 compiler exists, and fp8kern._C, the CUDA kernels, where nvcc exists too. Without a working C++
compiler it installs the pure-Python package (the reference path only).

Environment:
  FP8KERN_CUDA_ARCHS    CUDA architectures, default "89;90a".
  FP8KERN_REQUIRE_CUDA  1: a missing CUDA toolchain (or a failed build) is an error instead of a smaller install.
  FP8KERN_NO_CUDA       1: skip the CUDA kernels (fp8kern._cpu is still built).
  CUTLASS_DIR           a CUTLASS source tree to use instead of the nvidia-cutlass wheel.
  CMAKE_BUILD_PARALLEL_LEVEL  parallel compile jobs (default: the number of cores).
  FP8KERN_BUILD_DIR     the CMake build tree (default build/cmake-pyXY, kept between builds).
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CUTLASS_PIN = "nvidia-cutlass==4.2.0.0"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_nvcc():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cutlass_include_dirs():
    """CUTLASS headers from CUTLASS_DIR or the nvidia-cutlass wheel, located without importing the wheel
    (its import pulls optional dependencies that a --no-deps install skips)."""
    root = os.environ.get("CUTLASS_DIR")
    if not root:
        spec = importlib.util.find_spec("cutlass_library")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(
                f"fp8kern: CUTLASS headers not found. Install them with `pip install --no-deps {CUTLASS_PIN}` "
                "or point CUTLASS_DIR at a CUTLASS source tree.")
        root = str(Path(list(spec.submodule_search_locations)[0]) / "source")
    dirs = [Path(root) / "include", Path(root) / "tools" / "util" / "include"]
    if not (dirs[0] / "cutlass" / "cutlass.h").exists():
        raise RuntimeError(f"fp8kern: {dirs[0]} holds no cutlass/cutlass.h; check CUTLASS_DIR or reinstall {CUTLASS_PIN}")
    return [str(d) for d in dirs]


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


NVCC = None if _flag("FP8KERN_NO_CUDA") else _find_nvcc()


class CMakeBuild(build_ext):
    def run(self):
        if NVCC is None:
            why = "FP8KERN_NO_CUDA is set" if _flag("FP8KERN_NO_CUDA") else "no nvcc found (set CUDA_HOME)"
            if _flag("FP8KERN_REQUIRE_CUDA"):
                raise RuntimeError(f"fp8kern: FP8KERN_REQUIRE_CUDA=1 but {why}; cannot build the CUDA kernels")
            print(f"fp8kern: {why}; building the CPU kernels only (fp8kern._cpu)", file=sys.stderr)
        self._built = False
        try:
            super().run()
        except (subprocess.CalledProcessError, OSError) as e:
            if _flag("FP8KERN_REQUIRE_CUDA") or NVCC is not None:
                raise
            print(f"fp8kern: the C++ build failed ({e}); installing the pure-Python package: only the reference "
                  "path is available", file=sys.stderr)

    def build_extension(self, ext):
        if self._built:  # one CMake build makes every module
            return
        self._built = True
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        # A persistent CMake tree (pip builds editable installs in a fresh temp dir each time): rebuilds are
        # incremental, only changed sources recompile.
        build_temp = Path(os.environ.get("FP8KERN_BUILD_DIR", ROOT / "build" / f"cmake-py{sys.version_info[0]}{sys.version_info[1]}"))
        build_temp.mkdir(parents=True, exist_ok=True)
        import pybind11

        archs = os.environ.get("FP8KERN_CUDA_ARCHS", "89;90a")
        cfg = [
            f"-S{ROOT}", f"-B{build_temp}", "-GNinja", "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DFP8KERN_WITH_CUDA={'ON' if NVCC else 'OFF'}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DFP8KERN_CUDA_ARCHS={archs}",
        ]
        if NVCC:
            cfg += [f"-DCMAKE_CUDA_COMPILER={NVCC}", f"-DCUTLASS_INCLUDE_DIRS={';'.join(_cutlass_include_dirs())}"]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        what = f"_cpu and _C for CUDA archs {archs}" if NVCC else "_cpu"
        print(f"fp8kern: building {what} with {jobs} jobs", file=sys.stderr)
        subprocess.run(["cmake", *cfg], check=True)
        subprocess.run(["cmake", "--build", str(build_temp), "-j", jobs], check=True)


# The modules one CMake build makes: the CPU family always, the CUDA kernels where nvcc is.
setup(ext_modules=[CMakeExtension("fp8kern._cpu")] + ([CMakeExtension("fp8kern._C")] if NVCC else []), cmdclass={"build_ext": CMakeBuild}, package_dir={"": "python"})
