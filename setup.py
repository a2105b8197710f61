"""Build entry point: the native extension imm_kernels._C. Metadata lives in pyproject.toml.

The one build path is torch's cpp_extension driven from here (with ninja): it
compiles csrc/*.cpp and the pybind11 bindings in python/ against the torch that is
installed, so build with that torch visible:

    pip install --no-build-isolation -e .

csrc/mmd_cuda.cu joins the build, for sm_80 and sm_90, when torch is a CUDA build
and a CUDA toolkit is found (CUDA_HOME or nvcc on PATH). Environment switches:

    IMM_KERNELS_BUILD_NATIVE=0   pure-Python install: the `native`/`cuda` backends
                                 then report themselves unavailable
    IMM_KERNELS_BUILD_CUDA=0     C++ only, even on a CUDA machine
    IMM_KERNELS_CUDA_ARCHS="80;90"  compute capabilities to compile for
"""

import os
import sys

from setuptools import setup

# No FMA contraction by default: scalar sums such as +c - c must cancel exactly. (csrc/mmd_cpu.cpp
# turns it on for its vector loops alone.) Hidden visibility: two builds of _C loaded in one
# process never resolve to each other's code.
CXX_FLAGS = ["-O3", "-g0", "-fvisibility=hidden", "-ffp-contract=off"]


def _switch(name: str) -> bool:
    return os.environ.get(name, "1") not in ("0", "false", "no", "off")


def _native_extension():
    """(ext_modules, cmdclass) for imm_kernels._C, or nothing when switched off."""
    if not _switch("IMM_KERNELS_BUILD_NATIVE"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit(
            "imm_kernels: building the native extension needs torch importable at build time.\n"
            "Install torch first, then: pip install --no-build-isolation -e .\n"
            "(or set IMM_KERNELS_BUILD_NATIVE=0 for a pure-Python install)."
        )

    sources = ["python/bindings.cpp", "csrc/mmd_cpu.cpp"]
    cxx = list(CXX_FLAGS)
    if torch.backends.openmp.is_available():
        cxx.append("-fopenmp")  # at::parallel_for is OpenMP in torch's headers: without it, one thread
    extra = {"cxx": cxx}
    extension = cpp_extension.CppExtension
    if _switch("IMM_KERNELS_BUILD_CUDA") and torch.version.cuda is not None and cpp_extension.CUDA_HOME:
        archs = os.environ.get("IMM_KERNELS_CUDA_ARCHS", "80;90").split(";")
        sources.append("csrc/mmd_cuda.cu")
        extension = cpp_extension.CUDAExtension
        cxx.append("-DIMM_KERNELS_WITH_CUDA")
        extra["nvcc"] = ["-O3", "-DIMM_KERNELS_WITH_CUDA", "--expt-relaxed-constexpr"] + [
            f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs
        ]
    ext = extension("imm_kernels._C", sources, include_dirs=[os.path.abspath("csrc")], extra_compile_args=extra)
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _native_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
