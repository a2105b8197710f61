"""The IMM DiT on the fused adaLN and timestep-embedding ops.

The architecture, parameter names and shapes, options and formulas follow lumalabs/imm
`training/dit.py` (DiT of Peebles & Xie extended by IMM, built from timm 1.0.8's PatchEmbed,
Attention and Mlp), so that its state dicts load with strict=True:

- conditioning c = t_emb + s_emb + y_emb, each of width temb_size = hidden_size · temb_mult;
  `t_embedder` and `s_embedder` are TimestepEmbedders (s_embed=False: no s_embedder, and
  noise_labels_s is ignored);
- time features: "positional", [cos(t f_i), sin(t f_i)] with f_i = 10000^(-i/half) (angles in
  float64, as the official), or "fourier", [cos(2π t f_i), sin(2π t f_i)] with the persistent
  buffer `freqs` (frequency_embedding_size // 2 values, randn · scale at init), formed in
  float64 and cast to the times' dtype; then Linear-SiLU-Linear unless use_mlp=False (the
  features are then the embedding);
- `y_embedder.embedding_table` has num_classes + 1 rows (the last the null class of
  classifier-free guidance), num_classes + 2 when class_dropout_prob > 0 (the official wraps
  num_classes + 1 classes in DiT's LabelEmbedder, which adds a row for its label drop). Label
  rows map to a row by argmax over [labels, 1 - sum(labels)]: one-hot rows to their class,
  all-zero rows to the null class, soft rows to their largest entry (ties: the first);
- blocks: adaLN-Zero (Linear(temb_size, 6·hidden) on SiLU(c)), LayerNorms without affine
  (eps 1e-6), timm's Attention (qkv bias; qk_norm=True: q_norm and k_norm, LayerNorm(head_dim)
  with eps 1e-5 and affine, applied per head to q and k) and Mlp (fc1, tanh-GELU, drop1, fc2,
  drop2, both dropouts of rate `dropout`); learn_sigma off: the output has the input's channels;
- DiT's initialisation (zero adaLN and output layers, normal(0.02) embeddings, fixed 2-D
  sin-cos pos_embed).

Deliberate deviations from the official class:
- no label drop inside the model in training mode (the official drops labels to its extra
  table row): label dropout is `imm_kernels.IMMLoss`'s `label_dropout`, so that both of its
  passes see the same labels; the extra row exists only for the state-dict layout;
- the final layer's adaLN is Linear(temb_size, 2·hidden): the official builds it with
  hidden_size inputs, so its forward fails for temb_mult != 1; at temb_mult = 1 they agree;
- label_dim is the number of classes (an alias of num_classes): the official accepts it and
  ignores it (its num_classes stays 1000 unless given); out_channels must equal in_channels
  (the official ignores it); `skip` is accepted and has no effect, as in the official (whose
  DiT never passes it to its blocks); unknown keyword arguments raise TypeError (the official
  swallows them);
- num_classes=0 builds an unconditional model (no y_embedder); class_labels may also be None
  (the null class), (B,) integer class indices (num_classes is the null class) or one row for
  the whole batch; noise labels may have any shape holding B or 1 values;
- the state dict's key order differs (s_embedder comes after t_embedder here): strict loading
  does not depend on it.

State dict: pos_embed (1, L, hidden) (fixed, not trainable), x_embedder.proj.{weight,bias}
(patchify conv), t_embedder.[freqs, mlp.{0,2}.{weight,bias}], s_embedder.[...],
y_embedder.embedding_table.weight, then per block blocks.N.attn.qkv, blocks.N.attn.{q,k}_norm
(qk_norm only), blocks.N.attn.proj, blocks.N.mlp.fc1, blocks.N.mlp.fc2,
blocks.N.adaLN_modulation.1 (Linear(temb_size, 6·hidden)), and final_layer.linear,
final_layer.adaLN_modulation.1 (Linear(temb_size, 2·hidden)).

Extensions that leave the state dict unchanged:
- noise_labels_s=None skips the s embedding (as the official);
- `backend` ("auto", "triton", "torch"; `fused=False` is "torch") picks the implementation of
  every fused op, settable at run time for A/B comparisons;
- `batched_modulation=True` computes every block's (and the final layer's) adaLN modulation
  with one matmul. Their weights then live in one storage (each parameter a view of it), so
  the matmul reads them in place; after `.to()`, deepcopy or unpickling they are repacked.
  Their state-dict entries are then non-overlapping views of that storage (safetensors 0.8's
  save_file and torch.save store them as usual).

Fusion: positional time features run the fused `timestep_embedding`; each block's
norm1/modulate is `adaln_modulate` for the first block and otherwise comes out of the
previous `adaln_residual_modulate`, which fuses "x = x + gate·branch" with the LayerNorm and
modulation that follow it (norm2 inside a block, the next block's norm1 or the final layer's
norm_final after it): 1 + 2·depth adaLN launches per forward. Attention is
F.scaled_dot_product_attention on timm's qkv layout (timm's own fused path).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from ..ops.adaln import adaln_modulate, adaln_residual_modulate
from ..ops.timestep import timestep_embedding
from ..validation import check_choice, check_finite, check_positive_int, check_probability, check_rate

__all__ = [
    "TimestepEmbedder",
    "LabelEmbedder",
    "DiTBlock",
    "FinalLayer",
    "DiT",
    "DiT_models",
    "DIT_SIZES",
    "get_2d_sincos_pos_embed",
    *(f"DiT_{size}_{patch}" for size in ("S", "B", "L", "XL") for patch in (2, 4, 8)),
]

BACKENDS = ("auto", "triton", "torch")
EMBEDDING_TYPES = ("positional", "fourier")
EMBEDDING_KWARGS = ("embedding_type", "use_mlp", "scale", "frequency_embedding_size")  # TimestepEmbedder's options
LAYER_NORM_EPS = 1e-6
QK_NORM_EPS = 1e-5  # nn.LayerNorm's default, as timm's qk_norm uses it


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> Tensor:
    """(grid_size², embed_dim) float32 fixed position embedding of DiT/MAE.

    Token i·grid_size + j (row i, column j) gets [sin(j·ω), cos(j·ω), sin(i·ω), cos(i·ω)]
    with ω_k = 10000^(-k / (embed_dim/4)), k < embed_dim/4; computed in float64.
    """
    omega = 10000.0 ** (-torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim // 4))
    coords = torch.arange(grid_size, dtype=torch.float64)
    row, col = torch.meshgrid(coords, coords, indexing="ij")

    def axis(position: Tensor) -> Tensor:
        angles = position.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([axis(col), axis(row)], dim=1).float()


class TimestepEmbedder(nn.Module):
    """(B,) times -> (B, hidden_size): positional (fused op) or Fourier features, then
    Linear-SiLU-Linear (use_mlp=False: the features themselves, frequency_embedding_size wide).

    Fourier features use the buffer `freqs` (frequency_embedding_size // 2 values, drawn as
    randn · scale here and saved in the state dict).
    """

    def __init__(
        self,
        hidden_size: int,
        frequency_embedding_size: int = 256,
        embedding_type: str = "positional",
        use_mlp: bool = True,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        check_positive_int("frequency_embedding_size", frequency_embedding_size)
        check_choice("embedding_type", embedding_type, EMBEDDING_TYPES)
        _check_bool("use_mlp", use_mlp)
        check_finite("scale", scale)
        if embedding_type == "fourier" and frequency_embedding_size % 2:
            raise ValueError(
                f"frequency_embedding_size must be even for Fourier features (cos and sin of "
                f"frequency_embedding_size // 2 frequencies), got {frequency_embedding_size}"
            )
        if not use_mlp and frequency_embedding_size != hidden_size:
            raise ValueError(
                f"use_mlp=False makes the time features the embedding: frequency_embedding_size "
                f"({frequency_embedding_size}) must equal the embedding width ({hidden_size}, "
                f"hidden_size · temb_mult in DiT)"
            )
        self.frequency_embedding_size = frequency_embedding_size
        self.embedding_type = embedding_type
        self.use_mlp = use_mlp
        if use_mlp:
            self.mlp = nn.Sequential(
                nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
            )
        if embedding_type == "fourier":
            self.register_buffer("freqs", torch.randn(frequency_embedding_size // 2) * scale)

    def features(self, t: Tensor, backend: str = "auto") -> Tensor:
        """(B, frequency_embedding_size) time features, angles in float64."""
        if self.embedding_type == "positional":
            return timestep_embedding(t, self.frequency_embedding_size, backend=backend)
        angles = t.to(torch.float64)[:, None] * (2 * math.pi * self.freqs.to(torch.float64))
        features = torch.cat([angles.cos(), angles.sin()], dim=1)
        return features.to(t.dtype if t.is_floating_point() else torch.float32)

    def forward(self, t: Tensor, backend: str = "auto") -> Tensor:
        features = self.features(t, backend)
        if not self.use_mlp:
            return features
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Label rows or class indices -> (B, hidden_size) rows of `embedding_table`.

    The table has num_classes + 1 rows, the last (index num_classes) the null class; with
    dropout_prob > 0 one more (the official's label-drop row, unused here: IMMLoss drops labels).
    A (N, num_classes) row selects argmax([row, 1 - sum(row)]): its class when one-hot, the null
    class when all zero. (N,) integer indices select their row.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1 + int(dropout_prob > 0), hidden_size)

    def forward(self, class_labels: Tensor) -> Tensor:
        if class_labels.dim() == 2:
            rows = class_labels if class_labels.is_floating_point() else class_labels.float()
            null_weight = 1 - rows.sum(dim=1, keepdim=True)
            index = torch.cat([rows, null_weight], dim=1).argmax(dim=1)  # no host sync
        else:
            index = class_labels.long()
        return self.embedding_table(index)


class PatchEmbed(nn.Module):
    """(B, C, S, S) -> (B, (S/p)², hidden) by a p×p stride-p conv (timm's PatchEmbed, same names)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with timm's layout (qkv, optional q_norm/k_norm, proj; so timm and
    DiT weights load): SDPA inside. The norms act on each head's q and k; without qk_norm they are
    identities with no parameters, as in timm."""

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.q_norm = nn.LayerNorm(head_dim, eps=QK_NORM_EPS) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim, eps=QK_NORM_EPS) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, hidden = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, hidden // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, head_dim)
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, hidden))


class Mlp(nn.Module):
    """fc1 - GELU(tanh) - dropout - fc2 - dropout, timm's Mlp names."""

    def __init__(self, hidden_size: int, mlp_hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block; temb_size (default hidden_size) is the conditioning's width.

    Standalone `forward(x, c)` runs the block alone; `DiT` instead chains blocks with
    `forward_chained`, which ends in the next block's (or the final layer's) modulation so
    that every residual add is fused with the LayerNorm and modulation after it.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        temb_size: int | None = None,
        qk_norm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.attn = Attention(hidden_size, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(temb_size or hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor, backend: str = "auto") -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h = adaln_modulate(x, shift_msa, scale_msa, self.norm1.eps, backend=backend)
        h, x = adaln_residual_modulate(x, self.attn(h), gate_msa, shift_mlp, scale_mlp, self.norm2.eps, backend=backend)
        return x + gate_mlp[:, None] * self.mlp(h)

    def forward_chained(
        self,
        x: Tensor,
        h: Tensor,
        modulation: Tensor,
        next_shift: Tensor,
        next_scale: Tensor,
        next_eps: float,
        backend: str = "auto",
    ) -> tuple[Tensor, Tensor]:
        """(h', x') for the residual stream x and h = modulate(norm1(x)) given by the caller.

        x' is the block's output and h' = LN(x')·(1 + next_scale) + next_shift, the input
        of whatever comes next. modulation is this block's (B, 6·hidden) adaLN output.
        """
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)
        h, x = adaln_residual_modulate(x, self.attn(h), gate_msa, shift_mlp, scale_mlp, self.norm2.eps, backend=backend)
        return adaln_residual_modulate(x, self.mlp(h), gate_mlp, next_shift, next_scale, next_eps, backend=backend)


class FinalLayer(nn.Module):
    """Modulated LayerNorm, then a linear map of each token to its patch_size² · out_channels values.

    The adaLN takes the temb_size-wide conditioning (default hidden_size); the official layer
    takes hidden_size inputs whatever temb_mult is (see the module docstring).
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, *, temb_size: int | None = None) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(temb_size or hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor, backend: str = "auto") -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(adaln_modulate(x, shift, scale, self.norm_final.eps, backend=backend))


def _packed_rows(tensors: list[Tensor]) -> Tensor | None:
    """The row-wise concatenation of `tensors` as a view of their storage, or None when they
    are not consecutive contiguous pieces of one storage."""
    first = tensors[0]
    expected_ptr = first.data_ptr()
    for tensor in tensors:
        if (
            tensor.dtype != first.dtype
            or tensor.device != first.device
            or not tensor.is_contiguous()
            or tensor.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
            or tensor.data_ptr() != expected_ptr
        ):
            return None
        expected_ptr += tensor.numel() * tensor.element_size()
    rows = sum(tensor.shape[0] for tensor in tensors)
    return first.detach().as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


class _StackedLinear(torch.autograd.Function):
    """F.linear(cond, weight, bias) where weight and bias are packed aliases of the parameters
    passed after them; the backward returns each parameter's slice of the gradient.

    Under autocast it computes in the autocast dtype, as autocast's own linear would, and
    returns gradients in the parameters' dtype.
    """

    @staticmethod
    def forward(ctx, cond: Tensor, weight: Tensor, bias: Tensor, *params: Tensor) -> Tensor:
        device_type = cond.device.type
        dtype = cond.dtype
        if torch.is_autocast_enabled(device_type) and cond.dtype != torch.float64:
            dtype = torch.get_autocast_dtype(device_type)
        cond_c, weight_c, bias_c = cond.to(dtype), weight.to(dtype), bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            out = F.linear(cond_c, weight_c, bias_c)
        ctx.save_for_backward(cond_c, weight_c)
        ctx.rows = [p.shape[0] for p in params[: len(params) // 2]]
        ctx.cond_dtype, ctx.param_dtype = cond.dtype, weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        cond_c, weight_c = ctx.saved_tensors
        grad = grad.to(cond_c.dtype)
        grad_cond = (grad @ weight_c).to(ctx.cond_dtype) if ctx.needs_input_grad[0] else None
        if not any(ctx.needs_input_grad[3:]):
            return grad_cond, None, None, *[None] * (2 * len(ctx.rows))
        grad_weight = (grad.t() @ cond_c).to(ctx.param_dtype)
        grad_bias = grad.sum(0).to(ctx.param_dtype)
        return grad_cond, None, None, *grad_weight.split(ctx.rows), *grad_bias.split(ctx.rows)


def _one_of_two_names(name: str, value, alias: str, alias_value, default):
    """The argument given as `name` or `alias` (the official name), default if neither."""
    if value is not None and alias_value is not None and value != alias_value:
        raise ValueError(f"{name}={value!r} and {alias}={alias_value!r} disagree; {alias} is another name for {name}")
    if value is not None:
        return value
    return default if alias_value is None else alias_value


class DiT(nn.Module):
    """Diffusion transformer with two time embeddings, the IMM backbone G(x, t, s, labels).

    The positional arguments are the official DiT's, in its order. Arguments given under two
    names must agree (ValueError otherwise).

    Args:
        input_size (or img_resolution): side S of the (C, S, S) input (latent) images; default 32.
        patch_size: p; S must be a multiple of it. L = (S/p)² tokens.
        in_channels (or img_channels): C, default 4; the output has the same shape as the input
            (out_channels, if given, must equal C).
        hidden_size, depth, num_heads, mlp_ratio: the transformer.
        class_dropout_prob: > 0 adds the official's label-drop row to the label table (the
            dropping itself is IMMLoss's `label_dropout`).
        num_classes (or label_dim): number of classes, default 1000; 0 for an unconditional
            model (no y_embedder).
        s_embed: False leaves out the s embedding (no s_embedder; noise_labels_s is ignored).
        qk_norm: LayerNorm of each head's q and k (timm's qk_norm).
        skip: accepted for the official configs; no effect (none in the official either).
        embedding_kwargs: the time embedders' options: embedding_type ("positional" or
            "fourier"), use_mlp (default True), scale (Fourier frequency scale, default 1),
            frequency_embedding_size (default 256; = temb_size when use_mlp is False).
        temb_mult: the conditioning is temb_size = hidden_size · temb_mult wide.
        dropout: rate of the blocks' MLP dropouts (training mode only).
        backend: "auto", "triton" or "torch" (the references) for every fused op.
        batched_modulation: all adaLN modulations in one matmul (see the module docstring).
        checkpoint_activations: in training (grad mode), keep only each block's inputs and
            recompute the block in the backward pass (torch.utils.checkpoint, non-reentrant; the
            RNG state is replayed, so dropout masks repeat): activation memory O(depth · input)
            instead of O(depth · block), for one more forward of the blocks. Settable at run time.
    """

    def __init__(
        self,
        input_size: int | None = None,
        patch_size: int = 2,
        in_channels: int | None = None,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.0,
        num_classes: int | None = None,
        s_embed: bool = True,
        qk_norm: bool = False,
        skip: bool = False,
        embedding_kwargs: Mapping | None = None,
        temb_mult: int = 1,
        dropout: float = 0.0,
        *,
        img_resolution: int | None = None,
        img_channels: int | None = None,
        label_dim: int | None = None,
        out_channels: int | None = None,
        backend: str = "auto",
        batched_modulation: bool = False,
        checkpoint_activations: bool = False,
        **unknown_kwargs,
    ) -> None:
        super().__init__()
        if unknown_kwargs:
            raise TypeError(f"DiT got unexpected keyword arguments {sorted(unknown_kwargs)}")
        input_size = _one_of_two_names("input_size", input_size, "img_resolution", img_resolution, 32)
        in_channels = _one_of_two_names("in_channels", in_channels, "img_channels", img_channels, 4)
        num_classes = _one_of_two_names("num_classes", num_classes, "label_dim", label_dim, 1000)
        for name, value, low in (
            ("input_size", input_size, 1),
            ("patch_size", patch_size, 1),
            ("in_channels", in_channels, 1),
            ("hidden_size", hidden_size, 4),
            ("depth", depth, 1),
            ("num_heads", num_heads, 1),
            ("num_classes", num_classes, 0),
            ("temb_mult", temb_mult, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if out_channels is not None and out_channels != in_channels:
            raise ValueError(
                f"out_channels ({out_channels!r}) must equal in_channels ({in_channels}): "
                "the output has the input's channels"
            )
        if input_size % patch_size:
            raise ValueError(f"input_size ({input_size}) must be a multiple of patch_size ({patch_size})")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})")
        if hidden_size % 4:
            raise ValueError(f"hidden_size must be a multiple of 4 (2-D sin-cos position embedding), got {hidden_size}")
        check_probability("class_dropout_prob", class_dropout_prob)
        check_rate("dropout", dropout)
        for name, value in (("s_embed", s_embed), ("qk_norm", qk_norm), ("skip", skip)):
            _check_bool(name, value)
        embedding_kwargs = dict(embedding_kwargs or {})
        unknown_embedding_kwargs = sorted(set(embedding_kwargs) - set(EMBEDDING_KWARGS))
        if unknown_embedding_kwargs:
            raise TypeError(
                f"embedding_kwargs has unknown keys {unknown_embedding_kwargs} (known: {list(EMBEDDING_KWARGS)})"
            )
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.s_embed = s_embed
        self.skip = skip
        self.temb_size = temb_size = hidden_size * temb_mult
        self.backend = backend
        self.batched_modulation = bool(batched_modulation)
        self.checkpoint_activations = bool(checkpoint_activations)

        num_patches = (input_size // patch_size) ** 2
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(temb_size, **embedding_kwargs)
        self.s_embedder = TimestepEmbedder(temb_size, **embedding_kwargs) if s_embed else None
        self.y_embedder = LabelEmbedder(num_classes, temb_size, class_dropout_prob) if num_classes > 0 else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, temb_size=temb_size, qk_norm=qk_norm, dropout=dropout)
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, temb_size=temb_size)
        self.initialize_weights()
        if self.batched_modulation:
            self.pack_modulation()

    # Run-time switches.

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        self._backend = value

    @property
    def fused(self) -> bool:
        """False when every fused op runs its PyTorch reference (backend "torch")."""
        return self._backend != "torch"

    @fused.setter
    def fused(self, value: bool) -> None:
        self.backend = "auto" if value else "torch"

    # Weights.

    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier-uniform linears with zero biases, unit q/k norms, the patch
        conv like a linear, normal(0.02) embeddings, the fixed sin-cos pos_embed, zero adaLN and
        output layers. Fourier `freqs` are left as drawn."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        grid_size = self.input_size // self.patch_size
        self.pos_embed.data.copy_(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid_size)[None])
        patch_weight = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(patch_weight.view(patch_weight.shape[0], -1))
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for embedder in (self.t_embedder, self.s_embedder):
            if embedder is not None and embedder.use_mlp:
                nn.init.normal_(embedder.mlp[0].weight, std=0.02)
                nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        for linear in self._modulation_linears():
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def _modulation_linears(self) -> list[nn.Linear]:
        return [block.adaLN_modulation[1] for block in self.blocks] + [self.final_layer.adaLN_modulation[1]]

    def pack_modulation(self) -> None:
        """Moves the adaLN weights (and biases) of all blocks and the final layer into one
        storage, each parameter a view of it, so that `batched_modulation` reads them in place.

        Parameter objects are kept (`.data` is rebound), so optimizers and hooks stay valid.
        Called by the constructor, `.to()`/`.cuda()`, deepcopy and unpickling; call it after
        anything else that gives the parameters new storage (e.g. load_state_dict(assign=True)).
        """
        linears = self._modulation_linears()
        for name in ("weight", "bias"):
            params = [getattr(linear, name) for linear in linears]
            if _packed_rows(params) is not None:
                continue
            flat = torch.cat([param.detach() for param in params])
            start = 0
            for param in params:
                param.data = flat[start : start + param.shape[0]]
                start += param.shape[0]

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.batched_modulation:
            self.pack_modulation()
        return self

    def __setstate__(self, state):
        super().__setstate__(state)
        if self.batched_modulation:
            self.pack_modulation()

    # The model.

    def _modulations(self, c: Tensor) -> list[Tensor]:
        """Each block's (B, 6·hidden) and the final layer's (B, 2·hidden) adaLN modulation of the
        (B, temb_size) conditioning c."""
        linears = self._modulation_linears()
        if not self.batched_modulation:
            return [block.adaLN_modulation(c) for block in self.blocks] + [self.final_layer.adaLN_modulation(c)]
        weights = [linear.weight for linear in linears]
        biases = [linear.bias for linear in linears]
        cond = F.silu(c)
        packed = None if torch.compiler.is_compiling() else (_packed_rows(weights), _packed_rows(biases))
        if packed is not None and packed[0] is not None and packed[1] is not None:
            stacked = _StackedLinear.apply(cond, *packed, *weights, *biases)
        else:  # not packed (or compiling): correct, but copies the weights once per call
            stacked = F.linear(cond, torch.cat(weights), torch.cat(biases))
        return list(stacked.split([weight.shape[0] for weight in weights], dim=1))

    def _check_x(self, x) -> int:
        expected = (self.in_channels, self.input_size, self.input_size)
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor of shape (B, {', '.join(map(str, expected))})")
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        return x.shape[0]

    @staticmethod
    def _batch_times(name: str, times, batch: int) -> Tensor:
        """times of any shape holding `batch` values or one (broadcast) as a (batch,) tensor."""
        if not isinstance(times, Tensor):
            raise TypeError(f"{name} must be a tensor of shape ({batch},), got {type(times).__name__}")
        if times.numel() not in (batch, 1):
            raise ValueError(
                f"{name} must hold {batch} values or 1 (shape ({batch},), (1,), () or e.g. ({batch}, 1, 1, 1)), "
                f"got shape {tuple(times.shape)}"
            )
        return times.reshape(-1).expand(batch)

    def _check_class_labels(self, class_labels, batch: int) -> None:
        if class_labels is None:
            return
        if self.y_embedder is None:
            raise ValueError("class_labels were given but the model is unconditional (num_classes=0)")
        if not isinstance(class_labels, Tensor):
            raise TypeError(f"class_labels must be a tensor or None, got {type(class_labels).__name__}")
        shape = tuple(class_labels.shape)
        is_real = not class_labels.is_complex()
        is_integer = is_real and not class_labels.is_floating_point() and class_labels.dtype != torch.bool
        is_rows = is_real and len(shape) == 2 and shape[0] in (batch, 1) and shape[1] == self.num_classes
        is_indices = is_integer and len(shape) == 1 and shape[0] in (batch, 1)
        if not (is_rows or is_indices):
            raise ValueError(
                f"class_labels must be label rows of shape ({batch}, {self.num_classes}) or (1, {self.num_classes}) "
                f"(one-hot; all zeros is the null class) or integer class indices of shape ({batch},) or (1,); "
                f"got {shape} of {class_labels.dtype}"
            )

    def _conditioning(self, batch: int, noise_labels_t: Tensor, noise_labels_s, class_labels, device) -> Tensor:
        c = self.t_embedder(self._batch_times("noise_labels_t", noise_labels_t, batch), self.backend)
        if self.s_embedder is not None and noise_labels_s is not None:
            c = c + self.s_embedder(self._batch_times("noise_labels_s", noise_labels_s, batch), self.backend)
        if self.y_embedder is not None:
            if class_labels is None:  # the null label
                class_labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
            c = c + self.y_embedder(class_labels.to(device))  # a single label row or index broadcasts
        return c

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """(B, L, p²·C) -> (B, C, S, S); token l covers patch row l // (S/p), column l % (S/p)."""
        batch, p, channels = tokens.shape[0], self.patch_size, self.out_channels
        grid = self.input_size // p
        patches = tokens.reshape(batch, grid, grid, p, p, channels)
        return patches.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, grid * p, grid * p)

    def forward(
        self,
        x: Tensor,
        noise_labels_t: Tensor,
        noise_labels_s: Tensor | None = None,
        class_labels: Tensor | None = None,
    ) -> Tensor:
        """G(x, t, s, labels) -> (B, C, S, S).

        Args:
            x: (B, C, S, S) input (c_in-scaled x_t in IMM).
            noise_labels_t, noise_labels_s: times (IMM: 1000·t and 1000·s or 1000·(t - s)) of
                any shape holding B values, or one for the whole batch: (B,), (1,), (), (B, 1, 1, 1).
                noise_labels_s=None leaves out the s embedding; without s_embed it is ignored.
            class_labels: (B, num_classes) label rows (one-hot; all zeros: the null class; any
                row: argmax of [row, 1 - sum(row)]), also integer; one (1, num_classes) row for
                the whole batch; (B,) integer class indices (num_classes: the null class); or
                None (the null class; required for num_classes=0).
        """
        batch = self._check_x(x)
        if self.s_embedder is None:
            noise_labels_s = None  # ignored, as in the official model
        self._check_class_labels(class_labels, batch)
        backend = self.backend
        c = self._conditioning(batch, noise_labels_t, noise_labels_s, class_labels, x.device)
        *block_modulations, final_modulation = self._modulations(c)
        final_shift, final_scale = final_modulation.chunk(2, dim=1)

        x = self.x_embedder(x) + self.pos_embed
        first_shift, first_scale = block_modulations[0].chunk(6, dim=1)[:2]
        h = adaln_modulate(x, first_shift, first_scale, self.blocks[0].norm1.eps, backend=backend)
        for index, (block, modulation) in enumerate(zip(self.blocks, block_modulations)):
            if index + 1 < len(self.blocks):
                next_shift, next_scale = block_modulations[index + 1].chunk(6, dim=1)[:2]
                next_eps = self.blocks[index + 1].norm1.eps
            else:
                next_shift, next_scale, next_eps = final_shift, final_scale, self.final_layer.norm_final.eps
            if self.checkpoint_activations and torch.is_grad_enabled():
                h, x = torch.utils.checkpoint.checkpoint(
                    block.forward_chained,
                    x,
                    h,
                    modulation,
                    next_shift,
                    next_scale,
                    next_eps,
                    backend,
                    use_reentrant=False,
                )
            else:
                h, x = block.forward_chained(x, h, modulation, next_shift, next_scale, next_eps, backend)
        return self.unpatchify(self.final_layer.linear(h))


def _config(depth: int, hidden_size: int, num_heads: int, patch_size: int):
    def make(**kwargs) -> DiT:
        return DiT(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size, **kwargs)

    return make


DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}  # depth, hidden, heads

DiT_S_2, DiT_S_4, DiT_S_8 = (_config(*DIT_SIZES["S"], p) for p in (2, 4, 8))
DiT_B_2, DiT_B_4, DiT_B_8 = (_config(*DIT_SIZES["B"], p) for p in (2, 4, 8))
DiT_L_2, DiT_L_4, DiT_L_8 = (_config(*DIT_SIZES["L"], p) for p in (2, 4, 8))
DiT_XL_2, DiT_XL_4, DiT_XL_8 = (_config(*DIT_SIZES["XL"], p) for p in (2, 4, 8))

DiT_models = {f"DiT-{size}/{patch}": globals()[f"DiT_{size}_{patch}"] for size in DIT_SIZES for patch in (2, 4, 8)}
for _name, _make in DiT_models.items():
    _make.__name__ = _make.__qualname__ = _name.replace("-", "_").replace("/", "_")
    _make.__doc__ = f"{_name}: DiT(depth, hidden_size, num_heads, patch_size) of DiT's table; kwargs go to DiT."
del _name, _make
