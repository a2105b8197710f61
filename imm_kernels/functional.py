"""Transitional: mmd_loss lives in imm_kernels.ops.mmd."""

from .ops.mmd import mmd_loss  # noqa: F401
