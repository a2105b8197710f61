"""Small backbones: shapes, zero start, conditioning on both times and labels, gradients, size."""

import math

import pytest
import torch
from torch import nn

from imm_kernels.models import ConvBackbone, MLPBackbone
from imm_kernels.models.small import sinusoidal_embedding


def randomise_zero_init(model: nn.Module) -> nn.Module:
    """Gives the zero-initialised output layer random weights, so every path reaches the output."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.out.parameters():
            param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    return model


def inputs(model: nn.Module, batch: int = 6):
    gen = torch.Generator().manual_seed(0)
    if isinstance(model, MLPBackbone):
        shape = (batch, model.dim)
    else:
        shape = (batch, model.in_channels, model.image_size, model.image_size)
    x = torch.randn(shape, generator=gen)
    t = 1000 * torch.rand(batch, generator=gen)
    s = t * torch.rand(batch, generator=gen)
    return x, t, s


MODELS = [
    pytest.param(lambda: MLPBackbone(2, hidden=32, depth=2, label_dim=10), id="mlp"),
    pytest.param(lambda: ConvBackbone(label_dim=10, channels=16), id="conv-digits"),
    pytest.param(lambda: ConvBackbone(in_channels=3, image_size=12, channels=16, label_dim=10), id="conv-rgb"),
]


def test_sinusoidal_embedding_matches_hand_computation():
    t = torch.tensor([0.0, 1000.0, 250.0])
    # dim 4: frequencies 1 and 10000^(-1/2) = 0.01; layout [cos, cos, sin, sin].
    expected = torch.tensor([[math.cos(v), math.cos(0.01 * v), math.sin(v), math.sin(0.01 * v)] for v in t.tolist()])
    assert torch.allclose(sinusoidal_embedding(t, 4), expected, atol=1e-4)


@pytest.mark.parametrize("make", MODELS)
def test_output_shape_and_zero_start(make):
    model = make()
    x, t, s = inputs(model)
    out = model(x, t, s, None)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, torch.zeros_like(x))  # G = 0, so f_{s,t}(x) = c_skip·x at the start


@pytest.mark.parametrize("make", MODELS)
def test_labels_and_both_times_change_the_output(make):
    model = randomise_zero_init(make()).eval()
    x, t, s = inputs(model)
    one_hot = torch.eye(10)
    three, five = one_hot[[3] * len(x)], one_hot[[5] * len(x)]
    null = torch.zeros(len(x), 10)
    base = model(x, t, s, three)
    assert not torch.allclose(base, model(x, t, s, five), atol=1e-4)
    assert not torch.allclose(base, model(x, t, 0.5 * s, three), atol=1e-4)
    assert not torch.allclose(base, model(x, 0.5 * t, s, three), atol=1e-4)
    # The all-zero label is the null class: exactly the unconditional model.
    assert torch.equal(model(x, t, s, null), model(x, t, s, None))


@pytest.mark.parametrize("make", MODELS)
def test_every_parameter_gets_a_gradient(make):
    model = make()
    x, t, s = inputs(model)
    labels = torch.eye(10)[torch.arange(len(x)) % 10]
    (model(x, t, s, labels) - x).square().sum().backward()
    assert model.out.weight.grad.abs().sum() > 0  # the zero layer learns from the first step

    model = randomise_zero_init(make())
    (model(x, t, s, labels) - x).square().sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_scalar_times_broadcast_over_the_batch():
    model = randomise_zero_init(ConvBackbone(channels=16))
    x, t, s = inputs(model)
    full = torch.full((len(x),), 300.0)
    assert torch.equal(model(x, torch.tensor(300.0), torch.tensor(300.0)), model(x, full, full))


def test_default_digits_backbone_size():
    count = sum(p.numel() for p in ConvBackbone().parameters())
    assert 100_000 <= count <= 500_000, count


def test_bad_inputs_and_configs():
    model = ConvBackbone(channels=16, label_dim=10)
    x, t, s = inputs(model)
    with pytest.raises(ValueError, match=r"x must be \(B, 1, 8, 8\)"):
        model(torch.zeros(2, 1, 16, 16), t[:2], s[:2])
    with pytest.raises(ValueError, match=r"class_labels must be one-hot of shape \(6, 10\)"):
        model(x, t, s, torch.zeros(6, 9))
    with pytest.raises(ValueError, match=r"c_noise_s must be a tensor of shape \(6,\)"):
        model(x, t, s[:3])
    with pytest.raises(ValueError, match=r"x must be \(B, 2\)"):
        MLPBackbone(2)(torch.zeros(4, 3), t[:4], s[:4])
    with pytest.raises(ValueError, match="image_size must be a multiple"):
        ConvBackbone(image_size=9)
    with pytest.raises(ValueError, match="dropout"):
        ConvBackbone(dropout=1.0)
    with pytest.raises(ValueError, match="hidden"):
        MLPBackbone(2, hidden=0)
