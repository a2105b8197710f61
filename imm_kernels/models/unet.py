"""The IMM U-Net: EDM's SongUNet (DDPM++ / NCSN++) with IMM's second time embedding.

This is the backbone of the released IMM CIFAR-10 model (lumalabs/imm `training/unets.py`,
configured by `configs/cifar10_generate_images.yaml`: model_channels 128, channel_mult
(2, 2, 2), positional embedding, standard encoder and decoder, resample_filter (1, 1),
s_embed, dropout 0.2). Constructor arguments, defaults, parameter/buffer names and shapes are
the official ones, so an official state dict loads with strict=True:

    map_noise (Fourier: buffer `freqs`), map_label, map_augment, map_layer0, map_layer1,
    map_noise_s, map_layer0_s, map_layer1_s (s_embed), then the ModuleDicts `enc`
    ('32x32_conv', '16x16_down', '32x32_block0', ..., '16x16_aux_down' / '_aux_skip' for the
    skip encoder, '16x16_aux_residual' for the residual one) and `dec` ('8x8_in0', '8x8_in1',
    '8x8_block0', '16x16_up', ..., '32x32_aux_norm', '32x32_aux_conv'; '_aux_up' and an
    aux_norm/aux_conv pair per level for the skip decoder). A UNetBlock holds norm0, conv0,
    affine, norm1, conv1, skip (when the channels change or it resamples), and norm2, qkv,
    proj when it attends. Linear: weight (out, in), bias. Conv2d: weight (out, in, k, k) and
    bias unless k = 0, and the buffer `resample_filter` (1, 1, f, f) when it resamples.

Numerics (what the official forward computes, reproduced):
- the positional embedding is [sin, cos] of t·f_k, f_k = (1/10000)^(k / (half - 1))
  (EDM's endpoint=True), in float64 — and it stays float64: the mapping layers and every
  block's `affine` run in float64 (weights cast to it, also under autocast, which leaves
  float64 alone) and only the affine output is cast to the feature maps' dtype. The angles
  come from the library's `timestep_embedding` op with max_period 10000^(half / (half - 1)),
  which makes its frequencies the endpoint=True ones (equal to float64 rounding).
- the Fourier embedding is [sin, cos] of t·2π·freqs in the promoted dtype of the times and
  `freqs` (float32 for float32 times), as the official `ger` computes it.
- the label map runs in the labels' dtype (float32 for integer labels) on labels·sqrt(label_dim).
- attention uses the official qkv layout ((B, C, 3, HW) after the 1×1 conv) and the official
  formula: softmax(qᵀ(k/sqrt(C))) with the scores and softmax in float32 (even for float64
  inputs), the weights cast back to the input dtype and applied to v in it. It is written out
  with the official einsum contractions rather than F.scaled_dot_product_attention, which
  computes in the input dtype (float64 scores for a float64 model) with its own scaling and
  summation order and would match only to float32 rounding; written this way, float32 outputs
  equal the official code's bit for bit (checked on a CPU). The released model attends at
  16×16 (256 tokens) and in the 8×8 in0 block, where the explicit score matrix costs little.
- resampling is the official Conv2d's: a depthwise transposed conv with 4·outer(f, f)/sum(f)²
  (up), a depthwise stride-2 conv with outer(f, f)/sum(f)² (down), before the conv; the
  residual encoder's aux convs filter after the conv (fused_down).

Calling convention (the backbone signature of imm_kernels.Preconditioner):
`forward(x, noise_labels_t, noise_labels_s=None, class_labels=None, augment_labels=None)`.
Times may be (B,), (1,) or 0-dim, or any shape holding B or 1 values (e.g. (B, 1, 1, 1)).
class_labels: (B, label_dim) rows (float rows used as they are, soft rows included, integer or
bool rows converted to float32), one (1, label_dim) row for the whole batch, (B,) integer class
indices, or None (the null label, all zeros, on a conditional model).

Extensions that leave the state dict unchanged: img_channels as an alias of in_channels (the
official IMMPrecond passes both), out_channels defaulting to in_channels, `backend` ("auto",
"triton", "torch") for the fused embedding op, clear errors for bad arguments and inputs
(the official class ignores unknown constructor arguments; here they raise TypeError).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.timestep import timestep_embedding
from ..validation import (
    check_choice,
    check_finite,
    check_nonnegative_int,
    check_positive_int,
    check_probability,
    check_rate,
)

__all__ = ["SongUNet", "UNetBlock"]

BACKENDS = ("auto", "triton", "torch")
EMBEDDING_TYPES = ("positional", "fourier")
ENCODER_TYPES = ("standard", "skip", "residual")
DECODER_TYPES = ("standard", "skip")
NORM_EPS = 1e-6
SKIP_SCALE = math.sqrt(0.5)
ZERO_INIT_WEIGHT = 1e-5  # conv1, proj and aux_conv start almost at zero
ATTENTION_INIT_WEIGHT = math.sqrt(0.2)  # qkv
MAX_POSITIONS = 10000


def _xavier_uniform_(weight: Tensor, fan_in: int, fan_out: int, gain: float) -> None:
    bound = gain * math.sqrt(6 / (fan_in + fan_out))
    nn.init.uniform_(weight, -bound, bound)


class Linear(nn.Module):
    """x @ weightᵀ + bias in x's dtype (the weights are cast to it, float64 included)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        _xavier_uniform_(self.weight, in_features, out_features, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        x = x @ self.weight.to(x.dtype).t()
        return x if self.bias is None else x + self.bias.to(x.dtype)


class Conv2d(nn.Module):
    """k×k conv (k = 0: none, only the resampling) with optional 2× up- or downsampling by the
    separable filter outer(f, f)/sum(f)², stored as the buffer `resample_filter` when used."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        *,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[float] = (1, 1),
        fused_down: bool = False,
        init_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_down = up, down, fused_down
        if kernel:
            self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel))
            self.bias = nn.Parameter(torch.zeros(out_channels))
            fan_in, fan_out = in_channels * kernel * kernel, out_channels * kernel * kernel
            _xavier_uniform_(self.weight, fan_in, fan_out, init_weight)
        else:
            self.weight = self.bias = None
        taps = torch.as_tensor(resample_filter, dtype=torch.float32)
        filter_2d = (torch.outer(taps, taps) / taps.sum().square())[None, None]
        self.register_buffer("resample_filter", filter_2d if up or down else None)

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.to(x.dtype)
        taps = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        weight_pad = 0 if weight is None else weight.shape[-1] // 2
        filter_pad = 0 if taps is None else (taps.shape[-1] - 1) // 2
        if self.fused_down:  # conv first, then filter the conv's output channels
            x = F.conv2d(x, weight, padding=weight_pad + filter_pad)
            x = F.conv2d(x, taps.tile(self.out_channels, 1, 1, 1), groups=self.out_channels, stride=2)
        else:
            if self.up:
                depthwise = (taps * 4).tile(self.in_channels, 1, 1, 1)
                x = F.conv_transpose2d(x, depthwise, groups=self.in_channels, stride=2, padding=filter_pad)
            if self.down:
                depthwise = taps.tile(self.in_channels, 1, 1, 1)
                x = F.conv2d(x, depthwise, groups=self.in_channels, stride=2, padding=filter_pad)
            if weight is not None:
                x = F.conv2d(x, weight, padding=weight_pad)
        return x if self.bias is None else x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)


class GroupNorm(nn.Module):
    """Group norm with min(32, channels // 4) groups (EDM's rule) and an affine weight and bias."""

    def __init__(self, num_channels: int, eps: float = NORM_EPS) -> None:
        super().__init__()
        self.num_groups = min(32, num_channels // 4)
        if self.num_groups < 1 or num_channels % self.num_groups:
            raise ValueError(
                f"a group norm over {num_channels} channels needs them to split into min(32, {num_channels} // 4) "
                f"= {self.num_groups} equal groups; choose model_channels and channel_mult so that every block's "
                "channel count (decoder inputs: a level's channels plus its skip's) does"
            )
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class UNetBlock(nn.Module):
    """DDPM++ residual block (no adaptive scale): x·sqrt(½) + conv1(dropout(silu(norm1(conv0(silu(norm0(x)))
    + affine(emb)))))·sqrt(½), optionally resampling, then single-head self-attention when `attention`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        *,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        dropout: float = 0.0,
        resample_filter: Sequence[float] = (1, 1),
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.attention, self.dropout = attention, dropout
        resample = dict(up=up, down=down, resample_filter=resample_filter)
        self.norm0 = GroupNorm(in_channels)
        self.conv0 = Conv2d(in_channels, out_channels, 3, **resample)
        self.affine = Linear(emb_channels, out_channels)
        self.norm1 = GroupNorm(out_channels)
        self.conv1 = Conv2d(out_channels, out_channels, 3, init_weight=ZERO_INIT_WEIGHT)
        self.skip = None
        if out_channels != in_channels or up or down:
            self.skip = Conv2d(in_channels, out_channels, 1, **resample)
        if attention:
            self.norm2 = GroupNorm(out_channels)
            self.qkv = Conv2d(out_channels, 3 * out_channels, 1, init_weight=ATTENTION_INIT_WEIGHT)
            self.proj = Conv2d(out_channels, out_channels, 1, init_weight=ZERO_INIT_WEIGHT)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        shift = self.affine(emb)[:, :, None, None].to(h.dtype)  # emb may be float64: the affine runs in it
        h = F.silu(self.norm1(h + shift))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = (h + (x if self.skip is None else self.skip(x))) * SKIP_SCALE
        if self.attention:
            x = (self.proj(self._attend(self.norm2(x))) + x) * SKIP_SCALE
        return x

    def _attend(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, channels, 3, height * width).unbind(2)  # each (B, C, HW)
        scores = torch.einsum("ncq,nck->nqk", q.to(torch.float32), (k / math.sqrt(channels)).to(torch.float32))
        weights = scores.softmax(dim=2).to(q.dtype)
        return torch.einsum("nqk,nck->ncq", weights, v).reshape(x.shape)


class PositionalEmbedding(nn.Module):
    """(N,) times -> (N, C) float64 [cos(t f_k), sin(t f_k)], f_k = (1/max_positions)^(k / (C/2 - 1))."""

    def __init__(self, num_channels: int, max_positions: int = MAX_POSITIONS) -> None:
        super().__init__()
        self.num_channels = num_channels
        half = num_channels // 2
        # timestep_embedding's f_k = max_period^(-k / half) are the endpoint=True frequencies for:
        self.max_period = max_positions ** (half / (half - 1))

    def forward(self, times: Tensor, backend: str = "auto") -> Tensor:
        return timestep_embedding(times.to(torch.float64), self.num_channels, self.max_period, backend=backend)


class FourierEmbedding(nn.Module):
    """(N,) times -> (N, C) [cos(2π t f_k), sin(2π t f_k)], f ~ N(0, scale²) fixed (buffer) or learnable."""

    def __init__(self, num_channels: int, scale: float = 0.02, learnable: bool = False) -> None:
        super().__init__()
        freqs = torch.randn(num_channels // 2) * scale
        if learnable:
            self.freqs = nn.Parameter(freqs)
        else:
            self.register_buffer("freqs", freqs)

    def forward(self, times: Tensor) -> Tensor:
        angles = torch.outer(times, (2 * math.pi) * self.freqs)
        return torch.cat([angles.cos(), angles.sin()], dim=1)


def _int_sequence(name: str, value, *, allow_empty: bool) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a list or tuple of positive ints, got {value!r}")
    if not allow_empty and not value:
        raise ValueError(f"{name} must not be empty")
    return tuple(check_positive_int(f"{name}[{index}]", item) for index, item in enumerate(value))


def _resample_filter(value) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"resample_filter must be a list or tuple of numbers, got {value!r}")
    taps = tuple(check_finite(f"resample_filter[{index}]", tap) for index, tap in enumerate(value))
    if len(taps) < 2 or len(taps) % 2:  # odd lengths would not resample by exactly 2
        raise ValueError(f"resample_filter must have an even number (>= 2) of taps, got {len(taps)}")
    if sum(taps) == 0:
        raise ValueError(f"resample_filter must not sum to zero (it is normalised by its sum), got {value!r}")
    return taps


def _fourier_kwargs(embedding_type: str, embedding_kwargs) -> dict:
    if embedding_kwargs is None:
        return {}
    if not isinstance(embedding_kwargs, dict):
        raise ValueError(f"embedding_kwargs must be a dict or None, got {type(embedding_kwargs).__name__}")
    if embedding_kwargs and embedding_type != "fourier":
        raise ValueError(f"embedding_kwargs apply to embedding_type='fourier' only, got {embedding_kwargs!r}")
    unknown = sorted(set(embedding_kwargs) - {"scale", "learnable"})
    if unknown:
        raise ValueError(f"embedding_kwargs takes 'scale' and 'learnable', got unknown keys {unknown}")
    kwargs = {}
    if "scale" in embedding_kwargs:
        kwargs["scale"] = check_finite("embedding_kwargs['scale']", embedding_kwargs["scale"])
    if "learnable" in embedding_kwargs:
        if not isinstance(embedding_kwargs["learnable"], bool):
            raise ValueError(f"embedding_kwargs['learnable'] must be a bool, got {embedding_kwargs['learnable']!r}")
        kwargs["learnable"] = embedding_kwargs["learnable"]
    return kwargs


class SongUNet(nn.Module):
    """The IMM U-Net G(x, t, s, labels) -> (B, out_channels, R, R); see the module docstring.

    Args (the official ones, same defaults):
        img_resolution: R, the side of the square input; a multiple of 2^(len(channel_mult) - 1).
        in_channels: input channels (img_channels is accepted as an alias).
        out_channels: output channels (default: in_channels).
        label_dim: classes of the one-hot labels, 0 for an unconditional model.
        augment_dim: width of the augmentation labels, 0 for none.
        model_channels, channel_mult: the channels of level l are model_channels·channel_mult[l]
            (the first conv has model_channels); level l works at R / 2^l.
        channel_mult_emb: the embedding vector has model_channels·channel_mult_emb channels.
        num_blocks: residual blocks per level in the encoder (the decoder has one more).
        attn_resolutions: resolutions whose blocks attend (the lowest level's first decoder
            block always does).
        dropout: dropout before each block's conv1 (training mode only).
        label_dropout: probability of dropping a sample's label in training mode (the official
            in-model classifier-free-guidance dropout; IMMLoss has its own `label_dropout`).
        embedding_type: "positional" (DDPM++) or "fourier" (NCSN++) time embedding.
        channel_mult_noise: the time embedding has model_channels·channel_mult_noise channels.
        encoder_type: "standard", "skip" or "residual"; decoder_type: "standard" or "skip".
        resample_filter: the taps f of the 2× resampling filter outer(f, f)/sum(f)².
        s_embed: embed the second time s (map_noise_s, map_layer0_s, map_layer1_s).
        share_tsemb: accepted for the official configs; it has no effect (as officially).
        embedding_kwargs: {"scale": float, "learnable": bool} for the Fourier embedding.
        backend: "auto", "triton" or "torch" for the fused timestep-embedding op.
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int | None = None,
        out_channels: int | None = None,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: Sequence[float] = (1, 1),
        s_embed: bool = True,
        share_tsemb: bool = True,
        embedding_kwargs: dict | None = None,
        *,
        img_channels: int | None = None,
        backend: str = "auto",
        **unknown_kwargs,
    ) -> None:
        if unknown_kwargs:
            raise TypeError(f"SongUNet got unknown keyword arguments: {', '.join(sorted(unknown_kwargs))}")
        super().__init__()
        if in_channels is None and img_channels is None:
            raise ValueError("in_channels (or its alias img_channels) is required")
        if in_channels is not None and img_channels is not None and in_channels != img_channels:
            raise ValueError(f"in_channels ({in_channels!r}) and img_channels ({img_channels!r}) disagree")
        in_channels = check_positive_int("in_channels", in_channels if in_channels is not None else img_channels)
        out_channels = check_positive_int("out_channels", in_channels if out_channels is None else out_channels)
        img_resolution = check_positive_int("img_resolution", img_resolution)
        label_dim = check_nonnegative_int("label_dim", label_dim)
        augment_dim = check_nonnegative_int("augment_dim", augment_dim)
        model_channels = check_positive_int("model_channels", model_channels)
        channel_mult = _int_sequence("channel_mult", channel_mult, allow_empty=False)
        channel_mult_emb = check_positive_int("channel_mult_emb", channel_mult_emb)
        num_blocks = check_nonnegative_int("num_blocks", num_blocks)
        attn_resolutions = _int_sequence("attn_resolutions", attn_resolutions, allow_empty=True)
        dropout = check_rate("dropout", dropout)
        self.label_dropout = check_probability("label_dropout", label_dropout)
        check_choice("embedding_type", embedding_type, EMBEDDING_TYPES)
        channel_mult_noise = check_positive_int("channel_mult_noise", channel_mult_noise)
        check_choice("encoder_type", encoder_type, ENCODER_TYPES)
        check_choice("decoder_type", decoder_type, DECODER_TYPES)
        resample_filter = _resample_filter(resample_filter)
        for name, flag in (("s_embed", s_embed), ("share_tsemb", share_tsemb)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {flag!r}")
        fourier_kwargs = _fourier_kwargs(embedding_type, embedding_kwargs)
        levels = len(channel_mult)
        if img_resolution % 2 ** (levels - 1):
            raise ValueError(
                f"img_resolution ({img_resolution}) must be a multiple of 2^(len(channel_mult) - 1) = "
                f"{2 ** (levels - 1)}: each of the {levels} levels halves it"
            )
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        min_noise_channels = 4 if embedding_type == "positional" else 2  # positional: f_k needs C/2 - 1 > 0
        if noise_channels % 2 or noise_channels < min_noise_channels:
            raise ValueError(
                f"the time embedding width model_channels·channel_mult_noise = {noise_channels} must be even and "
                f">= {min_noise_channels} for embedding_type={embedding_type!r}"
            )

        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim, self.augment_dim = label_dim, augment_dim
        self.s_embed, self.share_tsemb = s_embed, share_tsemb
        self.backend = backend

        # Mapping: time (and label, augmentation) embeddings to the emb_channels vector.
        def noise_embedding() -> nn.Module:
            if embedding_type == "positional":
                return PositionalEmbedding(noise_channels)
            return FourierEmbedding(noise_channels, **fourier_kwargs)

        self.map_noise = noise_embedding()
        self.map_label = Linear(label_dim, noise_channels) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)
        if s_embed:
            self.map_noise_s = noise_embedding()
            self.map_layer0_s = Linear(noise_channels, emb_channels)
            self.map_layer1_s = Linear(emb_channels, emb_channels)

        def block(cin: int, cout: int, **kwargs) -> UNetBlock:
            return UNetBlock(cin, cout, emb_channels, dropout=dropout, resample_filter=resample_filter, **kwargs)

        # Encoder. The skip connections are the outputs of everything but the aux layers.
        self.enc = nn.ModuleDict()
        cout = aux_channels = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3)
            else:
                self.enc[f"{res}x{res}_down"] = block(cout, cout, down=True)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(
                        aux_channels, aux_channels, 0, down=True, resample_filter=resample_filter
                    )
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(aux_channels, cout, 1)
                elif encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        aux_channels, cout, 3, down=True, resample_filter=resample_filter, fused_down=True
                    )
                    aux_channels = cout
            for index in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{index}"] = block(cin, cout, attention=res in attn_resolutions)
        skip_channels = [layer.out_channels for name, layer in self.enc.items() if "aux" not in name]

        # Decoder: each block but the first two (lowest level) and the up blocks takes a skip.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == levels - 1:
                self.dec[f"{res}x{res}_in0"] = block(cout, cout, attention=True)
                self.dec[f"{res}x{res}_in1"] = block(cout, cout)
            else:
                self.dec[f"{res}x{res}_up"] = block(cout, cout, up=True)
            for index in range(num_blocks + 1):
                cin, cout = cout + skip_channels.pop(), model_channels * mult
                attention = index == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{index}"] = block(cin, cout, attention=attention)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < levels - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(
                        out_channels, out_channels, 0, up=True, resample_filter=resample_filter
                    )
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3, init_weight=ZERO_INIT_WEIGHT)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = check_choice("backend", value, BACKENDS)

    # Inputs.

    def _check_x(self, x: Tensor) -> int:
        expected = f"(B, {self.in_channels}, {self.img_resolution}, {self.img_resolution})"
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor of shape {expected}")
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_channels, self.img_resolution, self.img_resolution):
            raise ValueError(f"x must have shape {expected}, got {tuple(x.shape)}")
        return x.shape[0]

    @staticmethod
    def _per_sample(times, name: str, batch: int, device: torch.device) -> Tensor:
        """(B,) times from any tensor holding B values or 1 (broadcast over the batch)."""
        if not isinstance(times, Tensor):
            raise TypeError(f"{name} must be a tensor of {batch} times (or 1), got {type(times).__name__}")
        if times.dtype == torch.bool or times.is_complex():
            raise TypeError(f"{name} must be a real floating-point or integer tensor, got {times.dtype}")
        if times.numel() not in (1, batch):
            raise ValueError(
                f"{name} must hold {batch} times (one per sample) or 1, e.g. shape ({batch},), (1,) or (); "
                f"got shape {tuple(times.shape)}"
            )
        return times.to(device).reshape(-1).expand(batch)

    def _class_rows(self, class_labels, batch: int, device: torch.device) -> Tensor | None:
        """(B, label_dim) float label rows, or None for an unconditional model."""
        if self.label_dim == 0:
            if class_labels is not None:
                raise ValueError("class_labels were given but the model is unconditional (label_dim=0)")
            return None
        if class_labels is None:  # the null label
            return torch.zeros(batch, self.label_dim, device=device)
        if not isinstance(class_labels, Tensor):
            raise TypeError(f"class_labels must be a tensor or None, got {type(class_labels).__name__}")
        if class_labels.dim() == 1:
            if class_labels.is_floating_point() or class_labels.dtype == torch.bool or class_labels.shape != (batch,):
                raise ValueError(
                    f"1-D class_labels must be integer class indices of shape ({batch},), "
                    f"got {tuple(class_labels.shape)} of {class_labels.dtype}"
                )
            return F.one_hot(class_labels.to(device).long(), self.label_dim).float()
        if (
            class_labels.dim() != 2
            or class_labels.shape[1] != self.label_dim
            or class_labels.shape[0] not in (1, batch)
        ):
            raise ValueError(
                f"class_labels must be rows of shape ({batch}, {self.label_dim}) or (1, {self.label_dim}), or "
                f"({batch},) class indices; got {tuple(class_labels.shape)}"
            )
        rows = class_labels.to(device)
        return (rows if rows.is_floating_point() else rows.float()).expand(batch, -1)

    def _augment_rows(self, augment_labels, batch: int) -> Tensor | None:
        if augment_labels is None:
            return None
        if self.map_augment is None:
            raise ValueError("augment_labels were given but the model has no augmentation map (augment_dim=0)")
        if not isinstance(augment_labels, Tensor) or not augment_labels.is_floating_point():
            raise TypeError(f"augment_labels must be a floating-point tensor of shape ({batch}, {self.augment_dim})")
        if augment_labels.shape != (batch, self.augment_dim):
            raise ValueError(
                f"augment_labels must have shape ({batch}, {self.augment_dim}), got {tuple(augment_labels.shape)}"
            )
        return augment_labels

    # The model.

    def _time_features(self, embedding: nn.Module, times: Tensor) -> Tensor:
        """[sin, cos] features of the times (the embeddings give [cos, sin]; the official model swaps them)."""
        if isinstance(embedding, PositionalEmbedding):
            features = embedding(times, self.backend)
        else:
            features = embedding(times)
        half = features.shape[1] // 2
        return torch.cat([features[:, half:], features[:, :half]], dim=1)

    def _embedding(self, t: Tensor, s: Tensor | None, labels: Tensor | None, augment: Tensor | None) -> Tensor:
        emb = self._time_features(self.map_noise, t)
        if labels is not None:
            if self.training and self.label_dropout:
                keep = torch.rand(labels.shape[0], 1, device=labels.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.label_dim))
        if augment is not None:
            emb = emb + self.map_augment(augment)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if s is not None and self.s_embed:
            emb_s = self._time_features(self.map_noise_s, s)
            emb = emb + self.map_layer1_s(F.silu(self.map_layer0_s(emb_s)))
        return F.silu(emb)

    def forward(
        self,
        x: Tensor,
        noise_labels_t: Tensor,
        noise_labels_s: Tensor | None = None,
        class_labels: Tensor | None = None,
        augment_labels: Tensor | None = None,
    ) -> Tensor:
        """G(x, t, s, labels) -> (B, out_channels, R, R) in x's dtype (autocast's under autocast).

        Args:
            x: (B, in_channels, R, R) input (c_in-scaled x_t in IMM).
            noise_labels_t, noise_labels_s: B times or 1 (see the module docstring; IMM: 1000·t
                and 1000·s); noise_labels_s=None, or s_embed=False, leaves out the s embedding.
            class_labels: see the module docstring; None on a conditional model is the null label.
            augment_labels: (B, augment_dim) augmentation labels, or None.
        """
        batch = self._check_x(x)
        t = self._per_sample(noise_labels_t, "noise_labels_t", batch, x.device)
        s = None if noise_labels_s is None else self._per_sample(noise_labels_s, "noise_labels_s", batch, x.device)
        labels = self._class_rows(class_labels, batch, x.device)
        emb = self._embedding(t, s, labels, self._augment_rows(augment_labels, batch))

        skips = []
        aux = x
        for name, layer in self.enc.items():
            if name.endswith("_aux_down"):
                aux = layer(aux)
            elif name.endswith("_aux_skip"):
                x = skips[-1] = x + layer(aux)
            elif name.endswith("_aux_residual"):
                x = skips[-1] = aux = (x + layer(aux)) / math.sqrt(2)
            else:
                x = layer(x, emb) if isinstance(layer, UNetBlock) else layer(x)
                skips.append(x)

        out = None
        for name, layer in self.dec.items():
            if name.endswith("_aux_up"):
                out = layer(out)
            elif name.endswith("_aux_norm"):
                normed = layer(x)
            elif name.endswith("_aux_conv"):
                level_out = layer(F.silu(normed))
                out = level_out if out is None else level_out + out
            else:
                if x.shape[1] != layer.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = layer(x, emb)
        return out
