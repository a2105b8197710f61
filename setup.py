"""Build entry point. Metadata lives in pyproject.toml.

The native extension `imm_kernels._C` (C++ in csrc/, pybind11 bindings in python/)
is not part of the build yet; until it is, this is a pure-Python install and the
`native` backend reports itself unavailable (see `imm_kernels.backends()`).
"""

from setuptools import setup

setup()
