"""The IMM DiT on the fused adaLN and timestep-embedding ops.

The architecture is DiT (Peebles & Xie, facebookresearch/DiT `models.py`) as extended by IMM
(lumalabs/imm `training/dit.py`, whose source was not available to this project). The
parameter names and shapes are meant to equal the public IMM DiT's so that its state dicts
load with strict=True. What was assumed about the IMM DiT, beyond DiT itself:

- a second time embedder `s_embedder`, a `TimestepEmbedder` exactly like `t_embedder`
  (256 frequencies, max_period 10000, Linear-SiLU-Linear), initialised like it (normal(0.02)
  weights, zero biases); the conditioning is c = t_emb + s_emb (+ y_emb when conditional);
- the backbone signature (x, noise_labels_t, noise_labels_s, class_labels) with class_labels
  one-hot float rows (EDM convention); an all-zero row is the null class of classifier-free
  guidance, i.e. the last row of `y_embedder.embedding_table` (num_classes + 1 rows when
  class_dropout_prob > 0, as in DiT);
- learn_sigma is off: the output has the input's channels (final_layer.linear has
  patch_size² · in_channels outputs);
- no label dropout inside the model: `imm_kernels.IMMLoss` drops labels (to the null row) so
  that both of its passes see the same labels.

State dict (in order): pos_embed (1, L, H) (fixed 2-D sin-cos, not trainable),
x_embedder.proj.{weight,bias} (patchify conv), t_embedder.mlp.{0,2}.{weight,bias},
s_embedder.mlp.{0,2}.{weight,bias}, y_embedder.embedding_table.weight, then per block
blocks.N.attn.qkv, blocks.N.attn.proj, blocks.N.mlp.fc1, blocks.N.mlp.fc2,
blocks.N.adaLN_modulation.1 (Linear(H, 6H)), and final_layer.linear,
final_layer.adaLN_modulation.1 (Linear(H, 2H)). norm1, norm2 and norm_final are LayerNorms
without affine parameters (eps 1e-6).

Extensions that leave the state dict unchanged:
- class_labels may also be (B,) integer class indices (num_classes is the null class); with
  class_dropout_prob = 0 there is no null row and an all-zero row adds no label embedding;
- noise_labels_s=None skips the s embedding (plain DiT conditioning);
- `backend` ("auto", "triton", "torch"; `fused=False` is "torch") picks the implementation of
  every fused op, settable at run time for A/B comparisons;
- `batched_modulation=True` computes every block's (and the final layer's) adaLN modulation
  with one matmul. Their weights then live in one storage (each parameter a view of it), so
  the matmul reads them in place; after `.to()`, deepcopy or unpickling they are repacked.
  Their state-dict entries are then non-overlapping views of that storage (safetensors 0.8's
  save_file and torch.save store them as usual).

Fusion: the timestep embeddings run the fused `timestep_embedding`; each block's
norm1/modulate is `adaln_modulate` for the first block and otherwise comes out of the
previous `adaln_residual_modulate`, which fuses "x = x + gate·branch" with the LayerNorm and
modulation that follow it (norm2 inside a block, the next block's norm1 or the final layer's
norm_final after it): 1 + 2·depth adaLN launches per forward. Attention is
F.scaled_dot_product_attention on timm's qkv layout.

Numerics: the fused timestep embedding (and its reference) computes the angles t·f_i in
float64; DiT's own fp32 formula is off by up to ~1e-4 at t ~ 1000. A state dict trained with
that formula therefore sees frequency features within ~1e-4 of the ones it was trained on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.adaln import adaln_modulate, adaln_residual_modulate
from ..ops.timestep import timestep_embedding

__all__ = [
    "TimestepEmbedder",
    "LabelEmbedder",
    "DiTBlock",
    "FinalLayer",
    "DiT",
    "DiT_models",
    "get_2d_sincos_pos_embed",
    *(f"DiT_{size}_{patch}" for size in ("S", "B", "L", "XL") for patch in (2, 4, 8)),
]

BACKENDS = ("auto", "triton", "torch")
LAYER_NORM_EPS = 1e-6


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
    """(B,) times -> (B, hidden): sinusoidal features (fused op), then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: Tensor, backend: str = "auto") -> Tensor:
        frequencies = timestep_embedding(t, self.frequency_embedding_size, backend=backend)
        return self.mlp(frequencies.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """One-hot rows or class indices -> (B, hidden) rows of `embedding_table`.

    With class_dropout_prob > 0 the table has a last, null-class row (classifier-free
    guidance): all-zero one-hot rows and the index num_classes select it.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.has_null_class = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(self.has_null_class), hidden_size)

    def forward(self, class_labels: Tensor) -> Tensor:
        if class_labels.is_floating_point():
            # argmax of a one-hot row; all-zero rows are the null class. No host sync.
            index = torch.where(class_labels.ne(0).any(dim=1), class_labels.argmax(dim=1), self.num_classes)
        else:
            index = class_labels.long()
        if self.has_null_class:
            return self.embedding_table(index)
        is_class = index < self.num_classes
        embedding = self.embedding_table(torch.where(is_class, index, 0))
        return embedding * is_class[:, None].to(embedding.dtype)


class PatchEmbed(nn.Module):
    """(B, C, S, S) -> (B, (S/p)², hidden) by a p×p stride-p conv (timm's PatchEmbed, same names)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with timm's qkv layout (so timm/DiT weights load): SDPA inside."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, hidden = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, hidden // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, hidden))


class Mlp(nn.Module):
    """fc1 - GELU(tanh) - fc2, timm's Mlp names."""

    def __init__(self, hidden_size: int, mlp_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block.

    Standalone `forward(x, c)` runs the block alone; `DiT` instead chains blocks with
    `forward_chained`, which ends in the next block's (or the final layer's) modulation so
    that every residual add is fused with the LayerNorm and modulation after it.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

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
    """Modulated LayerNorm, then a linear map of each token to its patch_size² · out_channels values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

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


class DiT(nn.Module):
    """Diffusion transformer with two time embeddings, the IMM backbone G(x, t, s, labels).

    Args:
        input_size: side S of the (C, S, S) input (latent) images.
        patch_size: p; S must be a multiple of it. L = (S/p)² tokens.
        in_channels: C; the output has the same shape as the input.
        hidden_size, depth, num_heads, mlp_ratio: the transformer.
        class_dropout_prob: > 0 adds the null-class row for classifier-free guidance (the
            dropping itself is IMMLoss's `label_dropout`).
        num_classes: 0 for an unconditional model (no y_embedder).
        backend: "auto", "triton" or "torch" (the references) for every fused op.
        batched_modulation: all adaLN modulations in one matmul (see the module docstring).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        *,
        backend: str = "auto",
        batched_modulation: bool = False,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("input_size", input_size, 1),
            ("patch_size", patch_size, 1),
            ("in_channels", in_channels, 1),
            ("hidden_size", hidden_size, 4),
            ("depth", depth, 1),
            ("num_heads", num_heads, 1),
            ("num_classes", num_classes, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if input_size % patch_size:
            raise ValueError(f"input_size ({input_size}) must be a multiple of patch_size ({patch_size})")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})")
        if hidden_size % 4:
            raise ValueError(f"hidden_size must be a multiple of 4 (2-D sin-cos position embedding), got {hidden_size}")
        if not 0 <= class_dropout_prob <= 1:
            raise ValueError(f"class_dropout_prob must be in [0, 1], got {class_dropout_prob!r}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.backend = backend
        self.batched_modulation = bool(batched_modulation)

        num_patches = (input_size // patch_size) ** 2
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.s_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
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
        """DiT's initialisation: xavier-uniform linears with zero biases, the patch conv like a
        linear, normal(0.02) embeddings, the fixed sin-cos pos_embed, zero adaLN and output layers."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        grid_size = self.input_size // self.patch_size
        self.pos_embed.data.copy_(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid_size)[None])
        patch_weight = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(patch_weight.view(patch_weight.shape[0], -1))
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for embedder in (self.t_embedder, self.s_embedder):
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
        """Each block's (B, 6·hidden) and the final layer's (B, 2·hidden) adaLN modulation."""
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

    def _check_inputs(self, x: Tensor, noise_labels_t, noise_labels_s, class_labels) -> int:
        expected = (self.in_channels, self.input_size, self.input_size)
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor of shape (B, {', '.join(map(str, expected))})")
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        batch = x.shape[0]
        for name, times in (("noise_labels_t", noise_labels_t), ("noise_labels_s", noise_labels_s)):
            if times is None and name == "noise_labels_s":
                continue
            if not isinstance(times, Tensor):
                raise TypeError(f"{name} must be a tensor of shape ({batch},), got {type(times).__name__}")
            if times.shape not in (torch.Size([]), torch.Size([batch])):
                raise ValueError(f"{name} must have shape ({batch},) or (), got {tuple(times.shape)}")
        if class_labels is None:
            return batch
        if self.y_embedder is None:
            raise ValueError("class_labels were given but the model is unconditional (num_classes=0)")
        if not isinstance(class_labels, Tensor):
            raise TypeError(f"class_labels must be a tensor or None, got {type(class_labels).__name__}")
        if class_labels.is_floating_point():
            if class_labels.shape != (batch, self.num_classes):
                raise ValueError(
                    f"class_labels must be one-hot rows of shape ({batch}, {self.num_classes}), "
                    f"got {tuple(class_labels.shape)}"
                )
        elif class_labels.dtype == torch.bool or class_labels.shape != (batch,):
            raise ValueError(
                f"integer class_labels must be class indices of shape ({batch},), "
                f"got {tuple(class_labels.shape)} of {class_labels.dtype}"
            )
        return batch

    def _conditioning(self, batch: int, noise_labels_t: Tensor, noise_labels_s, class_labels, device) -> Tensor:
        c = self.t_embedder(noise_labels_t.expand(batch), self.backend)
        if noise_labels_s is not None:
            c = c + self.s_embedder(noise_labels_s.expand(batch), self.backend)
        if self.y_embedder is not None:
            if class_labels is None:  # the null label
                class_labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
            c = c + self.y_embedder(class_labels.to(device))
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
            noise_labels_t, noise_labels_s: (B,) or 0-dim times (IMM: 1000·t and 1000·s or
                1000·(t - s)); noise_labels_s=None leaves out the s embedding.
            class_labels: (B, num_classes) one-hot rows (all zeros: the null class), (B,)
                class indices, or None (the null class; required for num_classes=0).
        """
        batch = self._check_inputs(x, noise_labels_t, noise_labels_s, class_labels)
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
            h, x = block.forward_chained(x, h, modulation, next_shift, next_scale, next_eps, backend)
        return self.unpatchify(self.final_layer.linear(h))


def _config(depth: int, hidden_size: int, num_heads: int, patch_size: int):
    def make(**kwargs) -> DiT:
        return DiT(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size, **kwargs)

    return make


_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}

DiT_S_2, DiT_S_4, DiT_S_8 = (_config(*_SIZES["S"], p) for p in (2, 4, 8))
DiT_B_2, DiT_B_4, DiT_B_8 = (_config(*_SIZES["B"], p) for p in (2, 4, 8))
DiT_L_2, DiT_L_4, DiT_L_8 = (_config(*_SIZES["L"], p) for p in (2, 4, 8))
DiT_XL_2, DiT_XL_4, DiT_XL_8 = (_config(*_SIZES["XL"], p) for p in (2, 4, 8))

DiT_models = {f"DiT-{size}/{patch}": globals()[f"DiT_{size}_{patch}"] for size in _SIZES for patch in (2, 4, 8)}
for _name, _make in DiT_models.items():
    _make.__name__ = _make.__qualname__ = _name.replace("-", "_").replace("/", "_")
    _make.__doc__ = f"{_name}: DiT(depth, hidden_size, num_heads, patch_size) of DiT's table; kwargs go to DiT."
del _name, _make
