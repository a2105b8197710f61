"""imm_kernels.models.unet.SongUNet: the official IMM U-Net's state dict (written out here from the
architecture), an independent plain transcription of the official forward, calling conventions,
dropout, the fused embedding op, errors, and an IMM training step.

Models are tiny (8×8 or 16×16 inputs, 8-16 channels). conv1, proj and aux_conv start at 1e-5 of
their xavier scale, so the untrained output is ~0: every comparison randomises the weights first.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from imm_kernels import IMMLoss, Preconditioner
from imm_kernels.models.unet import PositionalEmbedding, SongUNet

pytestmark = pytest.mark.usefixtures("one_thread", "fp32_convolutions")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # conftest sets TRITON_INTERPRET=1 without CUDA
FUSED = "triton"  # runs in the interpreter on the CPU; "auto" could silently take the reference
TINY = dict(
    img_resolution=8,
    in_channels=3,
    out_channels=3,
    model_channels=8,
    channel_mult=(1, 2),
    num_blocks=1,
    attn_resolutions=(8,),
    dropout=0.0,
)
# The released CIFAR-10 model: configs/cifar10_generate_images.yaml as IMMPrecond passes it on.
CIFAR10 = dict(
    img_resolution=32,
    img_channels=3,
    in_channels=3,
    out_channels=3,
    label_dim=0,
    embedding_type="positional",
    encoder_type="standard",
    decoder_type="standard",
    channel_mult_noise=1,
    resample_filter=[1, 1],
    model_channels=128,
    channel_mult=[2, 2, 2],
    s_embed=True,
    dropout=0.2,
)


@pytest.fixture
def fp32_convolutions(monkeypatch):
    """cuDNN runs float32 convolutions in TF32 by default on Ampere and later GPUs; the comparisons
    here are at float32 (and float64) rounding."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def tiny_unet(seed: int = 0, **overrides) -> SongUNet:
    torch.manual_seed(seed)
    return SongUNet(**{**TINY, "backend": "torch", **overrides}).to(DEVICE)


def randomise(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Weights ~ N(0, 1/fan_in), vectors ~ N(0, 0.1²): activations stay O(1), nothing is ~0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            std = 1 / math.sqrt(param[0].numel()) if param.dim() >= 2 else 0.1
            param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype).to(param.device) * std)
    return model


def inputs(batch: int = 3, label_dim: int = 5, resolution: int = 8, seed: int = 2, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, resolution, resolution, generator=generator, dtype=dtype)
    t = torch.rand(batch, generator=generator, dtype=dtype) * 1000
    s = torch.rand(batch, generator=generator, dtype=dtype) * t
    labels = F.one_hot(torch.arange(batch) % label_dim, label_dim).float() if label_dim else None
    return x.to(DEVICE), t.to(DEVICE), s.to(DEVICE), None if labels is None else labels.to(DEVICE)


# ---------------------------------------------------------------------------
# The official state dict, written out from the architecture
# ---------------------------------------------------------------------------


def block_shapes(prefix, cin, cout, emb, *, resample_taps=0, attention=False):
    """A UNetBlock: norm0, conv0 (3×3), affine, norm1, conv1 (3×3), a 1×1 skip conv when the channels
    change or it resamples (resampling convs hold the (1, 1, f, f) filter), norm2/qkv/proj when it attends."""
    shapes = {
        "norm0.weight": (cin,),
        "norm0.bias": (cin,),
        "conv0.weight": (cout, cin, 3, 3),
        "conv0.bias": (cout,),
        "affine.weight": (cout, emb),
        "affine.bias": (cout,),
        "norm1.weight": (cout,),
        "norm1.bias": (cout,),
        "conv1.weight": (cout, cout, 3, 3),
        "conv1.bias": (cout,),
    }
    if resample_taps:
        shapes["conv0.resample_filter"] = (1, 1, resample_taps, resample_taps)
    if cin != cout or resample_taps:
        shapes |= {"skip.weight": (cout, cin, 1, 1), "skip.bias": (cout,)}
        if resample_taps:
            shapes["skip.resample_filter"] = (1, 1, resample_taps, resample_taps)
    if attention:
        shapes |= {
            "norm2.weight": (cout,),
            "norm2.bias": (cout,),
            "qkv.weight": (3 * cout, cout, 1, 1),
            "qkv.bias": (3 * cout,),
            "proj.weight": (cout, cout, 1, 1),
            "proj.bias": (cout,),
        }
    return {f"{prefix}.{key}": shape for key, shape in shapes.items()}


def expected_state_dict_shapes(
    img_resolution,
    in_channels,
    out_channels,
    label_dim=0,
    augment_dim=0,
    model_channels=128,
    channel_mult=(1, 2, 2, 2),
    channel_mult_emb=4,
    num_blocks=4,
    attn_resolutions=(16,),
    embedding_type="positional",
    channel_mult_noise=1,
    encoder_type="standard",
    decoder_type="standard",
    resample_filter=(1, 1),
    s_embed=True,
    **_,
):
    emb, noise, taps = model_channels * channel_mult_emb, model_channels * channel_mult_noise, len(resample_filter)
    shapes = {}
    time_maps = [("map_noise", "map_layer0", "map_layer1")]
    if s_embed:
        time_maps.append(("map_noise_s", "map_layer0_s", "map_layer1_s"))
    if label_dim:
        shapes |= {"map_label.weight": (noise, label_dim), "map_label.bias": (noise,)}
    if augment_dim:
        shapes["map_augment.weight"] = (noise, augment_dim)  # no bias
    for embedding, layer0, layer1 in time_maps:
        if embedding_type == "fourier":
            shapes[f"{embedding}.freqs"] = (noise // 2,)
        shapes |= {f"{layer0}.weight": (emb, noise), f"{layer0}.bias": (emb,)}
        shapes |= {f"{layer1}.weight": (emb, emb), f"{layer1}.bias": (emb,)}

    # Encoder: the input conv, then per level a down block (not at the top) and num_blocks blocks.
    top = f"{img_resolution}x{img_resolution}"
    shapes |= {f"enc.{top}_conv.weight": (model_channels, in_channels, 3, 3), f"enc.{top}_conv.bias": (model_channels,)}
    channels, aux_channels, skip_channels = model_channels, in_channels, [model_channels]
    for level, mult in enumerate(channel_mult):
        res = img_resolution // 2**level
        name = f"enc.{res}x{res}"
        if level > 0:
            shapes |= block_shapes(f"{name}_down", channels, channels, emb, resample_taps=taps)
            skip_channels.append(channels)
            if encoder_type == "skip":  # the input, downsampled (no weights), into a 1×1 conv
                shapes[f"{name}_aux_down.resample_filter"] = (1, 1, taps, taps)
                shapes[f"{name}_aux_skip.weight"] = (channels, in_channels, 1, 1)
                shapes[f"{name}_aux_skip.bias"] = (channels,)
            if encoder_type == "residual":  # a downsampling 3×3 conv of the previous level's aux
                shapes |= {
                    f"{name}_aux_residual.weight": (channels, aux_channels, 3, 3),
                    f"{name}_aux_residual.bias": (channels,),
                    f"{name}_aux_residual.resample_filter": (1, 1, taps, taps),
                }
                aux_channels = channels
        for index in range(num_blocks):
            out = model_channels * mult
            shapes |= block_shapes(f"{name}_block{index}", channels, out, emb, attention=res in attn_resolutions)
            channels = out
            skip_channels.append(channels)

    # Decoder: the lowest level starts with in0 (attention) and in1, the others with an up block;
    # then num_blocks + 1 blocks, each taking the last unused skip; the output aux layers.
    for level in reversed(range(len(channel_mult))):
        res = img_resolution // 2**level
        name = f"dec.{res}x{res}"
        if level == len(channel_mult) - 1:
            shapes |= block_shapes(f"{name}_in0", channels, channels, emb, attention=True)
            shapes |= block_shapes(f"{name}_in1", channels, channels, emb)
        else:
            shapes |= block_shapes(f"{name}_up", channels, channels, emb, resample_taps=taps)
        for index in range(num_blocks + 1):
            out = model_channels * channel_mult[level]
            attention = index == num_blocks and res in attn_resolutions
            cin = channels + skip_channels.pop()
            shapes |= block_shapes(f"{name}_block{index}", cin, out, emb, attention=attention)
            channels = out
        if decoder_type == "skip" or level == 0:
            if decoder_type == "skip" and level < len(channel_mult) - 1:
                shapes[f"{name}_aux_up.resample_filter"] = (1, 1, taps, taps)
            shapes |= {f"{name}_aux_norm.weight": (channels,), f"{name}_aux_norm.bias": (channels,)}
            shapes[f"{name}_aux_conv.weight"] = (out_channels, channels, 3, 3)
            shapes[f"{name}_aux_conv.bias"] = (out_channels,)
    assert not skip_channels
    return shapes


VARIANTS = [  # every encoder × decoder, with the other options varied across them
    dict(encoder_type="standard", decoder_type="standard"),
    dict(encoder_type="standard", decoder_type="skip", embedding_type="fourier", label_dim=4, augment_dim=2),
    dict(encoder_type="skip", decoder_type="standard", s_embed=False, label_dim=4, resample_filter=(1, 3, 3, 1)),
    dict(encoder_type="skip", decoder_type="skip", embedding_type="fourier", channel_mult_noise=2, augment_dim=3),
    dict(encoder_type="residual", decoder_type="standard", resample_filter=(1, 3, 3, 1), channel_mult_emb=2),
    dict(
        encoder_type="residual",
        decoder_type="skip",
        embedding_type="fourier",
        s_embed=False,
        label_dim=4,
        num_blocks=2,
        channel_mult=(1, 2, 2),
        img_resolution=16,
        attn_resolutions=(8, 4),
    ),
]


def variant_id(variant):
    return "-".join(f"{value}" for value in variant.values())


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_state_dict_has_the_official_names_and_shapes(variant):
    config = {**TINY, **variant}
    model = SongUNet(**config)
    state = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert state == expected_state_dict_shapes(**config)
    buffers = {name for name, _ in model.named_buffers()}
    assert all(name.endswith((".freqs", ".resample_filter")) for name in buffers)
    assert ("map_noise.freqs" in buffers) == (config.get("embedding_type") == "fourier")


def test_released_cifar10_config_state_dict_and_parameter_count():
    with torch.device("meta"):  # shapes only: no memory, no time
        model = SongUNet(**CIFAR10)
    state = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert state == expected_state_dict_shapes(**CIFAR10, num_blocks=4, attn_resolutions=(16,))
    # The count by hand. Channels: 128 after the input conv, 256 everywhere else; emb 512, noise 128.
    #   A block 256 -> 256 without skip: norm0 512 + conv0 9·256·256+256 + affine 512·256+256 + norm1 512
    #     + conv1 9·256·256+256 = 1,312,512; a 1×1 skip 256 -> 256: 65,792; attention (norm2 512,
    #     qkv 256·768+768, proj 256·256+256): 263,680.
    #   Block 128 -> 256 (+skip): 256 + 295,168 + 131,328 + 512 + 590,080 + 33,024 = 1,050,368.
    #   Block 512 -> 256 (+skip): 1,024 + 1,179,904 + 131,328 + 512 + 590,080 + 131,328 = 2,034,176.
    #   Block 384 -> 256 (+skip): 768 + 884,992 + 131,328 + 512 + 590,080 + 98,560 = 1,706,240.
    # Mapping, t and s: 2·(128·512+512 + 512·512+512) = 657,408.
    # Encoder: conv 3·128·9+128 = 3,584; 32x32 blocks 1,050,368 + 3·1,312,512; 16x16_down and 8x8_down
    #   1,312,512+65,792 each; 16x16 blocks 4·(1,312,512+263,680); 8x8 blocks 4·1,312,512: 19,302,912.
    # Decoder: 8x8_in0 1,576,192, in1 1,312,512, 8x8 blocks 5·2,034,176; 16x16_up 1,378,304, 16x16 blocks
    #   4·2,034,176 + (2,034,176+263,680); 32x32_up 1,378,304, blocks 4·2,034,176 + 1,706,240 (its skip is
    #   the 128-channel input conv); aux_norm 512, aux_conv 9·256·3+3 = 6,915: 36,101,123.
    assert sum(p.numel() for p in model.parameters()) == 657_408 + 19_302_912 + 36_101_123 == 56_061_443


def test_fourier_variants_and_positional_has_no_buffer():
    learnable = SongUNet(**TINY, embedding_type="fourier", embedding_kwargs={"scale": 16, "learnable": True})
    assert {"map_noise.freqs", "map_noise_s.freqs"} <= {name for name, _ in learnable.named_parameters()}
    assert 4 < learnable.map_noise.freqs.std() < 40  # N(0, 16²), 4 draws
    fixed = SongUNet(**TINY, embedding_type="fourier")
    assert "map_noise.freqs" in dict(fixed.named_buffers()) and "map_noise.freqs" not in dict(fixed.named_parameters())
    assert fixed.map_noise.freqs.abs().max() < 0.2  # N(0, 0.02²)
    assert not any("map_noise" in key for key in SongUNet(**TINY).state_dict())


def test_initialisation_is_the_official_one():
    model = tiny_unet()
    state = model.state_dict()

    def xavier_bound(weight):
        fan_in = weight.shape[1] * weight[0, 0].numel()
        fan_out = weight.shape[0] * weight[0, 0].numel()
        return math.sqrt(6 / (fan_in + fan_out))

    for key, value in state.items():
        if key.endswith(".bias"):
            assert value.abs().max() == 0, key
        elif "norm" in key:
            assert torch.all(value == 1), key  # GroupNorm weights (biases checked above)
        elif key.endswith(".weight"):
            gain = 1.0
            if key.endswith(("conv1.weight", "proj.weight", "aux_conv.weight")):
                gain = 1e-5
            elif key.endswith("qkv.weight"):
                gain = math.sqrt(0.2)
            bound = gain * xavier_bound(value)
            assert value.abs().max() <= bound, key
            assert value.abs().max() > 0.5 * bound, key  # uniform over the whole range
        else:
            assert key.endswith("resample_filter") and torch.equal(value.cpu(), torch.full((1, 1, 2, 2), 0.25)), key
    x, t, s, _ = inputs()
    assert model(x, t, s).abs().max() < 1e-3  # the near-zero output layer


# ---------------------------------------------------------------------------
# An independent plain transcription of the official forward, from a state dict
# ---------------------------------------------------------------------------


def plain_silu(x):
    return x * torch.sigmoid(x)


def plain_group_norm(sd, prefix, x, eps=1e-6):
    batch, channels = x.shape[:2]
    groups = min(32, channels // 4)
    grouped = x.reshape(batch, groups, -1)
    mean = grouped.mean(dim=2, keepdim=True)
    var = ((grouped - mean) ** 2).mean(dim=2, keepdim=True)
    normed = ((grouped - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    return normed * sd[prefix + ".weight"][:, None, None] + sd[prefix + ".bias"][:, None, None]


def plain_conv(sd, prefix, x, padding=None):
    weight = sd[prefix + ".weight"]
    padding = weight.shape[-1] // 2 if padding is None else padding
    return F.conv2d(x, weight, padding=padding) + sd[prefix + ".bias"][:, None, None]


def down_1d(x, taps, dim, pad):
    """out[i] = Σ_j g_j·x[2i + j - pad] along dim (zero padding), g = taps / Σ taps."""
    g = [tap / sum(taps) for tap in taps]
    x = x.movedim(dim, -1)
    padded = F.pad(x, (pad, pad))
    size = (padded.shape[-1] - len(g)) // 2 + 1
    out = sum(g[j] * padded[..., j : j + 2 * size - 1 : 2] for j in range(len(g)))
    return out.movedim(-1, dim)


def up_1d(x, taps, dim):
    """out[o] = Σ_{2i + j - pad = o} 2·g_j·x[i] along dim (a stride-2 transposed conv), pad = (len - 1) // 2."""
    g = [2 * tap / sum(taps) for tap in taps]
    pad = (len(g) - 1) // 2
    x = x.movedim(dim, -1)
    size = x.shape[-1]
    full = x.new_zeros(*x.shape[:-1], 2 * size + len(g))
    for j in range(len(g)):
        full[..., j : j + 2 * size : 2] += g[j] * x
    return full[..., pad : pad + 2 * size].movedim(-1, dim)


def plain_down(x, taps, pad=None):
    pad = (len(taps) - 1) // 2 if pad is None else pad
    return down_1d(down_1d(x, taps, 2, pad), taps, 3, pad)


def plain_up(x, taps):
    return up_1d(up_1d(x, taps, 2), taps, 3)


def plain_attention(q, k, v):
    """softmax(qᵀk / sqrt(C)) applied to v, with the scores in float32 as the official formula has them
    (even in a float64 model). Written with the official contraction: both implementations then round
    the float32 scores identically, so a float64 comparison stays at float64 rounding."""
    scale = math.sqrt(k.shape[1])
    weights = torch.einsum("ncq,nck->nqk", q.float(), (k / scale).float()).softmax(dim=2).to(q.dtype)
    return torch.einsum("nqk,nck->ncq", weights, v)


def plain_block(sd, prefix, x, emb, taps, *, up=False, down=False, dropout_mask=None):
    """A UNetBlock as the official code computes it (adaptive_scale=False, skip_scale sqrt(1/2), one head)."""

    def resample(h):
        return plain_up(h, taps) if up else plain_down(h, taps) if down else h

    h = plain_conv(sd, prefix + ".conv0", resample(plain_silu(plain_group_norm(sd, prefix + ".norm0", x))))
    emb_dtype = emb.dtype
    shift = (emb @ sd[prefix + ".affine.weight"].to(emb_dtype).t() + sd[prefix + ".affine.bias"].to(emb_dtype)).to(
        h.dtype
    )
    h = plain_silu(plain_group_norm(sd, prefix + ".norm1", h + shift[:, :, None, None]))
    h = plain_conv(sd, prefix + ".conv1", h)
    skip = plain_conv(sd, prefix + ".skip", resample(x)) if prefix + ".skip.weight" in sd else x
    x = (h + skip) * math.sqrt(0.5)
    if prefix + ".qkv.weight" in sd:
        batch, channels, height, width = x.shape
        qkv = plain_conv(sd, prefix + ".qkv", plain_group_norm(sd, prefix + ".norm2", x))
        qkv = qkv.reshape(batch, channels, 3, height * width)  # the official channel layout: (c, q|k|v)
        attended = plain_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]).reshape(x.shape)
        x = (plain_conv(sd, prefix + ".proj", attended) + x) * math.sqrt(0.5)
    return x


def plain_time_features(sd, name, times, fourier):
    """[sin, cos] (the official code swaps the embedding's [cos, sin] halves)."""
    if fourier:
        freqs = sd[name + ".freqs"]
        angles = times[:, None] * (2 * math.pi * freqs)
    else:  # EDM's PositionalEmbedding with endpoint=True, in float64
        half = sd["map_layer0.weight"].shape[1] // 2
        freqs = torch.tensor([(1 / 10000) ** (k / (half - 1)) for k in range(half)], dtype=torch.float64)
        angles = times.double()[:, None] * freqs.to(times.device)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def plain_linear(sd, prefix, x):
    out = x @ sd[prefix + ".weight"].to(x.dtype).t()
    return out + sd[prefix + ".bias"].to(x.dtype) if prefix + ".bias" in sd else out


def plain_unet(sd, x, t, s, labels=None, augment=None, *, taps=(1, 1), fourier=False):
    """The official SongUNet forward (eval mode), from a state dict; the architecture is read from the keys."""
    emb = plain_time_features(sd, "map_noise", t, fourier)
    if labels is not None:
        emb = emb + plain_linear(sd, "map_label", labels * math.sqrt(labels.shape[1]))
    if augment is not None:
        emb = emb + plain_linear(sd, "map_augment", augment)
    emb = plain_linear(sd, "map_layer1", plain_silu(plain_linear(sd, "map_layer0", emb)))
    if s is not None and "map_layer0_s.weight" in sd:
        emb_s = plain_time_features(sd, "map_noise_s", s, fourier)
        emb = emb + plain_linear(sd, "map_layer1_s", plain_silu(plain_linear(sd, "map_layer0_s", emb_s)))
    emb = plain_silu(emb)

    def layers(prefix):  # the enc./dec. entries in state-dict order
        return list(dict.fromkeys(key.split(".")[1] for key in sd if key.startswith(prefix)))

    skips, aux = [], x
    for name in layers("enc."):
        key = "enc." + name
        if name.endswith("_aux_down"):
            aux = plain_down(aux, taps)
        elif name.endswith("_aux_skip"):
            x = skips[-1] = x + plain_conv(sd, key, aux)
        elif name.endswith("_aux_residual"):  # conv (padded for the filter too), then filter
            conv = plain_conv(sd, key, aux, padding=1 + (len(taps) - 1) // 2)
            x = skips[-1] = aux = (x + plain_down(conv, taps, pad=0)) / math.sqrt(2)
        elif name.endswith("_conv"):
            x = plain_conv(sd, key, x)
            skips.append(x)
        else:
            x = plain_block(sd, key, x, emb, taps, down=name.endswith("_down"))
            skips.append(x)
    out = None
    for name in layers("dec."):
        key = "dec." + name
        if name.endswith("_aux_up"):
            out = plain_up(out, taps)
        elif name.endswith("_aux_norm"):
            normed = plain_group_norm(sd, key, x)
        elif name.endswith("_aux_conv"):
            level_out = plain_conv(sd, key, plain_silu(normed))
            out = level_out if out is None else level_out + out
        else:
            if x.shape[1] != sd[key + ".norm0.weight"].shape[0]:
                x = torch.cat([x, skips.pop()], dim=1)
            x = plain_block(sd, key, x, emb, taps, up=name.endswith("_up"))
    return out


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_matches_the_plain_transcription_in_float64(variant):
    config = {**TINY, **variant}
    model = randomise(tiny_unet(**variant)).double().eval()
    label_dim, augment_dim = config.get("label_dim", 0), config.get("augment_dim", 0)
    x, t, s, labels = inputs(label_dim=label_dim, resolution=config["img_resolution"], dtype=torch.float64)
    if labels is not None:  # soft rows, used as they are by the official linear map
        labels = torch.softmax(torch.randn(labels.shape, generator=torch.Generator().manual_seed(4)), 1).to(DEVICE)
    augment = torch.randn(3, augment_dim, dtype=torch.float64).to(DEVICE) if augment_dim else None
    with torch.no_grad():
        out = model(x, t, s, labels, augment_labels=augment)
        expected = plain_unet(
            model.state_dict(),
            x,
            t,
            s,
            labels,
            augment,
            taps=config.get("resample_filter", (1, 1)),
            fourier=config.get("embedding_type") == "fourier",
        )
    assert out.dtype == torch.float64 and expected.abs().max() > 0.1  # a non-trivial output
    # Float64 rounding: the positional angles reach 1000 rad, where the library's frequencies and EDM's
    # pow() formula differ by a few ulps (~1e-13 rad); the two implementations also order their sums
    # differently through ~20 layers. Measured: <= 6e-16 of the largest output; 1e-13 leaves room for
    # other devices' reduction orders and is still ~1e6 times below a float32-level discrepancy.
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-13 * expected.abs().max().item())


def test_float32_matches_the_transcription_and_stays_float32():
    model = randomise(tiny_unet(label_dim=5))
    x, t, s, labels = inputs()
    with torch.no_grad():
        out = model(x, t, s, labels)
        expected = plain_unet(model.state_dict(), x, t, s, labels)
    assert out.dtype == torch.float32 and model._embedding(t, s, labels, None).dtype == torch.float64
    # Float32 rounding through ~20 layers (group norm and resampling are written differently): measured
    # 1.8e-7 of the largest output.
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-6 * expected.abs().max().item())


def test_positional_embedding_equals_the_endpoint_formula_to_float64_rounding():
    times = torch.cat([torch.rand(64, dtype=torch.float64) * 1000, torch.tensor([0.0, 6.0, 994.0, 1000.0])])
    for channels in (4, 8, 128, 256):
        half = channels // 2
        freqs = torch.tensor([(1 / 10000) ** (k / (half - 1)) for k in range(half)], dtype=torch.float64)
        angles = times[:, None] * freqs
        expected = torch.cat([angles.cos(), angles.sin()], dim=1)
        for backend in ("torch", FUSED):
            out = PositionalEmbedding(channels)(times.to(DEVICE), backend).cpu()
            assert out.dtype == torch.float64
            # Angles up to 1000 rad: one float64 ulp there is 1.1e-13, and the Triton kernel receives
            # log(max_period) as two float32 halves (~48 bits). Measured: <= 1.2e-13 (torch), 6.3e-13 (triton).
            torch.testing.assert_close(out, expected, rtol=0, atol=2e-12)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def independent_state_dict(config, seed=3):
    """Random values for every expected key (filters: outer(f, f)/sum(f)²), built without a SongUNet."""
    generator = torch.Generator().manual_seed(seed)
    taps = torch.tensor(config.get("resample_filter", (1, 1)), dtype=torch.float32)
    state = {}
    for key, shape in expected_state_dict_shapes(**config).items():
        if key.endswith("resample_filter"):
            state[key] = (torch.outer(taps, taps) / taps.sum() ** 2).reshape(shape)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 100
            state[key] = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
    return state


def test_strict_load_of_an_independent_state_dict_and_round_trip():
    variant = VARIANTS[3]  # skip encoder and decoder, Fourier
    config = {**TINY, **variant}
    state = independent_state_dict(config)
    model = tiny_unet(**variant)
    model.load_state_dict(state, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value.cpu(), state[key]), key
    x, t, s, _ = inputs()
    with torch.no_grad():
        out = model(x, t, s, augment_labels=torch.ones(3, 3, device=DEVICE))
        expected = plain_unet(
            {k: v.to(DEVICE) for k, v in state.items()}, x, t, s, augment=torch.ones(3, 3, device=DEVICE), fourier=True
        )
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
        copy = tiny_unet(seed=9, **variant)
        copy.load_state_dict(model.state_dict(), strict=True)
        assert torch.equal(copy(x, t, s, augment_labels=torch.ones(3, 3, device=DEVICE)), out)
    with pytest.raises(RuntimeError, match="map_layer0_s"):
        tiny_unet(**variant).load_state_dict({k: v for k, v in state.items() if "map_layer0_s" not in k})
    with pytest.raises(RuntimeError, match="map_noise_s.freqs"):
        tiny_unet(**{**variant, "s_embed": False}).load_state_dict(state)


# ---------------------------------------------------------------------------
# Calling conventions, labels, dropout, backends
# ---------------------------------------------------------------------------


def test_time_shapes_are_interchangeable():
    model = randomise(tiny_unet(label_dim=5))
    x, t, s, labels = inputs()
    with torch.no_grad():
        reference = model(x, t, s, labels)
        assert torch.equal(model(x, t.reshape(3, 1, 1, 1), s.reshape(3, 1, 1, 1), labels), reference)
        same_t = model(x, t[:1].expand(3).clone(), s, labels)
        assert torch.equal(model(x, t[:1], s, labels), same_t)
        assert torch.equal(model(x, t[0], s, labels), same_t)
        assert torch.equal(model(x, t[0].reshape(1, 1, 1, 1), s, labels), same_t)
        whole = torch.tensor([700, 20, 350], device=DEVICE)
        assert torch.equal(model(x, whole, s, labels), model(x, whole.float(), s, labels))


def test_label_forms_give_the_canonical_output():
    model = randomise(tiny_unet(label_dim=5))
    x, t, s, _ = inputs()
    indices = torch.tensor([0, 3, 4], device=DEVICE)
    one_hot = F.one_hot(indices, 5).float()
    with torch.no_grad():
        reference = model(x, t, s, one_hot)
        assert torch.equal(model(x, t, s, indices), reference)
        assert torch.equal(model(x, t, s, one_hot.long()), reference)
        assert torch.equal(model(x, t, s, one_hot.bool()), reference)
        same_row = model(x, t, s, one_hot[1:2].expand(3, 5).clone())
        assert torch.equal(model(x, t, s, one_hot[1:2]), same_row)
        null = model(x, t, s, torch.zeros(3, 5, device=DEVICE))
        assert torch.equal(model(x, t, s, None), null)
        assert (null - reference).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every sample sees its label
        # Soft rows go through the linear map as they are (no argmax): the transcription's values.
        soft = torch.tensor([[0.5, 0.5, 0, 0, 0], [0.1, 0.2, 0.3, 0.4, 0.0], [0, 0, 0, 0, 2.0]], device=DEVICE)
        out = model(x, t, s, soft)
        torch.testing.assert_close(out, plain_unet(model.state_dict(), x, t, s, soft), rtol=1e-5, atol=1e-6)
        assert (out - model(x, t, s, soft.argmax(dim=1))).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def test_second_time_embedding_switches():
    model = randomise(tiny_unet())
    x, t, s, _ = inputs()
    with torch.no_grad():
        with_s = model(x, t, s)
        without_s = model(x, t)
        assert (with_s - without_s).abs().max() > 1e-3
        torch.testing.assert_close(without_s, plain_unet(model.state_dict(), x, t, None), rtol=1e-5, atol=1e-6)
        no_s_embed = randomise(tiny_unet(s_embed=False))
        assert torch.equal(no_s_embed(x, t, s), no_s_embed(x, t))  # s is ignored, as officially


def test_dropout_only_in_training_mode():
    model = randomise(tiny_unet(dropout=0.5, label_dim=5, label_dropout=1.0))
    x, t, s, labels = inputs()
    model.eval()
    with torch.no_grad():
        evaluated = model(x, t, s, labels)
        torch.testing.assert_close(evaluated, plain_unet(model.state_dict(), x, t, s, labels), rtol=1e-5, atol=1e-6)
        model.train()
        torch.manual_seed(0)
        first = model(x, t, s, labels)
        torch.manual_seed(1)
        second = model(x, t, s, labels)
        assert (first - second).abs().max() > 1e-3 and (first - evaluated).abs().max() > 1e-3
        # label_dropout=1 drops every label in training: with dropout off, the null-label output.
        model.dropout = 0
        for block in model.modules():
            if hasattr(block, "dropout"):
                block.dropout = 0.0
        trained_no_dropout = model(x, t, s, labels)
        model.eval()
        assert torch.equal(trained_no_dropout, model(x, t, s, torch.zeros_like(labels)))


def test_fused_embedding_matches_the_torch_backend():
    model = randomise(tiny_unet(backend=FUSED)).double()
    x, t, s, _ = inputs(dtype=torch.float64)
    with torch.no_grad():
        fused = model(x, t, s)
        model.backend = "torch"
        reference = model(x, t, s)
    # Only the embeddings differ, by <= 6.3e-13 (see the embedding test), and the randomised layers have
    # O(1) gain. Measured: 6e-16 of the largest output.
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-12 * reference.abs().max().item())
    with pytest.raises(ValueError, match="backend must be one of"):
        model.backend = "cuda"


def test_bf16_autocast_runs_with_a_float64_embedding():
    model = randomise(tiny_unet(label_dim=5))
    x, t, s, labels = inputs()
    with torch.no_grad():
        full = model(x, t, s, labels)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            emb = model._embedding(t, s, labels, None)
            low = model(x, t, s, labels)
    assert emb.dtype == torch.float64  # autocast leaves the float64 mapping layers alone, as officially
    assert low.isfinite().all()
    assert (low.float() - full).abs().max() < 0.05 * full.abs().max()  # bf16 accuracy


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_bad_inputs():
    model = tiny_unet(label_dim=5)
    x, t, s, labels = inputs()
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3, 8, 8\), got \(3, 3, 16, 16\)"):
        model(torch.randn(3, 3, 16, 16, device=DEVICE), t, s, labels)
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(3, 8, 8, device=DEVICE), t, s, labels)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        model(torch.zeros(3, 3, 8, 8, dtype=torch.long, device=DEVICE), t, s, labels)
    with pytest.raises(ValueError, match=r"noise_labels_t must hold 3 times .* got shape \(2,\)"):
        model(x, t[:2], s, labels)
    with pytest.raises(ValueError, match="noise_labels_s must hold 3 times"):
        model(x, t, torch.rand(3, 2, device=DEVICE), labels)
    with pytest.raises(TypeError, match="noise_labels_t must be a tensor"):
        model(x, 500.0, s, labels)
    with pytest.raises(TypeError, match="noise_labels_t must be a real"):
        model(x, torch.ones(3, dtype=torch.bool, device=DEVICE), s, labels)
    with pytest.raises(ValueError, match=r"class_labels must be rows of shape \(3, 5\) or \(1, 5\)"):
        model(x, t, s, torch.zeros(3, 4, device=DEVICE))
    with pytest.raises(ValueError, match="class_labels must be rows"):
        model(x, t, s, torch.zeros(2, 5, device=DEVICE))
    with pytest.raises(ValueError, match="1-D class_labels must be integer class indices"):
        model(x, t, s, torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match="1-D class_labels must be integer class indices"):
        model(x, t, s, torch.zeros(2, dtype=torch.long, device=DEVICE))
    with pytest.raises(TypeError, match="class_labels must be a tensor"):
        model(x, t, s, [0, 1, 2])
    with pytest.raises(ValueError, match="augment_labels were given but the model has no augmentation map"):
        model(x, t, s, labels, augment_labels=torch.zeros(3, 2, device=DEVICE))
    unconditional = tiny_unet(augment_dim=2)
    with pytest.raises(ValueError, match="class_labels were given but the model is unconditional"):
        unconditional(x, t, s, labels)
    with pytest.raises(ValueError, match=r"augment_labels must have shape \(3, 2\)"):
        unconditional(x, t, s, augment_labels=torch.zeros(3, 3, device=DEVICE))


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        (dict(in_channels=None), ValueError, "in_channels .*img_channels.* is required"),
        (dict(img_channels=4), ValueError, r"in_channels \(3\) and img_channels \(4\) disagree"),
        (
            dict(img_resolution=9),
            ValueError,
            r"img_resolution \(9\) must be a multiple of 2\^\(len\(channel_mult\) - 1\) = 2:",
        ),
        (dict(img_resolution=0), ValueError, "img_resolution must be an int >= 1"),
        (dict(model_channels=8.0), ValueError, "model_channels must be an int >= 1"),
        (dict(channel_mult=()), ValueError, "channel_mult must not be empty"),
        (dict(channel_mult=(1, 0)), ValueError, r"channel_mult\[1\] must be an int >= 1"),
        (dict(channel_mult="12"), ValueError, "channel_mult must be a list or tuple"),
        (dict(attn_resolutions=8), ValueError, "attn_resolutions must be a list or tuple"),
        (dict(num_blocks=-1), ValueError, "num_blocks must be a non-negative int"),
        (dict(label_dim=-1), ValueError, "label_dim must be a non-negative int"),
        (dict(dropout=1.0), ValueError, r"dropout must be in \[0, 1\)"),
        (dict(label_dropout=1.5), ValueError, "label_dropout must be a probability"),
        (dict(embedding_type="sinusoidal"), ValueError, "embedding_type must be one of"),
        (dict(encoder_type="unet"), ValueError, "encoder_type must be one of"),
        (dict(decoder_type="residual"), ValueError, "decoder_type must be one of"),
        (dict(resample_filter=(1, 2, 1)), ValueError, "resample_filter must have an even number"),
        (dict(resample_filter=(1, -1)), ValueError, "resample_filter must not sum to zero"),
        (dict(resample_filter=(1, float("nan"))), ValueError, r"resample_filter\[1\] must be a finite number"),
        (dict(s_embed=1), ValueError, "s_embed must be a bool"),
        (dict(model_channels=2), ValueError, "time embedding width .* = 2 must be even and >= 4"),
        (dict(channel_mult_noise=3, model_channels=9), ValueError, "time embedding width .* = 27 must be even"),
        (dict(model_channels=18, channel_mult=(1,)), ValueError, r"group norm over 18 channels .* = 4 equal groups"),
        (dict(embedding_kwargs={"scale": 1.0}), ValueError, "embedding_kwargs apply to embedding_type='fourier' only"),
        (
            dict(embedding_type="fourier", embedding_kwargs={"scales": 1.0}),
            ValueError,
            r"embedding_kwargs takes 'scale' and 'learnable', got unknown keys \['scales'\]",
        ),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(noise_schedule="fm", mixed_precision=None), TypeError, "arguments: mixed_precision, noise_schedule"),
    ],
)
def test_bad_constructor_arguments(overrides, error, match):
    with pytest.raises(error, match=match):
        SongUNet(**{**TINY, **overrides})


def test_official_argument_forms_are_accepted():
    by_alias = SongUNet(img_resolution=8, img_channels=3, model_channels=8, channel_mult=[1, 2], num_blocks=1)
    assert (by_alias.in_channels, by_alias.out_channels) == (3, 3)
    positional = SongUNet(8, 3, 2, 0, 0, 8, [1, 2], 4, 1, [8], 0.1, 0, "positional", 1, "standard", "standard", [1, 1])
    assert positional.out_channels == 2 and positional.share_tsemb
    without_effect = SongUNet(**TINY, share_tsemb=False, embedding_kwargs={})
    assert without_effect.state_dict().keys() == SongUNet(**TINY).state_dict().keys()


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def test_one_imm_training_step_with_a_songunet_backbone():
    backbone = tiny_unet(label_dim=5, dropout=0.1)
    net = Preconditioner(backbone, label_dim=5)
    loss_fn = IMMLoss(net, group_size=2, label_dropout=0.5)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    x = torch.randn(4, 3, 8, 8, device=DEVICE)
    labels = torch.tensor([0, 1, 2, 3], device=DEVICE)
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    optimizer.zero_grad()
    loss, stats = loss_fn(x, labels)
    assert loss.isfinite() and stats["weighted_mmd"].shape == (2,)
    loss.backward()
    for name, param in net.named_parameters():
        assert param.grad is not None and param.grad.isfinite().all(), name
    optimizer.step()
    changed = {name for name, p in net.named_parameters() if not torch.equal(p, before[name])}
    assert {"backbone.dec.8x8_aux_conv.weight", "backbone.enc.8x8_block0.qkv.weight"} <= changed
    assert {"backbone.map_layer0_s.weight", "backbone.map_label.weight"} <= changed
    with torch.no_grad():
        assert net(x, 0.9, 0.5, labels).shape == x.shape
