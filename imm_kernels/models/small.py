"""Small IMM backbones that train on a CPU in minutes: an MLP for 2-D toys, a conv net for 8×8 digits.

Both have the backbone signature of docs/design.md §1.2, G(x, c_noise_t, c_noise_s, class_labels):
c_noise_t, c_noise_s are per-sample (B,) times already scaled by 1000; class_labels
is None or a one-hot float (B, label_dim), all zeros meaning unconditional (the
null class of classifier-free guidance). The output layer starts at zero, so an
untrained model gives G = 0 and f_{s,t}(x) = c_skip·x: the identity-like start
IMM's parameterisations are built around.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.timestep import timestep_embedding

TIME_EMBED_DIM = 64


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """(B,) times → (B, dim) float32 [cos, sin] features at geometric frequencies (DiT's convention).

    The library's `timestep_embedding`: its Triton kernel on a GPU; on a CPU its reference (the
    Triton interpreter would cost ~150 ms a call, and these models are the CPU demo's).
    """
    return timestep_embedding(t.float(), dim, max_period, backend="auto" if t.is_cuda else "torch")


def _per_sample(times: Tensor, batch: int, name: str) -> Tensor:
    if not isinstance(times, Tensor) or times.shape not in (torch.Size([]), torch.Size([batch])):
        shape = tuple(times.shape) if isinstance(times, Tensor) else type(times).__name__
        raise ValueError(f"{name} must be a tensor of shape ({batch},) (one time per sample), got {shape}")
    return times.expand(batch)


class Conditioning(nn.Module):
    """Embeds both times and the one-hot label into one vector that modulates every block.

    Labels enter through a bias-free linear map, so an all-zero (null) label adds
    nothing and the model is then exactly unconditional.
    """

    def __init__(self, cond_dim: int, label_dim: int) -> None:
        super().__init__()
        self.label_dim = label_dim
        self.time_mlp = nn.Sequential(nn.Linear(2 * TIME_EMBED_DIM, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.label_embed = nn.Linear(label_dim, cond_dim, bias=False) if label_dim > 0 else None

    def forward(self, c_noise_t: Tensor, c_noise_s: Tensor, class_labels: Tensor | None, batch: int) -> Tensor:
        times = torch.cat(
            [
                sinusoidal_embedding(_per_sample(c_noise_t, batch, "c_noise_t"), TIME_EMBED_DIM),
                sinusoidal_embedding(_per_sample(c_noise_s, batch, "c_noise_s"), TIME_EMBED_DIM),
            ],
            dim=1,
        )
        cond = self.time_mlp(times.to(self.time_mlp[0].weight.dtype))
        if class_labels is not None:
            if class_labels.shape != (batch, self.label_dim):
                raise ValueError(
                    f"class_labels must be one-hot of shape ({batch}, {self.label_dim}) (label_dim={self.label_dim}), "
                    f"got {tuple(class_labels.shape)}"
                )
            if self.label_embed is not None:
                cond = cond + self.label_embed(class_labels.to(cond.dtype))
        return F.silu(cond)


class MLPBackbone(nn.Module):
    """Residual MLP for (B, dim) vectors; each block is LayerNorm → FiLM(cond) → SiLU → Linear.

    cond_dim, the width of the time/label embedding, is kept below hidden: the FiLM
    maps cost cond_dim × 2·hidden each and would otherwise dominate the compute.
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, label_dim: int = 0, cond_dim: int = 64) -> None:
        super().__init__()
        for name, value, low in (
            ("dim", dim, 1),
            ("hidden", hidden, 1),
            ("depth", depth, 1),
            ("label_dim", label_dim, 0),
            ("cond_dim", cond_dim, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.dim, self.label_dim = dim, label_dim
        self.cond = Conditioning(cond_dim, label_dim)
        self.inp = nn.Linear(dim, hidden)
        self.films = nn.ModuleList(nn.Linear(cond_dim, 2 * hidden) for _ in range(depth))
        self.linears = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, c_noise_t: Tensor, c_noise_s: Tensor, class_labels: Tensor | None = None) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must be (B, {self.dim}), got {tuple(x.shape)}")
        cond = self.cond(c_noise_t, c_noise_s, class_labels, x.shape[0])
        h = self.inp(x)
        for film, linear in zip(self.films, self.linears):
            scale, shift = film(cond).chunk(2, dim=1)
            h = h + linear(F.silu(F.layer_norm(h, h.shape[1:]) * (1 + scale) + shift))
        return self.out(F.silu(self.out_norm(h)))


class _ResBlock(nn.Module):
    """GroupNorm → FiLM(cond) → SiLU → conv3×3 → GroupNorm → SiLU → dropout → conv3×3, plus x."""

    def __init__(self, channels: int, cond_dim: int, dropout: float) -> None:
        super().__init__()
        groups = math.gcd(channels, 8)
        self.norm1 = nn.GroupNorm(groups, channels, affine=False)
        self.film = nn.Linear(cond_dim, 2 * channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.film(cond)[:, :, None, None].chunk(2, dim=1)
        h = self.conv1(F.silu(self.norm1(x) * (1 + scale) + shift))
        return x + self.conv2(self.dropout(F.silu(self.norm2(h))))


class ConvBackbone(nn.Module):
    """Conv net on 2×2 patches: (B, C, H, W) → (B, 4C, H/2, W/2) → residual blocks → back.

    Working on patches, like a patch-2 DiT, keeps every conv at a quarter of the
    pixels: with the defaults (0.31M parameters) a forward, backward and AdamW step
    at batch 256 on 8×8 digits took 0.055 s on 2 CPU cores (0.067 s with IMM's extra
    no-grad target pass), and two 3×3 convs already see the whole image.
    """

    PATCH = 2

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 8,
        channels: int = 64,
        label_dim: int = 0,
        dropout: float = 0.0,
        num_blocks: int = 3,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("in_channels", in_channels, 1),
            ("image_size", image_size, self.PATCH),
            ("channels", channels, 1),
            ("label_dim", label_dim, 0),
            ("num_blocks", num_blocks, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if image_size % self.PATCH:
            raise ValueError(f"image_size must be a multiple of the patch size {self.PATCH}, got {image_size}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.in_channels, self.image_size, self.label_dim = in_channels, image_size, label_dim
        cond_dim = 2 * channels
        patch_channels = in_channels * self.PATCH**2
        self.cond = Conditioning(cond_dim, label_dim)
        self.inp = nn.Conv2d(patch_channels, channels, 3, padding=1)
        self.blocks = nn.ModuleList(_ResBlock(channels, cond_dim, dropout) for _ in range(num_blocks))
        self.out_norm = nn.GroupNorm(math.gcd(channels, 8), channels)
        self.out = nn.Conv2d(channels, patch_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, c_noise_t: Tensor, c_noise_s: Tensor, class_labels: Tensor | None = None) -> Tensor:
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must be (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        cond = self.cond(c_noise_t, c_noise_s, class_labels, x.shape[0])
        h = self.inp(F.pixel_unshuffle(x, self.PATCH))
        for block in self.blocks:
            h = block(h, cond)
        return F.pixel_shuffle(self.out(F.silu(self.out_norm(h))), self.PATCH)
