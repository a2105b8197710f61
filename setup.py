"""Build entry point: the native extension imm_kernels._C. Metadata lives in pyproject.toml.

CMakeLists.txt is the one description of the build: it compiles csrc/ (the kernels) and the
pybind11 bindings in python/ against the installed torch, found through torch's CMake package,
so build with that torch visible:

    pip install --no-build-isolation -e .
    python setup.py build_ext --inplace      # in place, installing nothing

Here build_ext only drives CMake (>= 3.18; Ninja when installed): configure in the build
directory, build the target _C, install it where setuptools expects the extension, which then
copies it into imm_kernels/ for --inplace and editable installs.

csrc/mmd_cuda.cu joins the build, for sm_80 and sm_90, when torch is a CUDA build and a CUDA
toolkit is found (CUDA_HOME, nvcc on PATH, or /usr/local/cuda). Environment switches:

    IMM_KERNELS_BUILD_NATIVE=0   pure-Python install: the `native`/`cuda` backends
                                 then report themselves unavailable
    IMM_KERNELS_BUILD_CUDA=0     C++ only, even on a CUDA machine
    IMM_KERNELS_CUDA_ARCHS="80;90"  compute capabilities to compile for
    MAX_JOBS=N                   parallel compile jobs (default: the build tool's)
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _switch(name: str) -> bool:
    return os.environ.get(name, "1") not in ("0", "false", "no", "off")


def _tool(name: str) -> str | None:
    """An executable on PATH, else among this Python's scripts (pip's cmake/ninja, venv not activated)."""
    return shutil.which(name) or shutil.which(name, path=sysconfig.get_path("scripts"))


def _nvcc() -> str | None:
    """nvcc of the CUDA toolkit torch's cpp_extension would use: CUDA_HOME or CUDA_PATH, else the one
    on PATH, else /usr/local/cuda's."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return str(Path(home) / "bin" / "nvcc")
    default = Path("/usr/local/cuda/bin/nvcc")
    return shutil.which("nvcc") or (str(default) if default.exists() else None)


class CMakeExtension(Extension):
    """An extension built by the CMake target `target`: no sources for setuptools to compile."""

    def __init__(self, name: str, target: str):
        super().__init__(name, sources=[])
        self.target = target


class cmake_build_ext(build_ext):
    """Configures and builds CMakeLists.txt, then installs each extension's target to its path."""

    def build_extension(self, ext: CMakeExtension) -> None:
        torch_spec = importlib.util.find_spec("torch")
        if torch_spec is None:
            sys.exit(
                "imm_kernels: building the native extension needs torch importable at build time.\n"
                "Install torch first, then: pip install --no-build-isolation -e .\n"
                "(or set IMM_KERNELS_BUILD_NATIVE=0 for a pure-Python install)."
            )
        cmake = _tool("cmake")
        if cmake is None:
            sys.exit("imm_kernels: building the native extension needs CMake >= 3.18 (pip install cmake).")
        build_dir = Path(self.build_temp).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        # CMake caches where it found torch: a build directory made with another environment's torch
        # starts afresh rather than link against that one.
        cache = build_dir / "CMakeCache.txt"
        torch_package = Path(torch_spec.submodule_search_locations[0]) / "share" / "cmake" / "Torch"
        if cache.exists() and f"Torch_DIR:PATH={torch_package}\n" not in cache.read_text():
            cache.unlink()

        build_cuda = "ON" if _switch("IMM_KERNELS_BUILD_CUDA") else "OFF"
        configure = [cmake, "-S", str(ROOT), "-B", str(build_dir)]
        configure += [f"-DPython3_EXECUTABLE={sys.executable}", f"-DIMM_KERNELS_BUILD_CUDA={build_cuda}"]
        archs = os.environ.get("IMM_KERNELS_CUDA_ARCHS")
        # Unset: back to CMakeLists.txt's default, not whatever an earlier build left in the cache.
        configure.append(f"-DIMM_KERNELS_CUDA_ARCHS={archs}" if archs else "-UIMM_KERNELS_CUDA_ARCHS")
        ninja = _tool("ninja")
        if ninja and not cache.exists():  # a build directory keeps the generator it was made with
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        nvcc = _nvcc()  # CMake reads CUDACXX (a caller's own first) only if torch is a CUDA build
        subprocess.run(configure, check=True, env={"CUDACXX": nvcc, **os.environ} if nvcc else None)

        build = [cmake, "--build", str(build_dir), "--target", ext.target]
        if os.environ.get("MAX_JOBS"):
            build += ["--parallel", os.environ["MAX_JOBS"]]
        subprocess.run(build, check=True)

        # Installed under the build_lib root (for imm_kernels._C, two levels up from its file), where
        # setuptools expects it; setuptools copies it into the source tree for --inplace and -e.
        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        prefix = ext_path.parents[ext.name.count(".")]
        install = [cmake, "--install", str(build_dir), "--component", ext.target, "--prefix", str(prefix)]
        subprocess.run(install, check=True)
        if not ext_path.exists():
            sys.exit(f"imm_kernels: CMake installed no {ext_path} (see the install lines above)")


ext_modules = [CMakeExtension("imm_kernels._C", target="_C")] if _switch("IMM_KERNELS_BUILD_NATIVE") else []
setup(ext_modules=ext_modules, cmdclass={"build_ext": cmake_build_ext})
