"""imm_kernels.models.DiT: the IMM DiT's state dict and options, the fused ops against their
references, an independent plain transcription of the DiT forward (lumalabs/imm training/dit.py),
batched modulation, labels, calling conventions, constructor names, errors.

Models are tiny (Triton runs in its CPU interpreter here). DiT starts with zero adaLN and
output layers, i.e. output 0 whatever the input: every comparison randomises the weights first.
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from imm_kernels import IMMLoss, Preconditioner
from imm_kernels.models import DiT, DiT_models, DiTBlock, FinalLayer
from imm_kernels.models.dit import get_2d_sincos_pos_embed

pytestmark = pytest.mark.usefixtures("one_thread", "fp32_convolutions")

TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=24, depth=2, num_heads=2, num_classes=5)
FUSED = "triton"  # runs in the interpreter on the CPU; "auto" could silently take the reference
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # conftest sets TRITON_INTERPRET=1 without CUDA

CONFIGS = {  # DiT's table: (depth, hidden, heads)
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}

FOURIER = dict(embedding_type="fourier", scale=0.02)  # freqs ~ N(0, 0.02²): 2π·1000·f stays O(100) rad
ALL_OPTIONS = dict(qk_norm=True, temb_mult=2, embedding_kwargs=FOURIER, class_dropout_prob=0.1, dropout=0.2, skip=True)
OPTION_CASES = {  # DiT options on top of TINY (hidden 24)
    "default": {},
    "qk_norm": dict(qk_norm=True),
    "no_s_embed": dict(s_embed=False),
    "temb_mult_2": dict(temb_mult=2),
    "fourier": dict(embedding_kwargs=FOURIER),
    "fourier_no_mlp": dict(temb_mult=2, embedding_kwargs={**FOURIER, "use_mlp": False, "frequency_embedding_size": 48}),
    "positional_no_mlp": dict(embedding_kwargs=dict(use_mlp=False, frequency_embedding_size=24)),
    "positional_64": dict(embedding_kwargs=dict(frequency_embedding_size=64)),
    "label_drop_row": dict(class_dropout_prob=0.1),
    "all": ALL_OPTIONS,
}


@pytest.fixture
def fp32_convolutions(monkeypatch):
    """cuDNN runs float32 convolutions (the patch embedding) in TF32, a 10-bit mantissa, by default on
    Ampere and later GPUs; the comparisons here are at float32 (and float64) rounding."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def tiny_dit(seed: int = 0, **overrides) -> DiT:
    torch.manual_seed(seed)
    return DiT(**{**TINY, **overrides}).to(DEVICE)


def randomise(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Weights ~ N(0, 1/fan_in), vectors ~ N(0, 0.1²) (LayerNorm gains 1 + that): activations stay
    O(1), nothing is zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            std = 1 / math.sqrt(param[0].numel()) if param.dim() >= 2 else 0.1
            value = torch.randn(param.shape, generator=generator) * std
            param.copy_((1 + value if name.endswith("norm.weight") else value).to(param.device))
    return model


def inputs(batch: int = 2, num_classes: int = 5, seed: int = 2):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 8, 8, generator=generator)
    t = torch.rand(batch, generator=generator) * 1000
    s = torch.rand(batch, generator=generator) * t
    labels = F.one_hot(torch.arange(batch) % num_classes, num_classes).float()
    labels[-1] = 0  # the null class
    return x.to(DEVICE), t.to(DEVICE), s.to(DEVICE), labels.to(DEVICE)


def soft_label_rows() -> torch.Tensor:
    """5 rows over 5 classes: one-hot, all zero, soft with a winning class, soft whose remainder
    1 - sum wins (the null class), and a tie (the first index wins)."""
    return torch.tensor(
        [
            [0.0, 0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.0],
            [0.1, 0.5, 0.2, 0.0, 0.0],  # remainder 0.2: class 1
            [0.2, 0.1, 0.0, 0.0, 0.0],  # remainder 0.7: the null class
            [0.0, 0.0, 0.5, 0.5, 0.0],  # remainder 0: classes 2 and 3 tie, class 2
        ],
        device=DEVICE,
    )


# ---------------------------------------------------------------------------
# The state dict of the public IMM DiT, written from its architecture
# ---------------------------------------------------------------------------


def expected_state_dict_shapes(
    depth,
    hidden,
    patch,
    in_channels=4,
    input_size=32,
    num_classes=1000,
    heads=None,
    *,
    class_dropout_prob=0.0,
    qk_norm=False,
    s_embed=True,
    temb_mult=1,
    embedding_kwargs=None,
    dropout=0.0,  # dropout and skip have no parameters
    skip=False,
):
    """The official IMM DiT's state dict: time embedders of width temb = hidden·temb_mult (Fourier:
    a freqs buffer; use_mlp: frequencies -> temb -> temb), a label table of num_classes + 1 rows
    (its null class) plus DiT's label-drop row when class_dropout_prob > 0, timm attention (q_norm,
    k_norm of head_dim with qk_norm) and adaLN linears reading the temb-wide conditioning."""
    embedding = {"embedding_type": "positional", "use_mlp": True, "frequency_embedding_size": 256}
    embedding.update(embedding_kwargs or {})
    frequencies, temb, tokens = embedding["frequency_embedding_size"], hidden * temb_mult, (input_size // patch) ** 2
    shapes = {
        "pos_embed": (1, tokens, hidden),
        "x_embedder.proj.weight": (hidden, in_channels, patch, patch),
        "x_embedder.proj.bias": (hidden,),
    }
    for embedder in ("t_embedder", "s_embedder") if s_embed else ("t_embedder",):
        if embedding["embedding_type"] == "fourier":
            shapes[f"{embedder}.freqs"] = (frequencies // 2,)
        if embedding["use_mlp"]:
            shapes[f"{embedder}.mlp.0.weight"] = (temb, frequencies)
            shapes[f"{embedder}.mlp.0.bias"] = (temb,)
            shapes[f"{embedder}.mlp.2.weight"] = (temb, temb)
            shapes[f"{embedder}.mlp.2.bias"] = (temb,)
    if num_classes:
        shapes["y_embedder.embedding_table.weight"] = (num_classes + 1 + int(class_dropout_prob > 0), temb)
    for n in range(depth):
        for name, out_features, in_features in (
            ("attn.qkv", 3 * hidden, hidden),
            ("attn.proj", hidden, hidden),
            ("mlp.fc1", 4 * hidden, hidden),
            ("mlp.fc2", hidden, 4 * hidden),
            ("adaLN_modulation.1", 6 * hidden, temb),
        ):
            shapes[f"blocks.{n}.{name}.weight"] = (out_features, in_features)
            shapes[f"blocks.{n}.{name}.bias"] = (out_features,)
        if qk_norm:
            for name in ("attn.q_norm", "attn.k_norm"):
                shapes[f"blocks.{n}.{name}.weight"] = shapes[f"blocks.{n}.{name}.bias"] = (hidden // heads,)
    shapes["final_layer.linear.weight"] = (patch * patch * in_channels, hidden)
    shapes["final_layer.linear.bias"] = (patch * patch * in_channels,)
    # The official reads hidden (not temb) inputs here, the same at temb_mult = 1 (the module docstring).
    shapes["final_layer.adaLN_modulation.1.weight"] = (2 * hidden, temb)
    shapes["final_layer.adaLN_modulation.1.bias"] = (2 * hidden,)
    return shapes


def shapes_of(model) -> dict:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


@pytest.mark.parametrize("name", sorted(DiT_models))
def test_named_configs_have_the_public_state_dict(name):
    size, patch = name.removeprefix("DiT-").split("/")
    depth, hidden, heads = CONFIGS[size]
    with torch.device("meta"):  # shapes only: no memory, no time
        model = DiT_models[name]()
        # The official IMMPrecond's call (configs/im256_generate_images.yaml): the same model.
        official_call = DiT_models[name](
            img_resolution=32, img_channels=4, in_channels=4, out_channels=4, label_dim=1000, s_embed=True
        )
    assert shapes_of(model) == shapes_of(official_call) == expected_state_dict_shapes(depth, hidden, int(patch))
    assert model.y_embedder.embedding_table.num_embeddings == 1001  # 1000 classes and the null class
    assert model.num_heads == heads
    assert not model.pos_embed.requires_grad


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_state_dict_of_each_option_loads_strictly(case):
    options = OPTION_CASES[case]
    model = tiny_dit(**options)
    expected = expected_state_dict_shapes(2, 24, 2, 3, 8, 5, 2, **options)
    assert shapes_of(model) == expected
    # A state dict of exactly these shapes (as the official model would save) loads with strict=True.
    generator = torch.Generator().manual_seed(4)
    state = {key: torch.randn(shape, generator=generator).to(DEVICE) for key, shape in expected.items()}
    model.load_state_dict(state, strict=True)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())
    if case != "default":  # and the default layout is not silently accepted for another option set
        with pytest.raises(RuntimeError, match="Error.* in loading state_dict"):
            tiny_dit().load_state_dict(state, strict=True)


def test_state_dict_variants_and_pos_embed():
    model = DiT_models["DiT-S/8"](input_size=16, in_channels=3, num_classes=10, class_dropout_prob=0.1, qk_norm=True)
    assert shapes_of(model) == expected_state_dict_shapes(
        12, 384, 8, 3, 16, 10, 6, class_dropout_prob=0.1, qk_norm=True
    )
    assert model.y_embedder.embedding_table.num_embeddings == 12  # + the null class + the label-drop row
    unconditional = DiT(**{**TINY, "num_classes": 0})
    assert "y_embedder.embedding_table.weight" not in unconditional.state_dict()
    assert shapes_of(unconditional) == expected_state_dict_shapes(2, 24, 2, 3, 8, 0)
    # The fixed 2-D sin-cos embedding, token by token (MAE/DiT: first half encodes the column).
    grid, hidden = 16 // 8, 384
    omega = [10000 ** (-k / (hidden // 4)) for k in range(hidden // 4)]
    for i in range(grid):
        for j in range(grid):
            expected = (
                [math.sin(j * w) for w in omega]
                + [math.cos(j * w) for w in omega]
                + [math.sin(i * w) for w in omega]
                + [math.cos(i * w) for w in omega]
            )
            torch.testing.assert_close(model.pos_embed[0, i * grid + j], torch.tensor(expected), rtol=0, atol=1e-6)
    torch.testing.assert_close(model.pos_embed[0], get_2d_sincos_pos_embed(hidden, grid))


def test_initialisation_is_dit_s():
    model = tiny_dit()
    zero = [
        *(f"blocks.{n}.adaLN_modulation.1.{p}" for n in range(2) for p in ("weight", "bias")),
        "final_layer.adaLN_modulation.1.weight",
        "final_layer.adaLN_modulation.1.bias",
        "final_layer.linear.weight",
        "final_layer.linear.bias",
    ]
    state = model.state_dict()
    for key in zero:
        assert state[key].abs().max() == 0, key
    for key in ("t_embedder.mlp.0.weight", "s_embedder.mlp.2.weight", "y_embedder.embedding_table.weight"):
        assert 0.01 < state[key].std() < 0.03, key  # normal(0.02)
    for key in ("blocks.0.attn.qkv.bias", "t_embedder.mlp.0.bias", "blocks.1.mlp.fc2.bias"):
        assert state[key].abs().max() == 0, key
    fan_in, fan_out = 24, 72  # xavier-uniform bound of blocks.N.attn.qkv
    bound = math.sqrt(6 / (fan_in + fan_out))
    assert 0.9 * bound < state["blocks.0.attn.qkv.weight"].abs().max() <= bound
    assert model(*inputs()).abs().max() == 0  # adaLN-Zero: the untrained model is 0


def test_initialisation_of_the_options():
    torch.manual_seed(0)
    model = DiT(**{**TINY, **ALL_OPTIONS, "embedding_kwargs": dict(embedding_type="fourier", scale=3.0)})
    state = model.state_dict()
    for n in range(2):  # timm's qk norms start as identities
        for name in ("q_norm", "k_norm"):
            assert torch.equal(state[f"blocks.{n}.attn.{name}.weight"], torch.ones(12)), (n, name)
            assert torch.equal(state[f"blocks.{n}.attn.{name}.bias"], torch.zeros(12)), (n, name)
        assert model.blocks[n].attn.q_norm.eps == model.blocks[n].attn.k_norm.eps == 1e-5
    for embedder in ("t_embedder", "s_embedder"):  # randn · scale, each embedder its own draw
        assert 2.0 < state[f"{embedder}.freqs"].std() < 4.5, embedder
        assert 0.01 < state[f"{embedder}.mlp.0.weight"].std() < 0.03, embedder
    assert not torch.equal(state["t_embedder.freqs"], state["s_embedder.freqs"])
    assert state["final_layer.adaLN_modulation.1.weight"].abs().max() == 0
    model.initialize_weights()  # re-initialising keeps the drawn frequencies
    assert torch.equal(model.state_dict()["t_embedder.freqs"], state["t_embedder.freqs"])
    no_mlp = DiT(**{**TINY, "embedding_kwargs": dict(use_mlp=False, frequency_embedding_size=24)})
    assert not any("mlp" in key for key in no_mlp.state_dict() if "embedder" in key)


def test_load_state_dict_round_trip():
    source = randomise(tiny_dit(seed=0))
    target = tiny_dit(seed=5, backend="torch")
    target.load_state_dict(source.state_dict(), strict=True)
    source.backend = "torch"
    x, t, s, labels = inputs()
    assert torch.equal(source(x, t, s, labels), target(x, t, s, labels))
    with pytest.raises(RuntimeError, match="s_embedder"):
        target.load_state_dict({k: v for k, v in source.state_dict().items() if "s_embedder" not in k})
    with pytest.raises(RuntimeError, match="s_embedder"):  # s_embed=False has none
        tiny_dit(s_embed=False).load_state_dict(source.state_dict())


# ---------------------------------------------------------------------------
# An independent plain transcription of the IMM DiT forward, from a state dict
# ---------------------------------------------------------------------------


def plain_frequencies(t, dim=256, max_period=10000.0):
    # Angles in float64, as the official IMM embedder (DiT's own fp32 formula is off by ~1e-4 at t ~ 1000).
    half = dim // 2
    freqs = torch.tensor([max_period ** (-i / half) for i in range(half)], dtype=torch.float64, device=t.device)
    angles = t.double()[:, None] * freqs
    features = torch.cat([angles.cos(), angles.sin()], dim=1).float()
    return F.pad(features, (0, dim % 2))  # odd widths: a zero last column


def plain_fourier(t, freqs):
    angles = t.double()[:, None] * (2 * math.pi) * freqs.double()
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


def plain_linear(sd, prefix, x):
    return x @ sd[prefix + ".weight"].t() + sd[prefix + ".bias"]


def plain_layer_norm(x, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def plain_layer_norm_modulate(x, shift, scale, eps=1e-6):
    return plain_layer_norm(x, eps) * (1 + scale[:, None]) + shift[:, None]


def plain_block(sd, prefix, x, c, heads, dropout=0.0):
    batch, tokens, hidden = x.shape
    head_dim = hidden // heads
    mod = plain_linear(sd, prefix + ".adaLN_modulation.1", c * torch.sigmoid(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        mod[:, i * hidden : (i + 1) * hidden] for i in range(6)
    )
    h = plain_layer_norm_modulate(x, shift_msa, scale_msa)
    qkv = plain_linear(sd, prefix + ".attn.qkv", h)  # features ordered (q|k|v, head, head_dim)
    q, k, v = (qkv[..., i * hidden : (i + 1) * hidden].reshape(batch, tokens, heads, head_dim) for i in range(3))
    if prefix + ".attn.q_norm.weight" in sd:  # qk_norm: an affine LayerNorm (eps 1e-5) of each head's q and k
        q = plain_layer_norm(q, 1e-5) * sd[prefix + ".attn.q_norm.weight"] + sd[prefix + ".attn.q_norm.bias"]
        k = plain_layer_norm(k, 1e-5) * sd[prefix + ".attn.k_norm.weight"] + sd[prefix + ".attn.k_norm.bias"]
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(head_dim)
    attn = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).reshape(batch, tokens, hidden)
    x = x + gate_msa[:, None] * plain_linear(sd, prefix + ".attn.proj", attn)
    h = plain_layer_norm_modulate(x, shift_mlp, scale_mlp)
    u = plain_linear(sd, prefix + ".mlp.fc1", h)
    gelu = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
    if not dropout:
        return x + gate_mlp[:, None] * plain_linear(sd, prefix + ".mlp.fc2", gelu)
    # timm's Mlp in training mode: dropout after the activation and after fc2
    mlp_out = F.dropout(plain_linear(sd, prefix + ".mlp.fc2", F.dropout(gelu, dropout)), dropout)
    return x + gate_mlp[:, None] * mlp_out


def plain_final(sd, x, c):
    hidden = x.shape[-1]
    mod = plain_linear(sd, "final_layer.adaLN_modulation.1", c * torch.sigmoid(c))
    return plain_linear(sd, "final_layer.linear", plain_layer_norm_modulate(x, mod[:, :hidden], mod[:, hidden:]))


def plain_label_index(row):
    """The official rule: the first argmax of [row, 1 - sum(row)]."""
    values = [*row.tolist(), 1 - row.sum().item()]
    return values.index(max(values))


def plain_dit(sd, x, t, s, labels, *, patch, heads, frequencies=256, s_embed=True, dropout=0.0):
    """The IMM DiT: c = t_emb + s_emb + y_emb (s_emb only with s_embed), adaLN-Zero blocks. Time
    features: Fourier when the state dict has `freqs`, else positional; then an MLP if it has one.
    dropout > 0: the training-mode forward, masks drawn from the global RNG block by block."""
    batch, channels, size, _ = x.shape
    grid = size // patch
    tokens = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    tokens = tokens.flatten(2).transpose(1, 2) + sd["pos_embed"]

    def time_embedding(prefix, times):
        if prefix + ".freqs" in sd:
            features = plain_fourier(times, sd[prefix + ".freqs"])
        else:
            features = plain_frequencies(times, frequencies)
        if prefix + ".mlp.0.weight" not in sd:
            return features
        u = plain_linear(sd, prefix + ".mlp.0", features)
        return plain_linear(sd, prefix + ".mlp.2", u * torch.sigmoid(u))

    index = torch.tensor([plain_label_index(row) for row in labels], device=x.device)
    c = time_embedding("t_embedder", t) + sd["y_embedder.embedding_table.weight"][index]
    if s_embed:
        c = c + time_embedding("s_embedder", s)
    depth = 1 + max(int(key.split(".")[1]) for key in sd if key.startswith("blocks."))
    for n in range(depth):
        tokens = plain_block(sd, f"blocks.{n}", tokens, c, heads, dropout)
    out = plain_final(sd, tokens, c)  # (B, L, patch·patch·C), features ordered (row, column, channel)
    image = torch.empty(batch, channels, size, size, device=x.device)
    for i in range(grid):
        for j in range(grid):
            patch_values = out[:, i * grid + j].reshape(batch, patch, patch, channels).permute(0, 3, 1, 2)
            image[:, :, i * patch : (i + 1) * patch, j * patch : (j + 1) * patch] = patch_values
    return image


@pytest.mark.parametrize("backend", ["torch", FUSED])
def test_matches_plain_transcription_of_the_same_state_dict(backend):
    model = randomise(tiny_dit(depth=3))
    model.backend = backend
    x, t, s, labels = inputs(batch=3)
    with torch.no_grad():
        out = model(x, t, s, labels)
        expected = plain_dit(model.state_dict(), x, t, s, labels, patch=2, heads=2)
    assert expected.abs().max() > 0.5  # a non-trivial output
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "case, backend",
    [(case, "torch") for case in sorted(OPTION_CASES)] + [("default", FUSED), ("positional_no_mlp", FUSED)],
)
def test_every_option_matches_the_plain_transcription(case, backend):
    """Soft label rows, qk_norm, s_embed, temb_mult, Fourier / positional with and without the MLP,
    in eval mode (dropout off). The fused ops depend on no option: the fused backend runs the
    cases with a different path through them (positional features with and without the MLP)."""
    options = OPTION_CASES[case]
    model = randomise(tiny_dit(**options)).eval()
    model.backend = backend
    labels = soft_label_rows()
    x, t, s, _ = inputs(batch=len(labels))
    frequencies = options.get("embedding_kwargs", {}).get("frequency_embedding_size", 256)
    with torch.no_grad():
        out = model(x, t, s, labels)
        expected = plain_dit(
            model.state_dict(), x, t, s, labels, patch=2, heads=2, frequencies=frequencies, s_embed=model.s_embed
        )
    assert expected.abs().max() > 0.5  # a non-trivial output
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_block_and_final_layer_alone_match_the_transcription():
    torch.manual_seed(0)
    for temb_size, qk_norm in ((None, False), (48, True)):
        block = randomise(DiTBlock(24, 4, temb_size=temb_size, qk_norm=qk_norm).to(DEVICE))
        final = randomise(FinalLayer(24, 2, 3, temb_size=temb_size).to(DEVICE))
        x, c = torch.randn(2, 16, 24, device=DEVICE), torch.randn(2, temb_size or 24, device=DEVICE)
        sd = {f"b.{k}": v for k, v in block.state_dict().items()} | {
            f"final_layer.{k}": v for k, v in final.state_dict().items()
        }
        with torch.no_grad():
            for backend in ("torch", FUSED):
                torch.testing.assert_close(block(x, c, backend), plain_block(sd, "b", x, c, 4), rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(final(x, c, backend), plain_final(sd, x, c), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# Fused against reference, batched modulation, labels
# ---------------------------------------------------------------------------


def forward_backward(model: DiT, x, t, s, labels):
    x = x.clone().requires_grad_()
    torch.manual_seed(7)  # the same dropout masks in every call (training mode)
    out = model(x, t, s, labels)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.device)
    (out * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("case, batched_modulation", [("default", False), ("default", True), ("all", True)])
def test_fused_matches_reference_forward_and_backward(case, batched_modulation):
    """With every option on (qk_norm, temb_mult 2, Fourier times, the label-drop row) in training
    mode: dropout active, the same masks on both backends."""
    model = randomise(tiny_dit(batched_modulation=batched_modulation, **OPTION_CASES[case]))
    x, t, s, labels = inputs()
    model.fused = False
    assert model.backend == "torch"
    ref_out, ref_dx, ref_grads = forward_backward(model, x, t, s, labels)
    model.backend = FUSED
    out, dx, grads = forward_backward(model, x, t, s, labels)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters())) - 1  # all but pos_embed
    for name in grads:
        assert ref_grads[name].abs().max() > 0, name  # every parameter takes part
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("case", ["default", "all"])
def test_batched_modulation_equals_per_block_modulation(case):
    per_block = randomise(tiny_dit(backend="torch", **OPTION_CASES[case]))
    batched = tiny_dit(backend="torch", batched_modulation=True, **OPTION_CASES[case])
    batched.load_state_dict(per_block.state_dict(), strict=True)
    assert [n for n, _ in batched.named_parameters()] == [n for n, _ in per_block.named_parameters()]
    x, t, s, labels = inputs()
    ref_out, ref_dx, ref_grads = forward_backward(per_block, x, t, s, labels)
    out, dx, grads = forward_backward(batched, x, t, s, labels)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-6)
    for name in grads:
        # One stacked matmul sums grad(cond) in another order: fp32 rounding relative to the largest entry.
        atol = 1e-6 * ref_grads[name].abs().max().item()
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=atol, msg=name)


def modulation_storages(model: DiT) -> set[int]:
    """The storages holding the adaLN weights and biases (one each when packed)."""
    linears = [b.adaLN_modulation[1] for b in model.blocks] + [model.final_layer.adaLN_modulation[1]]
    return {p.untyped_storage().data_ptr() for lin in linears for p in (lin.weight, lin.bias)}


def graph_nodes(output: torch.Tensor) -> set[str]:
    """Names of the autograd nodes behind output."""
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


def test_batched_modulation_stays_packed_and_correct():
    model = randomise(tiny_dit(backend="torch", batched_modulation=True))
    assert len(modulation_storages(model)) == 2  # one matmul reads all blocks' weights in place
    x, t, s, labels = inputs()
    expected = model(x, t, s, labels)
    assert "_StackedLinearBackward" in graph_nodes(expected) and "CatBackward0" not in graph_nodes(expected)
    expected = expected.detach()
    params_before = list(model.parameters())
    model.double()
    assert len(modulation_storages(model)) == 2 and all(a is b for a, b in zip(params_before, model.parameters()))
    torch.testing.assert_close(
        model(x.double(), t.double(), s.double(), labels).float(), expected, rtol=1e-5, atol=1e-5
    )
    model.float()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert len(modulation_storages(clone)) == 2 and modulation_storages(clone) != modulation_storages(model)
        torch.testing.assert_close(clone(x, t, s, labels), expected, rtol=1e-6, atol=1e-6)
    # Unpacked parameters (here: assigned) still give the same result, through the copying path.
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    assert len(modulation_storages(model)) > 2
    out = model(x, t, s, labels)
    assert "CatBackward0" in graph_nodes(out) and "_StackedLinearBackward" not in graph_nodes(out)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["default", "all"])
def test_batched_modulation_under_bf16_autocast(case):
    """Outputs and gradients as close to fp32 as autocast's own (policy: <= 2x its error + atol)."""
    per_block = randomise(tiny_dit(backend="torch", **OPTION_CASES[case])).eval()
    batched = copy.deepcopy(per_block)
    batched.batched_modulation = True
    batched.pack_modulation()
    x, t, s, labels = inputs()
    _, _, fp32_grads = forward_backward(per_block, x, t, s, labels)
    results = []
    for model in (per_block, batched):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            results.append(forward_backward(model, x, t, s, labels))
    (ref_out, _, ref_grads), (out, _, grads) = results
    fp32_out = per_block(x, t, s, labels).detach()
    assert (out - fp32_out).abs().max() <= 2 * (ref_out - fp32_out).abs().max() + 1e-3 * fp32_out.abs().max()
    for name in grads:
        assert grads[name].dtype == torch.float32, name
        batched_error = (grads[name] - fp32_grads[name]).abs().max()
        autocast_error = (ref_grads[name] - fp32_grads[name]).abs().max()
        assert batched_error <= 2 * autocast_error + 1e-3 * fp32_grads[name].abs().max(), name


def test_options_survive_copies_and_dtype_changes():
    model = randomise(tiny_dit(backend="torch", batched_modulation=True, **ALL_OPTIONS)).eval()
    x, t, s, labels = inputs()
    expected = model(x, t, s, labels).detach()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(clone.t_embedder.freqs, model.t_embedder.freqs)
        assert len(modulation_storages(clone)) == 2
        torch.testing.assert_close(clone(x, t, s, labels), expected, rtol=1e-6, atol=1e-6)
    model.double()
    assert model.t_embedder.freqs.dtype == torch.float64
    out = model(x.double(), t.double(), s.double(), labels.double())
    torch.testing.assert_close(out.float(), expected, rtol=1e-5, atol=1e-5)


def test_labels_null_class_and_unconditional():
    model = randomise(tiny_dit(backend="torch"))
    x, t, s, _ = inputs(batch=3)
    one_hot = F.one_hot(torch.tensor([0, 3, 4], device=DEVICE), 5).float()
    with torch.no_grad():
        by_one_hot = model(x, t, s, one_hot)
        assert torch.equal(by_one_hot, model(x, t, s, torch.tensor([0, 3, 4], device=DEVICE)))
        null = model(x, t, s, torch.zeros(3, 5, device=DEVICE))
        # index num_classes is the null row, the table's last
        assert torch.equal(null, model(x, t, s, torch.full((3,), 5, device=DEVICE)))
        assert torch.equal(null, model(x, t, s, None))
        assert (null - by_one_hot).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every sample sees its label
        # Mixed rows: each sample only depends on its own label.
        mixed = one_hot.clone()
        mixed[1] = 0
        out = model(x, t, s, mixed)
        torch.testing.assert_close(out[1], null[1], rtol=0, atol=1e-6)
        torch.testing.assert_close(out[[0, 2]], by_one_hot[[0, 2]], rtol=0, atol=1e-6)
        # Soft rows select a row by the official argmax of [row, 1 - sum(row)], ties to the first.
        rows = soft_label_rows()
        x5, t5, s5, _ = inputs(batch=5)
        torch.testing.assert_close(
            model(x5, t5, s5, rows), model(x5, t5, s5, torch.tensor([3, 5, 1, 5, 2], device=DEVICE)), rtol=0, atol=0
        )
        # s and t both matter; noise_labels_s=None drops the s embedding.
        assert (model(x, t, s + 50, one_hot) - by_one_hot).abs().max() > 1e-3
        assert (model(x, t, None, one_hot) - by_one_hot).abs().max() > 1e-3
        unconditional = randomise(tiny_dit(backend="torch", num_classes=0))
        assert unconditional(x, t, s).shape == x.shape


def test_no_label_drop_inside_the_model():
    """class_dropout_prob > 0 only adds the official's label-drop row: in training mode the labels
    are used as given (IMMLoss drops them), and the extra row is never read."""
    model = randomise(tiny_dit(backend="torch", class_dropout_prob=0.9))
    table = model.y_embedder.embedding_table.weight
    assert table.shape[0] == 7  # 5 classes, the null class, the label-drop row
    x, t, s, labels = inputs(batch=3)
    with torch.no_grad():
        evaluated = model.eval()(x, t, s, labels)
        table[6] = 100.0
        for _ in range(3):
            assert torch.equal(model.train()(x, t, s, labels), evaluated)


def test_dropout_is_the_mlps_and_only_in_training():
    model = randomise(tiny_dit(backend="torch", dropout=0.3))
    reference = tiny_dit(backend="torch")
    reference.load_state_dict(model.state_dict(), strict=True)
    dropouts = {name: module.p for name, module in model.named_modules() if isinstance(module, torch.nn.Dropout)}
    assert dropouts == {f"blocks.{n}.mlp.drop{i}": 0.3 for n in range(2) for i in (1, 2)}
    x, t, s, labels = inputs()
    with torch.no_grad():
        expected = reference.eval()(x, t, s, labels)
        assert torch.equal(model.eval()(x, t, s, labels), expected)  # eval: the identity
        model.train()
        torch.manual_seed(0)
        first = model(x, t, s, labels)
        torch.manual_seed(0)
        assert torch.equal(model(x, t, s, labels), first)  # the masks come from the global RNG
        second = model(x, t, s, labels)
        assert (first - expected).abs().max() > 1e-2 and (second - first).abs().max() > 1e-2
        # Where: after the MLP's activation and after its fc2, block by block (the same masks in order).
        torch.manual_seed(0)
        transcribed = plain_dit(model.state_dict(), x, t, s, labels, patch=2, heads=2, dropout=0.3)
        torch.testing.assert_close(first, transcribed, rtol=1e-4, atol=1e-5)
        assert torch.equal(reference.train()(x, t, s, labels), expected)  # dropout 0: nothing to drop


def test_calling_conventions_equal_the_canonical_call():
    model = randomise(tiny_dit(backend="torch"))
    x, t, s, labels = inputs(batch=3)
    labels = F.one_hot(torch.tensor([0, 3, 4], device=DEVICE), 5).float()
    with torch.no_grad():
        canonical = model(x, t, s, labels)
        for shape in ((3, 1), (3, 1, 1, 1), (1, 3)):  # B values in any shape
            assert torch.equal(model(x, t.reshape(shape), s.reshape(shape), labels), canonical)
        one_time = t[:1].expand(3).contiguous()
        broadcast = model(x, one_time, one_time / 2, labels)
        for times in (t[:1], t[0], t[:1].reshape(1, 1, 1, 1)):  # one value for the whole batch
            assert torch.equal(model(x, times, times / 2, labels), broadcast)
        # Label forms: one-hot float rows, their indices, integer or bool one-hot rows.
        for same_labels in (torch.tensor([0, 3, 4], device=DEVICE), labels.long(), labels.bool(), labels.double()):
            assert torch.equal(model(x, t, s, same_labels), canonical)
        # One row (or index) for the whole batch; None and all-zero rows are the null class.
        row = labels[1:2]
        per_sample = model(x, t, s, row.expand(3, 5))
        assert torch.equal(model(x, t, s, row), per_sample)
        assert torch.equal(model(x, t, s, torch.tensor([3], device=DEVICE)), per_sample)
        null = model(x, t, s, torch.zeros(3, 5, device=DEVICE))
        assert torch.equal(model(x, t, s, torch.zeros(1, 5, device=DEVICE)), null)
        assert torch.equal(model(x, t, s, None), null)
        # Without s_embed, noise_labels_s is ignored whatever it is (as the official model).
        no_s = randomise(tiny_dit(backend="torch", s_embed=False))
        assert no_s.s_embedder is None
        ignored = no_s(x, t, None, labels)
        for anything in (s, torch.rand(7), 0.5):
            assert torch.equal(no_s(x, t, anything, labels), ignored)


def test_official_constructor_names():
    torch.manual_seed(0)
    canonical = DiT(input_size=8, in_channels=3, num_classes=5, hidden_size=24, depth=2, num_heads=2)
    torch.manual_seed(0)  # IMMPrecond's call: the image size, channels (under three names) and labels
    official = DiT(
        img_resolution=8,
        img_channels=3,
        in_channels=3,
        out_channels=3,
        label_dim=5,
        hidden_size=24,
        depth=2,
        num_heads=2,
    )
    torch.manual_seed(0)  # the official positional order
    positional = DiT(8, 2, 3, 24, 2, 2, 4.0, 0.0, 5, True, False, False, {}, 1, 0.0)
    for model in (official, positional):
        assert model.state_dict().keys() == canonical.state_dict().keys()
        assert all(torch.equal(value, canonical.state_dict()[key]) for key, value in model.state_dict().items())
        assert (model.input_size, model.in_channels, model.out_channels, model.num_classes) == (8, 3, 3, 5)
    # Both names, same value: fine. Different values: ValueError naming both.
    assert DiT(**{**TINY, "img_resolution": 8, "label_dim": 5, "img_channels": 3}).input_size == 8
    for canonical_name, alias, value in (
        ("input_size", "img_resolution", 16),
        ("in_channels", "img_channels", 4),
        ("num_classes", "label_dim", 10),
    ):
        with pytest.raises(ValueError, match=rf"{canonical_name}=\d+ and {alias}={value} disagree"):
            DiT(**{**TINY, alias: value})
    with pytest.raises(ValueError, match=r"out_channels \(4\) must equal in_channels \(3\)"):
        DiT(**{**TINY, "out_channels": 4})
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['bogus', 'mixed_precision'\]"):
        DiT(**TINY, mixed_precision="bf16", bogus=1)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['bogus'\]"):
        DiT_models["DiT-S/2"](bogus=1)
    with torch.device("meta"):  # the named configs pass everything through
        model = DiT_models["DiT-S/2"](img_resolution=16, label_dim=10, qk_norm=True, temb_mult=2, s_embed=False)
    assert shapes_of(model) == expected_state_dict_shapes(
        12, 384, 2, 4, 16, 10, 6, qk_norm=True, temb_mult=2, s_embed=False
    )


@pytest.mark.parametrize("case, backend", [("default", FUSED), ("all", "torch")])
def test_one_imm_training_step_with_a_dit_backbone(case, backend):
    # 4 tokens: the interpreter is slow
    backbone = tiny_dit(patch_size=4, backend=backend, batched_modulation=True, **OPTION_CASES[case])
    net = Preconditioner(backbone, label_dim=5)
    loss_fn = IMMLoss(net, group_size=2, label_dropout=0.5)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    x = torch.randn(4, 3, 8, 8, device=DEVICE)
    labels = torch.tensor([0, 1, 2, 3], device=DEVICE)
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    for _ in range(2):  # step 1 trains the zero-initialised output layers, step 2 reaches the rest
        optimizer.zero_grad()
        loss, stats = loss_fn(x, labels)
        assert loss.isfinite() and stats["weighted_mmd"].shape == (2,)
        loss.backward()
        assert all(p.grad is None or p.grad.isfinite().all() for p in net.parameters())
        optimizer.step()
    changed = {name for name, p in net.named_parameters() if not torch.equal(p, before[name])}
    assert {"backbone.final_layer.linear.weight", "backbone.blocks.0.attn.qkv.weight"} <= changed
    assert "backbone.pos_embed" not in changed
    assert len(modulation_storages(backbone)) == 2  # the optimizer updated the packed weights in place
    with torch.no_grad():
        assert net(x, 0.9, 0.5, labels).shape == x.shape


def test_bad_inputs_and_configs():
    model = tiny_dit(backend="torch")
    x, t, s, labels = inputs()
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3, 8, 8\)"):
        model(torch.randn(2, 3, 16, 16), t, s, labels)
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(2, 4, 8, 8), t, s, labels)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        model(torch.zeros(2, 3, 8, 8, dtype=torch.long), t, s, labels)
    label_shapes = r"class_labels must be label rows of shape \(2, 5\) or \(1, 5\)"
    for bad_labels in (
        torch.zeros(2, 4),  # the wrong number of classes
        torch.zeros(3, 5),  # the wrong batch
        torch.zeros(2),  # float indices
        torch.zeros(3, dtype=torch.long),
        torch.zeros(2, dtype=torch.bool),
        torch.zeros(2, 5, 1),
        torch.zeros(2, 5, dtype=torch.complex64),
    ):
        with pytest.raises(ValueError, match=label_shapes):
            model(x, t, s, bad_labels)
    with pytest.raises(TypeError, match="class_labels must be a tensor or None"):
        model(x, t, s, [0, 1])
    with pytest.raises(ValueError, match=r"noise_labels_t must hold 2 values or 1 .*got shape \(3,\)"):
        model(x, torch.rand(3), s, labels)
    with pytest.raises(ValueError, match=r"noise_labels_s must hold 2 values or 1 .*got shape \(2, 2\)"):
        model(x, t, torch.rand(2, 2), labels)
    with pytest.raises(ValueError, match=r"noise_labels_t must hold 2 values or 1 .*got shape \(0,\)"):
        model(x, torch.rand(0), s, labels)
    with pytest.raises(TypeError, match="noise_labels_t must be a tensor"):
        model(x, 0.5, s, labels)
    with pytest.raises(ValueError, match="model is unconditional"):
        tiny_dit(num_classes=0)(x, t, s, labels)
    with pytest.raises(ValueError, match="backend must be one of"):
        model.backend = "cuda"
    with pytest.raises(ValueError, match="backend must be one of"):
        tiny_dit(backend="native")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        tiny_dit(input_size=10, patch_size=4)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        tiny_dit(num_heads=5)
    with pytest.raises(ValueError, match="depth must be an int >= 1"):
        tiny_dit(depth=0)


def test_bad_options():
    with pytest.raises(ValueError, match="temb_mult must be an int >= 1"):
        tiny_dit(temb_mult=0)
    with pytest.raises(ValueError, match="temb_mult must be an int >= 1"):
        tiny_dit(temb_mult=1.5)
    with pytest.raises(TypeError, match="qk_norm must be a bool"):
        tiny_dit(qk_norm=1)
    with pytest.raises(TypeError, match="s_embed must be a bool"):
        tiny_dit(s_embed="yes")
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        tiny_dit(dropout=1.0)
    with pytest.raises(ValueError, match="class_dropout_prob must be a probability"):
        tiny_dit(class_dropout_prob=-0.1)
    with pytest.raises(TypeError, match=r"embedding_kwargs has unknown keys \['max_period'\]"):
        tiny_dit(embedding_kwargs=dict(max_period=100))
    with pytest.raises(ValueError, match="embedding_type must be one of"):
        tiny_dit(embedding_kwargs=dict(embedding_type="learned"))
    with pytest.raises(ValueError, match=r"frequency_embedding_size \(256\) must equal the embedding width \(48"):
        tiny_dit(temb_mult=2, embedding_kwargs=dict(use_mlp=False))
    with pytest.raises(ValueError, match="frequency_embedding_size must be even for Fourier"):
        tiny_dit(embedding_kwargs=dict(embedding_type="fourier", frequency_embedding_size=25))
    with pytest.raises(TypeError, match="use_mlp must be a bool"):
        tiny_dit(embedding_kwargs=dict(use_mlp=None))
    with pytest.raises(ValueError, match="scale must be a finite number"):
        tiny_dit(embedding_kwargs=dict(embedding_type="fourier", scale=float("inf")))
