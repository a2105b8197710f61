"""IMMLoss against an independent transcription of docs/design.md §1.3."""

import math

import pytest
import torch
from torch import nn

import imm_kernels
from imm_kernels import IMMLoss, Preconditioner

SIGMA_D = 0.5


class RecordingBackbone(nn.Module):
    """A small MLP on (x, c_noise_t/1000, c_noise_s/1000, labels), with optional dropout, recording each call."""

    def __init__(self, features: int = 6, label_dim: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(features + 2 + label_dim, 32), nn.SiLU(), nn.Linear(32, features))
        self.dropout = nn.Dropout(dropout)
        self.calls: list[dict] = []

    def forward(self, x, c_noise_t, c_noise_s, class_labels):
        inputs = [x.flatten(1), c_noise_t[:, None] / 1000, c_noise_s[:, None] / 1000]
        if class_labels is not None:
            inputs.append(class_labels)
        mask = self.dropout(torch.ones_like(x))
        mlp_out = self.mlp(torch.cat(inputs, 1)).view_as(x)
        self.calls.append(
            {
                "c_noise_t": c_noise_t.detach().clone(),
                "mask": mask.detach().clone(),
                "out_dtype": mlp_out.dtype,
                "labels": None if class_labels is None else class_labels.clone(),
                "grad": torch.is_grad_enabled(),
            }
        )
        return mlp_out * mask


def alpha_sigma(schedule: str, t: float) -> tuple[float, float]:
    if schedule == "fm":
        return 1 - t, t
    return math.cos(math.pi * t / 2), math.sin(math.pi * t / 2)


def eta(schedule: str, t: float) -> float:
    alpha, sigma = alpha_sigma(schedule, t)
    return sigma / alpha


def eta_inv(schedule: str, value: float) -> float:
    return value / (1 + value) if schedule == "fm" else 2 / math.pi * math.atan(value)


def hand_time_weight(schedule: str, t: float, a: float, b: float) -> float:
    alpha, sigma = alpha_sigma(schedule, t)
    if schedule == "fm":
        logsnr, dlogsnr_dt = 2 * math.log((1 - t) / t), -2 / (t * (1 - t))
    else:
        logsnr, dlogsnr_dt = -2 * math.log(math.tan(math.pi * t / 2)), -math.pi / (sigma * alpha)
    sigmoid = 1 / (1 + math.exp(-(b - logsnr)))
    return 0.5 * sigmoid * -dlogsnr_dt * alpha**a / (alpha**2 + sigma**2)


def hand_bandwidth(schedule: str, param: str, s: float, t: float) -> float:
    alpha_s, sigma_s = alpha_sigma(schedule, s)
    alpha_t, sigma_t = alpha_sigma(schedule, t)
    if param == "euler_fm":
        return 1 / ((t - s) * SIGMA_D)
    if param == "simple_edm":
        return math.sqrt(alpha_t**2 + sigma_t**2) / (SIGMA_D * abs(alpha_s * sigma_t - alpha_t * sigma_s))
    return abs(sigma_t / (alpha_s * sigma_t - sigma_s * alpha_t))


def hand_mmd_squared(y: torch.Tensor, y_tilde: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """The V-statistic of one group (M, D) with the Laplace kernel exp(-w·max(|a-b|, 1e-8)/D)."""
    num_features = y.shape[1]

    def mean_kernel(p, q):
        return torch.exp(-bandwidth * (p[:, None] - q[None]).norm(dim=-1).clamp_min(1e-8) / num_features).mean()

    return mean_kernel(y, y) + mean_kernel(y_tilde, y_tilde) - 2 * mean_kernel(y, y_tilde)


@pytest.mark.parametrize("schedule, param", [("fm", "euler_fm"), ("fm", "identity"), ("vp_cosine", "simple_edm")])
@pytest.mark.parametrize("k, eps, T", [(12, 0.0, 0.994), (2, 0.05, 0.9)])
def test_sample_times_match_step_one(schedule, param, k, eps, T):
    loss_fn = IMMLoss(Preconditioner(RecordingBackbone(), schedule=schedule, param=param), k=k, eps=eps, T=T)
    num_groups = 50
    s, r, t = loss_fn.sample_times(num_groups, "cpu", torch.Generator().manual_seed(3))
    assert all(v.dtype == torch.float32 and v.shape == (num_groups,) for v in (s, r, t))

    generator = torch.Generator().manual_seed(3)
    u_t = torch.rand(num_groups, dtype=torch.float64, generator=generator).tolist()
    u_s = torch.rand(num_groups, dtype=torch.float64, generator=generator).tolist()
    eta_min, eta_max = eta(schedule, eps), eta(schedule, T)
    for g in range(num_groups):
        t_g = eps + (T - eps) * u_t[g]
        s_g = eps + (t_g - eps) * u_s[g]
        eta_r = min(max(eta(schedule, t_g) - (eta_max - eta_min) / 2**k, eta_min), eta_max)
        r_g = min(max(s_g, eta_inv(schedule, eta_r)), t_g)
        assert (s[g].item(), r[g].item(), t[g].item()) == pytest.approx((s_g, r_g, t_g), rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("schedule, param", [("fm", "euler_fm"), ("vp_cosine", "identity")])
@pytest.mark.parametrize("k", [0, 4, 12])
def test_r_stays_between_s_and_t(schedule, param, k):
    eps, T = (0.0, 0.994) if k != 4 else (0.02, 0.5)
    loss_fn = IMMLoss(Preconditioner(RecordingBackbone(), schedule=schedule, param=param), k=k, eps=eps, T=T)
    s, r, t = loss_fn.sample_times(20_000, "cpu", torch.Generator().manual_seed(k))
    assert torch.all(eps <= s) and torch.all(s <= r) and torch.all(r <= t) and torch.all(t <= T)
    if k > 0:  # r is a real step below t for most draws, and clamped to s for some
        assert (r < t).float().mean() > 0.5 and torch.any(r == s)


@pytest.mark.parametrize("schedule", ["fm", "vp_cosine"])
@pytest.mark.parametrize("a, b", [(1, 4), (2, 4), (1, 5)])
def test_time_weight_matches_hand_formula(schedule, a, b):
    param = "euler_fm" if schedule == "fm" else "simple_edm"
    loss_fn = IMMLoss(Preconditioner(RecordingBackbone(), schedule=schedule, param=param), a=a, b=b)
    for t in (1e-3, 0.1, 0.5, 0.8, 0.994):
        assert loss_fn.time_weight(t) == pytest.approx(hand_time_weight(schedule, t, a, b), rel=1e-12)


def test_fm_time_weight_at_one_half_is_about_3_93():
    loss_fn = IMMLoss(Preconditioner(RecordingBackbone()), a=1, b=4)
    # lambda = 0, -dlambda/dt = 8, alpha^a/(alpha² + sigma²) = 1: w = ½·sigmoid(4)·8.
    assert loss_fn.time_weight(0.5) == pytest.approx(4 / (1 + math.exp(-4)), rel=1e-14)
    assert loss_fn.time_weight(0.5) == pytest.approx(3.93, abs=0.005)


@pytest.mark.parametrize("schedule", ["fm", "vp_cosine"])
def test_time_weight_at_t_zero_is_its_limit_zero(schedule):
    loss_fn = IMMLoss(Preconditioner(RecordingBackbone(), schedule=schedule, param="identity"))
    assert torch.equal(loss_fn.time_weight(torch.tensor([0.0])), torch.zeros(1))


@pytest.mark.parametrize("schedule, param", [("fm", "euler_fm"), ("fm", "simple_edm"), ("vp_cosine", "identity")])
def test_kernel_bandwidth_matches_hand_formula(schedule, param):
    loss_fn = IMMLoss(Preconditioner(RecordingBackbone(), schedule=schedule, param=param))
    for s, t in ((0.0, 0.4), (0.3, 0.31), (0.5, 0.994)):
        assert loss_fn.kernel_bandwidth(s, t) == pytest.approx(hand_bandwidth(schedule, param, s, t), rel=1e-12)


CASES = [
    # schedule, param, time_embed, group_size, label_dim, label_dropout, k, eps, T
    ("fm", "euler_fm", "identity", 4, 0, 0.0, 12, None, None),
    ("fm", "identity", "stride", 1, 0, 0.0, 12, None, None),
    ("vp_cosine", "simple_edm", "identity", 3, 5, 0.5, 8, 0.01, 0.9),
]


@pytest.mark.parametrize("schedule, param, time_embed, group_size, label_dim, label_dropout, k, eps, T", CASES)
def test_forward_equals_transcription_of_the_seven_steps(
    schedule, param, time_embed, group_size, label_dim, label_dropout, k, eps, T
):
    torch.manual_seed(0)
    net = Preconditioner(
        RecordingBackbone(label_dim=label_dim).double(),
        schedule=schedule,
        param=param,
        time_embed=time_embed,
        label_dim=label_dim,
    )
    loss_fn = IMMLoss(net, group_size=group_size, k=k, eps=eps, T=T, label_dropout=label_dropout, backend="torch")
    num_groups = 5
    batch = num_groups * group_size
    x = torch.randn(batch, 2, 3, dtype=torch.float64)
    labels = torch.randint(0, label_dim, (batch,)) if label_dim else None

    torch.manual_seed(1234)
    loss, stats = loss_fn(x, labels)
    loss.backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()

    # The transcription, drawing in the documented order.
    torch.manual_seed(1234)
    eps = net.eps if eps is None else eps
    T = net.T if T is None else T
    u_t = torch.rand(num_groups, dtype=torch.float64).tolist()
    u_s = torch.rand(num_groups, dtype=torch.float64).tolist()
    times = []  # per group (s, r, t)
    for g in range(num_groups):  # step 1
        t_g = eps + (T - eps) * u_t[g]
        s_g = eps + (t_g - eps) * u_s[g]
        step = (eta(schedule, T) - eta(schedule, eps)) / 2**k
        eta_r = min(max(eta(schedule, t_g) - step, eta(schedule, eps)), eta(schedule, T))
        r_g = min(max(s_g, eta_inv(schedule, eta_r)), t_g)
        times.append(tuple(torch.tensor(v, dtype=torch.float32).item() for v in (s_g, r_g, t_g)))
    one_hot = None
    if label_dim:
        keep = torch.rand(batch) >= label_dropout
        one_hot = nn.functional.one_hot(labels, label_dim).double() * keep[:, None]
    noise = torch.randn_like(x) * SIGMA_D  # step 2

    x_t, x_r, s_p, r_p, t_p = [], [], [], [], []
    for i in range(batch):
        s_g, r_g, t_g = times[i // group_size]
        alpha_t, sigma_t = alpha_sigma(schedule, t_g)
        alpha_r, sigma_r = alpha_sigma(schedule, r_g)
        x_t.append(alpha_t * x[i] + sigma_t * noise[i])
        x_r.append(alpha_r * x[i] + sigma_r * noise[i])
        s_p.append(s_g), r_p.append(r_g), t_p.append(t_g)
    s_p, r_p, t_p = (torch.tensor(v, dtype=torch.float64) for v in (s_p, r_p, t_p))
    y = net(torch.stack(x_t), t_p, s_p, one_hot)  # step 3
    with torch.no_grad():
        y_tilde = net(torch.stack(x_r), r_p, s_p, one_hot)

    weighted = []
    for g in range(num_groups):  # steps 4-7
        s_g, r_g, t_g = times[g]
        rows = slice(g * group_size, (g + 1) * group_size)
        bandwidth = hand_bandwidth(schedule, param, s_g, t_g)
        mmd_squared = hand_mmd_squared(y[rows].flatten(1), y_tilde[rows].flatten(1), bandwidth)
        weighted.append(hand_time_weight(schedule, t_g, loss_fn.a, loss_fn.b) * mmd_squared)
    expected_loss = torch.stack(weighted).mean()
    expected_loss.backward()

    assert any(s_g < r_g for s_g, r_g, _ in times)  # the target really depends on the net
    torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=1e-14)
    for got, expected in zip(grads, (p.grad for p in net.parameters())):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(stats["weighted_mmd"], torch.stack(weighted).detach(), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(stats["t"], torch.tensor([tm[2] for tm in times]), rtol=0, atol=0)
    assert loss.item() > 0


def test_times_are_shared_within_each_group():
    backbone = RecordingBackbone()
    loss_fn = IMMLoss(Preconditioner(backbone), group_size=4, backend="torch")
    _, stats = loss_fn(torch.randn(12, 6))
    student_times = backbone.calls[0]["c_noise_t"].view(3, 4)
    assert torch.all(student_times == student_times[:, :1])
    torch.testing.assert_close(student_times[:, 0], 1000 * stats["t"])
    assert len(set(stats["t"].tolist())) == 3


def test_target_pass_replays_the_student_dropout_mask():
    backbone = RecordingBackbone(dropout=0.5)
    loss_fn = IMMLoss(Preconditioner(backbone), group_size=4, backend="torch")
    loss_fn(torch.randn(16, 6))
    student, target = backbone.calls
    assert torch.equal(student["mask"], target["mask"])
    assert 0 < (student["mask"] == 0).float().mean() < 1  # a real mask, not all-kept or all-dropped

    # The RNG moves on: the next step draws different masks.
    loss_fn(torch.randn(16, 6))
    assert not torch.equal(backbone.calls[2]["mask"], student["mask"])


def test_only_the_student_pass_records_gradients():
    backbone = RecordingBackbone()
    loss, _ = IMMLoss(Preconditioner(backbone), backend="torch")(torch.randn(8, 6))
    assert [call["grad"] for call in backbone.calls] == [True, False]
    assert loss.requires_grad


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_backward_takes_the_gradient_the_fused_forward_computed(backend, monkeypatch):
    """The loss's .backward() sends each group's term the upstream gradient the fused forward
    computed dx for: the backward never computes it again (3 passes over the outputs, not 5)."""
    from imm_kernels.ops.backends import BACKENDS

    chosen = BACKENDS[backend]
    if imm_kernels.backends()[backend] is not None:
        pytest.skip(f"{backend} unavailable: {imm_kernels.backends()[backend]}")
    recomputed, refreshed = [], []

    def counting_backward(*args):
        recomputed.append(args)
        return kernels.backward(*args)

    def checking_refresh(grad_loss, expected, *args):
        refreshed.append(torch.equal(grad_loss, expected.expand_as(grad_loss)))
        return kernels.refresh_grad(grad_loss, expected, *args)

    kernels = chosen.mmd
    monkeypatch.setattr(
        chosen,
        "mmd",
        kernels._replace(backward=counting_backward, refresh_grad=kernels.refresh_grad and checking_refresh),
    )
    loss, _ = IMMLoss(Preconditioner(RecordingBackbone()), backend=backend)(torch.randn(16, 6))
    loss.backward()
    assert recomputed == [] and all(refreshed)


@pytest.mark.parametrize("target_fp32, target_dtype", [(True, torch.float32), (False, torch.bfloat16)])
def test_target_fp32_runs_the_target_backbone_without_autocast(target_fp32, target_dtype):
    backbone = RecordingBackbone()
    net = Preconditioner(backbone, mixed_precision="bf16")
    IMMLoss(net, target_fp32=target_fp32, backend="torch")(torch.randn(8, 6))
    assert [call["out_dtype"] for call in backbone.calls] == [torch.bfloat16, target_dtype]


def test_label_dropout_drops_the_same_labels_in_both_passes():
    backbone = RecordingBackbone(label_dim=3)
    loss_fn = IMMLoss(Preconditioner(backbone, label_dim=3), label_dropout=0.5, backend="torch")
    labels = torch.randint(0, 3, (64,))
    loss_fn(torch.randn(64, 6), labels)
    student, target = backbone.calls
    assert torch.equal(student["labels"], target["labels"])
    dropped = student["labels"].sum(1) == 0
    assert 0 < dropped.float().mean() < 1
    assert torch.equal(student["labels"][~dropped], torch.eye(3)[labels[~dropped]])


def test_state_dict_holds_the_net_weights_once():
    net = Preconditioner(RecordingBackbone())
    assert list(IMMLoss(net).state_dict()) == ["net." + name for name in net.state_dict()]


def test_group_size_one_is_the_consistency_style_loss():
    loss_fn = IMMLoss(Preconditioner(RecordingBackbone()), group_size=1, backend="torch")
    loss, stats = loss_fn(torch.randn(5, 6))
    loss.backward()
    assert stats["weighted_mmd"].shape == (5,) and torch.isfinite(loss)


def test_a_wrapper_with_module_attribute_is_called_and_unwrapped():
    class Wrapper(nn.Module):  # stands in for DistributedDataParallel
        def __init__(self, module):
            super().__init__()
            self.module = module
            self.calls = 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.module(*args, **kwargs)

    wrapper = Wrapper(Preconditioner(RecordingBackbone()))
    loss_fn = IMMLoss(wrapper, backend="torch")
    assert loss_fn.precond is wrapper.module
    loss_fn(torch.randn(8, 6))
    assert wrapper.calls == 2


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"group_size": 0}, ValueError, "group_size must be an int >= 1"),
        ({"k": -1}, ValueError, "k must be a non-negative int"),
        ({"eps": 0.5, "T": 0.5}, ValueError, "0 <= eps < T < 1"),
        ({"T": 1.0}, ValueError, r"0 <= eps < T < 1 \(eta\(T\) must be finite\)"),
        ({"label_dropout": 1.5}, ValueError, "label_dropout must be a probability"),
        ({"label_dropout": 0.1}, ValueError, "label_dropout > 0 needs a conditional net"),
        ({"b": "4"}, TypeError, "b must be a number"),
        ({"backend": "fused"}, ValueError, "backend must be one of"),
    ],
)
def test_bad_configs_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        IMMLoss(Preconditioner(RecordingBackbone()), **kwargs)


def test_bad_inputs_raise():
    with pytest.raises(TypeError, match="net must be an imm_kernels.Preconditioner"):
        IMMLoss(RecordingBackbone())
    loss_fn = IMMLoss(Preconditioner(RecordingBackbone()), group_size=4, backend="torch")
    with pytest.raises(ValueError, match=r"batch size 6 is not divisible by group_size=4"):
        loss_fn(torch.randn(6, 6))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        loss_fn(torch.ones(8, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="model is unconditional"):
        loss_fn(torch.randn(8, 6), torch.zeros(8, dtype=torch.long))
