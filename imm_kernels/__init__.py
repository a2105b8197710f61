"""imm_kernels: fused GPU kernels for Inductive Moment Matching (IMM) training and sampling.

Set TRITON_INTERPRET=1 before importing to run the Triton kernels on the CPU.
"""

from .backends import BackendUnavailableError, backends
from .functional import mmd_loss

__version__ = "0.1.0"

__all__ = ["mmd_loss", "backends", "BackendUnavailableError", "__version__"]
