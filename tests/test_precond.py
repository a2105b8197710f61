"""Preconditioner: f_{s,t} of docs/design.md §1.2 against hand formulas, around a tiny recording backbone."""

import math

import pytest
import torch
from torch import nn

from imm_kernels import Preconditioner

SIGMA_D = 0.5
ALLOWED = [
    ("fm", "euler_fm"),
    ("fm", "simple_edm"),
    ("fm", "identity"),
    ("vp_cosine", "simple_edm"),
    ("vp_cosine", "identity"),
]
TIME_PAIRS = [(0.0, 0.3), (0.1, 0.5), (0.45, 0.5), (0.2, 0.994), (0.7, 0.9)]  # (s, t), s < t


class TinyBackbone(nn.Module):
    """An MLP on (x, c_noise_t/1000, c_noise_s/1000, labels) that records every call."""

    def __init__(self, features: int = 3, label_dim: int = 0) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(features + 2 + label_dim, 16), nn.SiLU(), nn.Linear(16, features))
        self.calls: list[dict] = []

    def forward(self, x, c_noise_t, c_noise_s, class_labels):
        inputs = [x.flatten(1), c_noise_t[:, None] / 1000, c_noise_s[:, None] / 1000]
        if class_labels is not None:
            inputs.append(class_labels)
        out = self.mlp(torch.cat(inputs, 1)).view_as(x)
        self.calls.append(
            {
                "x": x.detach().clone(),
                "c_noise_t": c_noise_t.clone(),
                "c_noise_s": c_noise_s.clone(),
                "labels": None if class_labels is None else class_labels.clone(),
                "out_dtype": out.dtype,
            }
        )
        return out


def hand_coefficients(schedule: str, param: str, s: float, t: float) -> dict[str, float]:
    """c_in, c_skip, c_out and the kernel bandwidth of docs/design.md §1.2-1.3, with the math module."""
    if schedule == "fm":
        alpha_s, sigma_s, alpha_t, sigma_t = 1 - s, s, 1 - t, t
    else:
        alpha_s, sigma_s = math.cos(math.pi * s / 2), math.sin(math.pi * s / 2)
        alpha_t, sigma_t = math.cos(math.pi * t / 2), math.sin(math.pi * t / 2)
    norm = math.sqrt(alpha_t**2 + sigma_t**2)
    c_in = 1 / (SIGMA_D * norm)
    if param == "euler_fm":
        c_skip, c_out, bandwidth = 1.0, -(t - s) * SIGMA_D, 1 / ((t - s) * SIGMA_D)
    elif param == "simple_edm":
        c_skip = (alpha_t * alpha_s + sigma_t * sigma_s) / norm**2
        c_out = -SIGMA_D * (alpha_s * sigma_t - alpha_t * sigma_s) / norm
        bandwidth = norm / (SIGMA_D * abs(alpha_s * sigma_t - alpha_t * sigma_s))
    else:
        c_skip = sigma_s / sigma_t
        c_out = alpha_s - alpha_t * sigma_s / sigma_t
        bandwidth = abs(sigma_t / (alpha_s * sigma_t - sigma_s * alpha_t))
    return {"c_in": c_in, "c_skip": c_skip, "c_out": c_out, "bandwidth": bandwidth}


@pytest.mark.parametrize("schedule, param", ALLOWED)
@pytest.mark.parametrize("s, t", TIME_PAIRS)
def test_coefficients_match_hand_formulas(schedule, param, s, t):
    net = Preconditioner(TinyBackbone(), schedule=schedule, param=param)
    expected = hand_coefficients(schedule, param, s, t)
    assert net.c_in(t) == pytest.approx(expected["c_in"], rel=1e-12)
    assert net.c_skip(s, t) == pytest.approx(expected["c_skip"], rel=1e-12, abs=1e-15)
    assert net.c_out(s, t) == pytest.approx(expected["c_out"], rel=1e-12, abs=1e-15)
    assert net.kernel_bandwidth(s, t) == pytest.approx(expected["bandwidth"], rel=1e-12)
    assert net.kernel_bandwidth(s, t) == pytest.approx(1 / abs(net.c_out(s, t)), rel=1e-12)


def test_coefficients_follow_the_input_dtype():
    net = Preconditioner(TinyBackbone(), param="simple_edm")
    t = torch.tensor([0.5, 0.9])
    s = torch.tensor([0.1, 0.2])
    for value in (net.c_in(t), net.c_skip(s, t), net.c_out(s, t), net.kernel_bandwidth(s, t)):
        assert value.dtype == torch.float32 and value.shape == (2,)


@pytest.mark.parametrize("schedule, param", ALLOWED)
def test_kernel_bandwidth_is_one_where_s_equals_t(schedule, param):
    net = Preconditioner(TinyBackbone(), schedule=schedule, param=param)
    t = torch.tensor([0.0, 0.4, 0.994])
    assert torch.equal(net.kernel_bandwidth(t, t), torch.ones(3))


@pytest.mark.parametrize("schedule, param", ALLOWED)
@pytest.mark.parametrize("time_embed", ["identity", "stride"])
def test_forward_is_skip_plus_out_times_backbone(schedule, param, time_embed):
    torch.manual_seed(0)
    backbone = TinyBackbone(features=6).double()
    net = Preconditioner(backbone, schedule=schedule, param=param, time_embed=time_embed)
    s_values, t_values = zip(*TIME_PAIRS)
    x = torch.randn(len(TIME_PAIRS), 2, 3, dtype=torch.float64)
    out = net(x, torch.tensor(t_values, dtype=torch.float64), torch.tensor(s_values, dtype=torch.float64))
    assert out.dtype == torch.float64

    call = backbone.calls[-1]
    for i, (s, t) in enumerate(TIME_PAIRS):
        coefficients = hand_coefficients(schedule, param, s, t)
        second_time = t - s if time_embed == "stride" else s
        assert call["c_noise_t"][i].item() == pytest.approx(1000 * t, rel=1e-6)
        assert call["c_noise_s"][i].item() == pytest.approx(1000 * second_time, rel=1e-6, abs=1e-4)
        x_in = coefficients["c_in"] * x[i : i + 1]
        torch.testing.assert_close(call["x"][i : i + 1], x_in, rtol=1e-12, atol=0)
        g = backbone(x_in, call["c_noise_t"][i : i + 1], call["c_noise_s"][i : i + 1], None)
        expected = coefficients["c_skip"] * x[i] + coefficients["c_out"] * g[0]
        torch.testing.assert_close(out[i], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("schedule, param", ALLOWED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_f_ss_is_the_identity(schedule, param, dtype):
    backbone = TinyBackbone().to(dtype)
    net = Preconditioner(backbone, schedule=schedule, param=param, T=1.0)
    x = torch.randn(5, 3, dtype=dtype)
    t = torch.tensor([0.0, 1e-3, 0.3, 0.994, 1.0])  # t = s = 0 is 0/0 in the identity formula
    out = net(x, t, t)
    assert torch.equal(out, x)
    assert not torch.equal(net(x, t, t / 2), x)  # the check above can fail


def test_scalar_times_broadcast_to_the_batch():
    net = Preconditioner(TinyBackbone(), param="simple_edm")
    x = torch.randn(4, 3)
    per_sample = net(x, torch.full((4,), 0.7), torch.full((4,), 0.2))
    torch.testing.assert_close(net(x, torch.tensor(0.7), torch.tensor(0.2)), per_sample, rtol=0, atol=0)
    # Python numbers keep their float64 value.
    per_sample_float64 = net(x, torch.full((4,), 0.7, dtype=torch.float64), torch.full((4,), 0.2, dtype=torch.float64))
    torch.testing.assert_close(net(x, 0.7, 0.2), per_sample_float64, rtol=0, atol=0)


def test_float32_combination_for_low_precision_inputs():
    net = Preconditioner(TinyBackbone())
    assert net(torch.randn(2, 3, dtype=torch.bfloat16), 0.5, 0.25).dtype == torch.float32


def test_mixed_precision_autocasts_only_the_backbone():
    backbone = TinyBackbone()
    net = Preconditioner(backbone, mixed_precision="bf16")
    x = torch.randn(4, 3)
    out = net(x, 0.6, 0.3)
    assert backbone.calls[-1]["out_dtype"] == torch.bfloat16
    assert out.dtype == torch.float32

    out_fp32 = net(x, 0.6, 0.3, force_fp32=True)
    assert backbone.calls[-1]["out_dtype"] == torch.float32
    torch.testing.assert_close(out_fp32, Preconditioner(backbone)(x, 0.6, 0.3), rtol=0, atol=0)
    torch.testing.assert_close(out, out_fp32, rtol=0.05, atol=0.05)


def test_force_fp32_overrides_an_outer_autocast():
    backbone = TinyBackbone()
    net = Preconditioner(backbone)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(torch.randn(2, 3), 0.6, 0.3)
        assert backbone.calls[-1]["out_dtype"] == torch.bfloat16
        net(torch.randn(2, 3), 0.6, 0.3, force_fp32=True)
        assert backbone.calls[-1]["out_dtype"] == torch.float32


def test_class_labels_indices_one_hot_and_null():
    backbone = TinyBackbone(label_dim=4)
    net = Preconditioner(backbone, label_dim=4)
    x = torch.randn(3, 3)
    indices = torch.tensor([2, 0, 3])
    one_hot = torch.eye(4)[indices]
    torch.testing.assert_close(net(x, 0.5, 0.1, indices), net(x, 0.5, 0.1, one_hot), rtol=0, atol=0)
    assert torch.equal(backbone.calls[-2]["labels"], one_hot)
    net(x, 0.5, 0.1)
    assert torch.equal(backbone.calls[-1]["labels"], torch.zeros(3, 4))


def test_official_calling_conventions_equal_the_canonical_call():
    """The official IMM code passes (B, 1, 1, 1) or (1,) times, integer one-hot rows (F.one_hot), one null row
    (1, label_dim) for the batch, and soft rows, which reach the backbone unchanged."""
    backbone = TinyBackbone(label_dim=4)
    net = Preconditioner(backbone, label_dim=4)
    x = torch.randn(3, 3)
    t, s = torch.tensor([0.5, 0.7, 0.9]), torch.tensor([0.1, 0.2, 0.3])
    indices = torch.tensor([2, 0, 3])
    canonical = net(x, t, s, indices)
    assert torch.equal(net(x, t.view(3, 1, 1, 1), s.view(3, 1, 1, 1), indices), canonical)
    assert torch.equal(net(x, t, s, torch.nn.functional.one_hot(indices, 4)), canonical)  # int64 rows
    assert torch.equal(net(x, torch.tensor([0.5]), 0.1, indices), net(x, 0.5, 0.1, indices))
    assert torch.equal(net(x, t, s, torch.zeros(1, 4)), net(x, t, s))  # one null row for all
    assert torch.equal(net(x, t, s, torch.eye(4)[2:3]), net(x, t, s, torch.tensor([2, 2, 2])))
    soft = torch.tensor([[0.25, 0.25, 0.5, 0.0], [0.0, 0.1, 0.0, 0.0], [0.6, 0.0, 0.0, 0.4]])
    net(x, t, s, soft)
    assert torch.equal(backbone.calls[-1]["labels"], soft)

    assert torch.equal(net.cfg_forward(x, t, s, indices), canonical)
    assert torch.equal(net.cfg_forward(x, t, s, indices, cfg_scale=1.5), net.guided(x, t, s, indices, 1.5))


def test_unconditional_model_passes_no_labels():
    backbone = TinyBackbone()
    Preconditioner(backbone)(torch.randn(2, 3), 0.5, 0.1)
    assert backbone.calls[-1]["labels"] is None


@pytest.mark.parametrize("schedule, param", ALLOWED)
def test_guided_equals_the_two_call_formula(schedule, param):
    torch.manual_seed(1)
    backbone = TinyBackbone(label_dim=5)
    net = Preconditioner(backbone, schedule=schedule, param=param, label_dim=5)
    x = torch.randn(4, 3)
    t = torch.tensor([0.9, 0.6, 0.3, 0.994])
    s = torch.tensor([0.0, 0.5, 0.1, 0.4])
    labels = torch.tensor([1, 4, 0, 2])
    cfg_scale = 1.7

    backbone.calls.clear()
    guided = net.guided(x, t, s, labels, cfg_scale)
    assert len(backbone.calls) == 1 and backbone.calls[0]["x"].shape[0] == 8

    c_in = net.c_in(t.double()).float()[:, None]
    c_skip = net.c_skip(s.double(), t.double()).float()[:, None]
    c_out = net.c_out(s.double(), t.double()).float()[:, None]
    one_hot = torch.eye(5)[labels]
    g_cond = backbone(c_in * x, 1000 * t, 1000 * s, one_hot)
    g_null = backbone(c_in * x, 1000 * t, 1000 * s, torch.zeros(4, 5))
    expected = c_skip * x + c_out * (g_null + cfg_scale * (g_cond - g_null))
    torch.testing.assert_close(guided, expected, rtol=1e-5, atol=1e-6)


def test_guided_with_scale_one_is_the_conditional_model():
    net = Preconditioner(TinyBackbone(label_dim=3), param="simple_edm", label_dim=3)
    x = torch.randn(2, 3)
    labels = torch.tensor([0, 2])
    torch.testing.assert_close(net.guided(x, 0.8, 0.2, labels, 1.0), net(x, 0.8, 0.2, labels), rtol=1e-6, atol=1e-6)
    per_sample_scale = torch.tensor([1.0, 3.0])
    guided = net.guided(x, 0.8, 0.2, labels, per_sample_scale)
    torch.testing.assert_close(guided[0], net(x, 0.8, 0.2, labels)[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(guided[1], net.guided(x, 0.8, 0.2, labels, 3.0)[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"schedule": "cosine"}, ValueError, "schedule must be one of"),
        ({"param": "edm"}, ValueError, "param must be one of"),
        ({"time_embed": "sum"}, ValueError, "time_embed must be one of"),
        ({"schedule": "vp_cosine", "param": "euler_fm"}, ValueError, "param='euler_fm' needs schedule='fm'"),
        ({"T": 0.3, "eps": 0.3}, ValueError, r"0 <= eps < T <= 1"),
        ({"T": 1.5}, ValueError, r"0 <= eps < T <= 1"),
        ({"eps": -0.1}, ValueError, r"0 <= eps < T <= 1"),
        ({"sigma_data": 0.0}, ValueError, "sigma_data must be positive"),
        ({"label_dim": -1}, ValueError, "label_dim must be a non-negative int"),
        ({"time_scale": "1000"}, TypeError, "time_scale must be a number"),
        ({"mixed_precision": "fp8"}, ValueError, "mixed_precision must be one of"),
    ],
)
def test_bad_configs_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        Preconditioner(TinyBackbone(), **kwargs)


def test_bad_calls_raise():
    net = Preconditioner(TinyBackbone())
    x = torch.randn(4, 3)
    with pytest.raises(
        ValueError, match=r"t must be a number or a tensor of shape \(\), \(1,\), \(4,\) or \(4, 1, ...\)"
    ):
        net(x, torch.rand(3), 0.1)
    with pytest.raises(ValueError, match=r"s must be a number or a tensor of shape .*got \(4, 2\)"):
        net(x, 0.5, torch.rand(4, 2))
    with pytest.raises(ValueError, match="model is unconditional"):
        net(x, 0.5, 0.1, torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="needs a conditional model"):
        net.guided(x, 0.5, 0.1, None, 2.0)
    with pytest.raises(ValueError, match="the backbone returned shape"):
        Preconditioner(lambda x, c_t, c_s, labels: x[:, :2])(x, 0.5, 0.1)

    conditional = Preconditioner(TinyBackbone(label_dim=2), label_dim=2)
    with pytest.raises(ValueError, match=r"class_labels rows must have shape \(4, 2\) or \(1, 2\), got \(4, 3\)"):
        conditional(x, 0.5, 0.1, torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"class_labels rows must have shape .* got \(2, 2\)"):
        conditional(x, 0.5, 0.1, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"class_labels must be \(4,\) integer class indices or rows"):
        conditional(x, 0.5, 0.1, torch.zeros(4))
    with pytest.raises(TypeError, match="class_labels must be integer or floating-point, got torch.bool"):
        conditional(x, 0.5, 0.1, torch.zeros(4, 2, dtype=torch.bool))
