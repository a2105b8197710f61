"""imm_kernels: fused GPU kernels for Inductive Moment Matching (IMM) training and sampling.

Set TRITON_INTERPRET=1 before importing to run the Triton kernels on the CPU.
"""

from . import sampling, schedules
from .loss import IMMLoss
from .model_files import convert_official, load_model
from .official import OfficialCheckpointError, load_official
from .ops.adaln import adaln_modulate, adaln_residual_modulate
from .ops.backends import backends, empty_native_cache
from .ops.mmd import mmd_loss
from .ops.timestep import timestep_embedding
from .ops.utils import BackendUnavailableError
from .precond import Preconditioner

__version__ = "0.1.0"

__all__ = [
    "mmd_loss",
    "backends",
    "BackendUnavailableError",
    "empty_native_cache",
    "__version__",
    "schedules",
    "Preconditioner",
    "IMMLoss",
    "adaln_modulate",
    "adaln_residual_modulate",
    "timestep_embedding",
    "sampling",
    "load_official",
    "OfficialCheckpointError",
    "convert_official",
    "load_model",
]
