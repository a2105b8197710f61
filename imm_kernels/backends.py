"""Transitional: the backend registry lives in imm_kernels.ops.backends."""

from .ops.backends import BACKEND_NAMES, MMD_AUTO, backends, choose_backend, empty_native_cache  # noqa: F401
from .ops.utils import BackendUnavailableError  # noqa: F401


def resolve_mmd_backend(backend, x, group_size):
    return choose_backend(backend, x.device, MMD_AUTO, dtype=x.dtype, group_size=group_size).name, None
