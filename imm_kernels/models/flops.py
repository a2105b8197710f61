"""Model FLOPs of the IMM DiT and of one IMM training step, and model FLOPs utilisation (MFU).

Counting convention: the FLOPs of the matrix products, 2·m·n·k for an (m, k)·(k, n) product
(one multiply and one add per multiply-add), as `torch.utils.flop_counter.FlopCounterMode` counts
them. Biases, normalisations, activations, softmax, modulation, embedding lookups and the MMD
are elementwise and not counted (by a rough count about 0.7% of DiT-S/2's FLOPs, 0.3% of
DiT-XL/2's).

One DiT forward, per sample, with L = (input_size / p)² tokens, hidden size D, depth N, MLP
width D_mlp = int(D·mlp_ratio), conditioning width D_c = D·temb_mult, C channels, patch p and
time-feature width F (frequency_embedding_size, 256):

    patch embedding     2·L·(C·p²)·D                  the p×p stride-p conv
    time embedders      n·2·(F·D_c + D_c·D_c)         Linear(F, D_c) and Linear(D_c, D_c) of each: n = 1,
                                                      2 with s_embed; 0 without their MLP (use_mlp=False)
    adaLN modulation    2·D_c·(6·N + 2)·D             every block's 6·D and the final layer's 2·D outputs,
                                                      one product or several (batched_modulation)
    blocks              N·(2·L·D·3D + 2·L²·D + 2·L²·D + 2·L·D·D + 2·2·L·D·D_mlp)
                                                      qkv, scores q·kᵀ and values softmax·v (2·L²·D_head
                                                      per head each), proj, fc1 and fc2
    final layer         2·L·D·(p²·C)

The label embedding is a table lookup (0 FLOPs). The count assumes that the s time is given, as
`imm_kernels.Preconditioner` always gives it.

Training: a forward with gradients is counted as 3 forwards (the backward computes the input
and the weight gradient of each product, 2 forwards), the usual MFU convention (PaLM,
Megatron-LM). The backward actually skips the input gradients of the patch embedding and of the
time embedders' first Linear, whose inputs need none (2·L·C·p²·D + n·2·F·D_c per sample: 0.001%
of a DiT-XL/2 training step). Recomputation is not counted: neither `checkpoint_activations` nor
the fused attention backward's recomputed scores (FlopCounterMode counts those, 5 products for
the 4 of the model): these are model FLOPs, not hardware FLOPs.

DiT-XL/2 on 32×32×4 latents (L = 256) is 237.24 GFLOPs per forward sample: 118.62 G
multiply-adds. The DiT paper (Peebles & Xie) gives DiT-XL/2 "118.6 Gflops": multiply-adds, not
FLOPs (its model, with 8 output channels and one time embedder, is 118.62 G multiply-adds too;
its qkv, proj and MLP products alone are 228 GFLOPs).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from ..validation import check_finite, check_nonnegative_int
from .dit import DiT, DiT_models

__all__ = [
    "PEAK_BF16_FLOPS",
    "dit_forward_flops",
    "dit_forward_flops_by_part",
    "imm_training_step_flops",
    "mfu",
    "peak_bf16_flops",
]

# Dense (no 2:4 sparsity) bf16 tensor-core peaks, FLOP/s, from NVIDIA's data sheets.
PEAK_BF16_FLOPS = {"H100 SXM": 989e12, "H200": 989e12, "A100": 312e12}

# torch.cuda.get_device_name() patterns of the table's GPUs: "NVIDIA H100 80GB HBM3" is the SXM
# part; the PCIe and NVL parts (H100 PCIe: 756e12) and the GH200 have other peaks or names.
_DEVICE_NAME_PATTERNS = {
    "H200": re.compile(r"\bH200\b(?!.*\bNVL\b)", re.IGNORECASE),
    "H100 SXM": re.compile(r"\bH100\b(?!.*\b(PCIe|NVL)\b)", re.IGNORECASE),
    "A100": re.compile(r"\bA100\b"),
}

# Where wrappers hold the model: torch.compile, DDP/FSDP, Preconditioner, IMMLoss.
_WRAPPER_ATTRIBUTES = ("_orig_mod", "module", "backbone", "precond")


def _as_dit(model_or_config) -> DiT:
    """The DiT to count: a DiT (or a wrapper of one, IMMLoss included); a DiT_models name ("DiT-XL/2", or the official
    "DiT_XL_2") with DiT's defaults (32×32×4 input, 1000 classes); or a mapping of DiT's arguments.
    Names and mappings are built on the meta device: no memory, no initialisation cost."""
    if isinstance(model_or_config, str):
        name = model_or_config
        if name not in DiT_models:
            name = re.sub(r"^DiT_(\w+)_(\d+)$", r"DiT-\1/\2", name)
        if name not in DiT_models:
            raise ValueError(f"unknown DiT {model_or_config!r}; known: {sorted(DiT_models)}")
        with torch.device("meta"):
            return DiT_models[name]()
    if isinstance(model_or_config, Mapping):
        with torch.device("meta"):
            return DiT(**model_or_config)
    model = model_or_config
    while isinstance(model, nn.Module) and not isinstance(model, DiT):
        model = next((getattr(model, name) for name in _WRAPPER_ATTRIBUTES if hasattr(model, name)), None)
    if not isinstance(model, DiT):
        raise TypeError(
            "model_or_config must be a DiT (or a torch.compile / DDP / Preconditioner / IMMLoss wrapper of one), "
            f"a DiT_models name or a mapping of DiT arguments; got {type(model_or_config).__name__}"
        )
    return model


def dit_forward_flops_by_part(model_or_config) -> dict[str, int]:
    """FLOPs of one DiT forward per sample, by part (the formula of the module docstring).

    Parts: patch_embedding, time_embedding, adaln_modulation, qkv, attention (scores and
    values), proj, mlp (fc1 and fc2), final_layer.
    """
    dit = _as_dit(model_or_config)
    tokens, hidden = dit.pos_embed.shape[1], dit.pos_embed.shape[2]
    depth = len(dit.blocks)
    mlp_hidden = dit.blocks[0].mlp.fc1.out_features
    cond = dit.temb_size
    patch_values = dit.in_channels * dit.patch_size**2  # one patch's inputs, and one token's outputs
    time_mlps = [e for e in (dit.t_embedder, dit.s_embedder) if e is not None and e.use_mlp]
    return {
        "patch_embedding": 2 * tokens * patch_values * hidden,
        "time_embedding": sum(2 * (e.frequency_embedding_size * cond + cond * cond) for e in time_mlps),
        "adaln_modulation": 2 * cond * (6 * depth + 2) * hidden,
        "qkv": depth * 2 * tokens * hidden * 3 * hidden,
        "attention": depth * 2 * (2 * tokens * tokens * hidden),
        "proj": depth * 2 * tokens * hidden * hidden,
        "mlp": depth * 2 * (2 * tokens * hidden * mlp_hidden),
        "final_layer": 2 * tokens * hidden * patch_values,
    }


def dit_forward_flops(model_or_config, batch: int = 1) -> int:
    """Model FLOPs of one DiT forward of `batch` samples (see the module docstring).

    model_or_config: a DiT, a wrapper of one (torch.compile, DDP, Preconditioner, IMMLoss), a DiT_models
    name ("DiT-XL/2": DiT's defaults, 32×32×4 latents) or a mapping of DiT's arguments.
    """
    check_nonnegative_int("batch", batch)
    return batch * sum(dit_forward_flops_by_part(model_or_config).values())


def imm_training_step_flops(model_or_config, batch: int = 1) -> int:
    """Model FLOPs of one IMMLoss step (forward and backward) of `batch` samples.

    IMMLoss runs the model twice per sample: on x_t with gradients (forward + backward, counted
    3× the forward) and on x_r for the target, without gradients (1× the forward); both passes
    give the s time, so they cost the same: 4× `dit_forward_flops`. The optimizer step and the
    MMD are elementwise (not counted).
    """
    forward = dit_forward_flops(model_or_config, batch)
    student_forward_and_backward = 3 * forward
    target_forward = forward
    return student_forward_and_backward + target_forward


def mfu(samples_per_s: float, flops_per_sample: float, peak_flops: float | str) -> float:
    """Model FLOPs utilisation, a fraction: samples_per_s · flops_per_sample / peak_flops.

    peak_flops: the device's peak in FLOP/s, or a key of PEAK_BF16_FLOPS ("H100 SXM", "H200",
    "A100"). All per device: with several GPUs, give one GPU's samples/s.
    """
    if isinstance(peak_flops, str):
        if peak_flops not in PEAK_BF16_FLOPS:
            known = list(PEAK_BF16_FLOPS)
            raise ValueError(f"unknown device {peak_flops!r}: give the peak in FLOP/s, or one of {known}")
        peak_flops = PEAK_BF16_FLOPS[peak_flops]
    peak_flops = check_finite("peak_flops", peak_flops, positive=True)
    samples_per_s = check_finite("samples_per_s", samples_per_s, nonnegative=True)
    flops_per_sample = check_finite("flops_per_sample", flops_per_sample, nonnegative=True)
    return samples_per_s * flops_per_sample / peak_flops


def peak_bf16_flops(device_name: str) -> tuple[str, float] | None:
    """(table key, dense bf16 peak FLOP/s) of a `torch.cuda.get_device_name()`, None when the
    table does not hold that GPU (give the peak to `mfu` yourself)."""
    for key, pattern in _DEVICE_NAME_PATTERNS.items():
        if pattern.search(device_name):
            return key, PEAK_BF16_FLOPS[key]
    return None
