"""imm_kernels.models.DiT: the IMM DiT's state dict, the fused ops against their references,
an independent plain transcription of the DiT forward, batched modulation, labels, errors.

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


@pytest.fixture
def fp32_convolutions(monkeypatch):
    """cuDNN runs float32 convolutions (the patch embedding) in TF32, a 10-bit mantissa, by default on
    Ampere and later GPUs; the comparisons here are at float32 (and float64) rounding."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def tiny_dit(seed: int = 0, **overrides) -> DiT:
    torch.manual_seed(seed)
    return DiT(**{**TINY, **overrides}).to(DEVICE)


def randomise(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Weights ~ N(0, 1/fan_in), vectors ~ N(0, 0.1²): activations stay O(1), nothing is zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if not param.requires_grad:
                continue
            std = 1 / math.sqrt(param[0].numel()) if param.dim() >= 2 else 0.1
            param.copy_(torch.randn(param.shape, generator=generator).to(param.device) * std)
    return model


def inputs(batch: int = 2, num_classes: int = 5, seed: int = 2):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 8, 8, generator=generator)
    t = torch.rand(batch, generator=generator) * 1000
    s = torch.rand(batch, generator=generator) * t
    labels = F.one_hot(torch.arange(batch) % num_classes, num_classes).float()
    labels[-1] = 0  # the null class
    return x.to(DEVICE), t.to(DEVICE), s.to(DEVICE), labels.to(DEVICE)


# ---------------------------------------------------------------------------
# The state dict of the public IMM DiT, written from the architecture description
# ---------------------------------------------------------------------------


def expected_state_dict_shapes(depth, hidden, patch, in_channels=4, input_size=32, num_classes=1000, null_class=True):
    tokens = (input_size // patch) ** 2
    shapes = {
        "pos_embed": (1, tokens, hidden),
        "x_embedder.proj.weight": (hidden, in_channels, patch, patch),
        "x_embedder.proj.bias": (hidden,),
    }
    for embedder in ("t_embedder", "s_embedder"):  # 256 sinusoidal frequencies -> hidden -> hidden
        shapes[f"{embedder}.mlp.0.weight"] = (hidden, 256)
        shapes[f"{embedder}.mlp.0.bias"] = (hidden,)
        shapes[f"{embedder}.mlp.2.weight"] = (hidden, hidden)
        shapes[f"{embedder}.mlp.2.bias"] = (hidden,)
    if num_classes:
        shapes["y_embedder.embedding_table.weight"] = (num_classes + int(null_class), hidden)
    for n in range(depth):
        for name, out_features, in_features in (
            ("attn.qkv", 3 * hidden, hidden),
            ("attn.proj", hidden, hidden),
            ("mlp.fc1", 4 * hidden, hidden),
            ("mlp.fc2", hidden, 4 * hidden),
            ("adaLN_modulation.1", 6 * hidden, hidden),
        ):
            shapes[f"blocks.{n}.{name}.weight"] = (out_features, in_features)
            shapes[f"blocks.{n}.{name}.bias"] = (out_features,)
    shapes["final_layer.linear.weight"] = (patch * patch * in_channels, hidden)
    shapes["final_layer.linear.bias"] = (patch * patch * in_channels,)
    shapes["final_layer.adaLN_modulation.1.weight"] = (2 * hidden, hidden)
    shapes["final_layer.adaLN_modulation.1.bias"] = (2 * hidden,)
    return shapes


@pytest.mark.parametrize("name", sorted(DiT_models))
def test_named_configs_have_the_public_state_dict(name):
    size, patch = name.removeprefix("DiT-").split("/")
    depth, hidden, heads = CONFIGS[size]
    with torch.device("meta"):  # shapes only: no memory, no time
        model = DiT_models[name]()
    state = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert state == expected_state_dict_shapes(depth, hidden, int(patch))
    assert model.num_heads == heads
    assert not model.pos_embed.requires_grad


def test_state_dict_variants_and_pos_embed():
    model = DiT_models["DiT-S/8"](input_size=16, in_channels=3, num_classes=10, class_dropout_prob=0)
    state = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert state == expected_state_dict_shapes(12, 384, 8, 3, 16, 10, null_class=False)
    unconditional = DiT(**{**TINY, "num_classes": 0})
    assert "y_embedder.embedding_table.weight" not in unconditional.state_dict()
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


def test_load_state_dict_round_trip():
    source = randomise(tiny_dit(seed=0))
    target = tiny_dit(seed=5, backend="torch")
    target.load_state_dict(source.state_dict(), strict=True)
    source.backend = "torch"
    x, t, s, labels = inputs()
    assert torch.equal(source(x, t, s, labels), target(x, t, s, labels))
    with pytest.raises(RuntimeError, match="s_embedder"):
        target.load_state_dict({k: v for k, v in source.state_dict().items() if "s_embedder" not in k})


# ---------------------------------------------------------------------------
# An independent plain transcription of the (IMM) DiT forward, from a state dict
# ---------------------------------------------------------------------------


def plain_frequencies(t, dim=256, max_period=10000.0):
    # Angles in float64: DiT's fp32 formula is off by up to ~1e-4 at t ~ 1000, the fused op is not.
    half = dim // 2
    freqs = torch.tensor([max_period ** (-i / half) for i in range(half)], dtype=torch.float64, device=t.device)
    angles = t.double()[:, None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


def plain_linear(sd, prefix, x):
    return x @ sd[prefix + ".weight"].t() + sd[prefix + ".bias"]


def plain_layer_norm_modulate(x, shift, scale, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * (1 + scale[:, None]) + shift[:, None]


def plain_block(sd, prefix, x, c, heads):
    batch, tokens, hidden = x.shape
    head_dim = hidden // heads
    mod = plain_linear(sd, prefix + ".adaLN_modulation.1", c * torch.sigmoid(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        mod[:, i * hidden : (i + 1) * hidden] for i in range(6)
    )
    h = plain_layer_norm_modulate(x, shift_msa, scale_msa)
    qkv = plain_linear(sd, prefix + ".attn.qkv", h)  # features ordered (q|k|v, head, head_dim)
    q, k, v = (qkv[..., i * hidden : (i + 1) * hidden].reshape(batch, tokens, heads, head_dim) for i in range(3))
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(head_dim)
    attn = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).reshape(batch, tokens, hidden)
    x = x + gate_msa[:, None] * plain_linear(sd, prefix + ".attn.proj", attn)
    h = plain_layer_norm_modulate(x, shift_mlp, scale_mlp)
    u = plain_linear(sd, prefix + ".mlp.fc1", h)
    gelu = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
    return x + gate_mlp[:, None] * plain_linear(sd, prefix + ".mlp.fc2", gelu)


def plain_final(sd, x, c):
    hidden = x.shape[-1]
    mod = plain_linear(sd, "final_layer.adaLN_modulation.1", c * torch.sigmoid(c))
    return plain_linear(sd, "final_layer.linear", plain_layer_norm_modulate(x, mod[:, :hidden], mod[:, hidden:]))


def plain_dit(sd, x, t, s, labels, *, patch, heads, num_classes):
    """The IMM DiT of the module docstring: c = t_emb + s_emb + y_emb, adaLN-Zero blocks."""
    batch, channels, size, _ = x.shape
    grid = size // patch
    tokens = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    tokens = tokens.flatten(2).transpose(1, 2) + sd["pos_embed"]

    def time_mlp(prefix, times):
        u = plain_linear(sd, prefix + ".mlp.0", plain_frequencies(times))
        return plain_linear(sd, prefix + ".mlp.2", u * torch.sigmoid(u))

    null = labels.sum(1) == 0
    index = torch.where(null, num_classes, labels.argmax(1))
    c = time_mlp("t_embedder", t) + time_mlp("s_embedder", s) + sd["y_embedder.embedding_table.weight"][index]
    depth = 1 + max(int(key.split(".")[1]) for key in sd if key.startswith("blocks."))
    for n in range(depth):
        tokens = plain_block(sd, f"blocks.{n}", tokens, c, heads)
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
        expected = plain_dit(model.state_dict(), x, t, s, labels, patch=2, heads=2, num_classes=5)
    assert expected.abs().max() > 0.5  # a non-trivial output
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_block_and_final_layer_alone_match_the_transcription():
    torch.manual_seed(0)
    block, final = randomise(DiTBlock(24, 4).to(DEVICE)), randomise(FinalLayer(24, 2, 3).to(DEVICE))
    x, c = torch.randn(2, 16, 24, device=DEVICE), torch.randn(2, 24, device=DEVICE)
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
    out = model(x, t, s, labels)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.device)
    (out * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("batched_modulation", [False, True])
def test_fused_matches_reference_forward_and_backward(batched_modulation):
    model = randomise(tiny_dit(batched_modulation=batched_modulation))
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


def test_batched_modulation_equals_per_block_modulation():
    per_block = randomise(tiny_dit(backend="torch"))
    batched = tiny_dit(backend="torch", batched_modulation=True)
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


def test_batched_modulation_under_bf16_autocast():
    """Outputs and gradients as close to fp32 as autocast's own (policy: <= 2x its error + atol)."""
    per_block = randomise(tiny_dit(backend="torch"))
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


def test_labels_null_class_and_unconditional():
    model = randomise(tiny_dit(backend="torch"))
    x, t, s, _ = inputs(batch=3)
    one_hot = F.one_hot(torch.tensor([0, 3, 4], device=DEVICE), 5).float()
    with torch.no_grad():
        by_one_hot = model(x, t, s, one_hot)
        assert torch.equal(by_one_hot, model(x, t, s, torch.tensor([0, 3, 4], device=DEVICE)))
        null = model(x, t, s, torch.zeros(3, 5, device=DEVICE))
        assert torch.equal(
            null, model(x, t, s, torch.full((3,), 5, device=DEVICE))
        )  # index num_classes is the null row
        assert torch.equal(null, model(x, t, s, None))
        assert (null - by_one_hot).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every sample sees its label
        # Mixed rows: each sample only depends on its own label.
        mixed = one_hot.clone()
        mixed[1] = 0
        out = model(x, t, s, mixed)
        torch.testing.assert_close(out[1], null[1], rtol=0, atol=1e-6)
        torch.testing.assert_close(out[[0, 2]], by_one_hot[[0, 2]], rtol=0, atol=1e-6)
        # s and t both matter; noise_labels_s=None drops the s embedding.
        assert (model(x, t, s + 50, one_hot) - by_one_hot).abs().max() > 1e-3
        assert (model(x, t, None, one_hot) - by_one_hot).abs().max() > 1e-3
        # Without a null row (class_dropout_prob=0) an all-zero row adds no label embedding.
        no_null = randomise(tiny_dit(backend="torch", class_dropout_prob=0))
        assert no_null.y_embedder.embedding_table.num_embeddings == 5
        plain = no_null(x, t, s, torch.zeros(3, 5, device=DEVICE))
        no_null.y_embedder.embedding_table.weight.zero_()
        torch.testing.assert_close(no_null(x, t, s, one_hot), plain, rtol=0, atol=1e-6)
        unconditional = randomise(tiny_dit(backend="torch", num_classes=0))
        assert unconditional(x, t, s).shape == x.shape


def test_one_imm_training_step_with_a_dit_backbone():
    backbone = tiny_dit(patch_size=4, backend=FUSED, batched_modulation=True)  # 4 tokens: the interpreter is slow
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
    with pytest.raises(ValueError, match=r"class_labels must be one-hot rows of shape \(2, 5\)"):
        model(x, t, s, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="integer class_labels must be class indices"):
        model(x, t, s, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="noise_labels_t must have shape"):
        model(x, torch.rand(3), s, labels)
    with pytest.raises(ValueError, match="noise_labels_s must have shape"):
        model(x, t, torch.rand(2, 1), labels)
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
