"""Backbones G(x, c_noise_t, c_noise_s, class_labels) for imm_kernels.Preconditioner."""

from .small import ConvBackbone, MLPBackbone

__all__ = ["ConvBackbone", "MLPBackbone"]
