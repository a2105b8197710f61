"""Backbones G(x, c_noise_t, c_noise_s, class_labels) for imm_kernels.Preconditioner."""

from .dit import (
    DiT,
    DiT_B_2,
    DiT_B_4,
    DiT_B_8,
    DiT_L_2,
    DiT_L_4,
    DiT_L_8,
    DiT_models,
    DiT_S_2,
    DiT_S_4,
    DiT_S_8,
    DiT_XL_2,
    DiT_XL_4,
    DiT_XL_8,
    DiTBlock,
    FinalLayer,
    LabelEmbedder,
    TimestepEmbedder,
)
from .flops import dit_forward_flops, imm_training_step_flops, mfu, peak_bf16_flops
from .small import ConvBackbone, MLPBackbone
from .unet import SongUNet, UNetBlock

# The backbones a saved model description (model.json) may name, by class name.
BACKBONES = {"DiT": DiT, "SongUNet": SongUNet, "MLPBackbone": MLPBackbone, "ConvBackbone": ConvBackbone}

__all__ = [
    "BACKBONES",
    "dit_forward_flops",
    "imm_training_step_flops",
    "mfu",
    "peak_bf16_flops",
    "ConvBackbone",
    "MLPBackbone",
    "SongUNet",
    "UNetBlock",
    "DiT",
    "DiTBlock",
    "FinalLayer",
    "LabelEmbedder",
    "TimestepEmbedder",
    "DiT_models",
    "DiT_S_2",
    "DiT_S_4",
    "DiT_S_8",
    "DiT_B_2",
    "DiT_B_4",
    "DiT_B_8",
    "DiT_L_2",
    "DiT_L_4",
    "DiT_L_8",
    "DiT_XL_2",
    "DiT_XL_4",
    "DiT_XL_8",
]
