"""Few-step IMM samplers (docs/design.md §1.4): time grids, pushforward and restart.

The grids are computed on the host in float64. The samplers read the grid once
(before the loop) as Python floats, so the loop itself never waits for the GPU:
no `.item()`, no host-side branch on device values. The noise is an input, so
the same draws give the same samples whatever the step count.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from numbers import Real

import torch
from torch import Tensor, nn

from .. import schedules
from ..validation import check_choice, check_positive, check_positive_int, check_time_range

__all__ = ["time_grid", "pushforward", "restart", "GRID_KINDS", "SAMPLERS", "STATE_DTYPES"]

GRID_KINDS = ("uniform", "edm", "eta")
SAMPLERS = ("pushforward", "restart")
STATE_DTYPES = (torch.float32, torch.float64)
EDM_RHO = 7.0


# Time grids.


def time_grid(
    kind: str,
    steps: int,
    T: float,
    eps: float,
    mid_eta: Sequence[float] | None = None,
    schedule: str = "fm",
    *,
    rho: float = EDM_RHO,
) -> Tensor:
    """The N + 1 decreasing times t_0 = T > t_1 > … > t_N = eps of an N-step sampler, float64 on the CPU.

    kind:
        "uniform": linspace(T, eps, N + 1).
        "edm": uniform in eta^(1/rho) between eta(T) and eta(eps) (rho = 7), mapped back
            through eta_inv; needs a finite eta(T) (T < 1 for both schedules).
        "eta": explicit intermediate eta values `mid_eta` (N - 1 of them, decreasing, strictly
            between eta(eps) and eta(T)), e.g. CIFAR-10's 2-step grid mid_eta=[1.4].
    The endpoints are exactly T and eps.
    """
    check_choice("kind", kind, GRID_KINDS)
    steps = check_positive_int("steps", steps)
    eps, T = check_time_range(eps, T)
    sched = schedules.get(schedule)
    if kind != "eta" and mid_eta is not None:
        raise ValueError(f"mid_eta is only used with kind='eta', got kind={kind!r}")

    if kind == "uniform":
        return torch.linspace(T, eps, steps + 1, dtype=torch.float64)

    eta_max, eta_min = sched.eta(T), sched.eta(eps)
    if not math.isfinite(eta_max):
        raise ValueError(f"kind={kind!r} needs a finite eta(T); T={T} gives eta(T)={eta_max} for schedule {schedule!r}")
    if kind == "edm":
        rho = check_positive("rho", rho)
        fraction = torch.arange(1, steps, dtype=torch.float64) / steps
        mid = (eta_max ** (1 / rho) + fraction * (eta_min ** (1 / rho) - eta_max ** (1 / rho))) ** rho
    else:
        if mid_eta is None:
            raise ValueError("kind='eta' needs mid_eta, the N - 1 intermediate eta values")
        mid = torch.as_tensor(mid_eta, dtype=torch.float64).flatten()
        if mid.numel() != steps - 1:
            raise ValueError(f"mid_eta must hold steps - 1 = {steps - 1} eta values, got {mid.numel()}")
        if mid.numel() and not (torch.all(mid[1:] < mid[:-1]) and mid[0] < eta_max and mid[-1] > eta_min):
            raise ValueError(
                f"mid_eta must be strictly decreasing and strictly between eta(eps)={eta_min} and "
                f"eta(T)={eta_max}, got {mid.tolist()}"
            )
    times = sched.eta_inv(mid)
    return torch.cat([torch.tensor([T], dtype=torch.float64), times, torch.tensor([eps], dtype=torch.float64)])


def check_time_steps(t_steps, name: str = "t_steps") -> list[float]:
    """t_steps (a 1-D tensor or a sequence) as a list of Python floats, checked: >= 2 decreasing times in [0, 1].

    Reading a device tensor here waits for the device once, before any sampling loop starts.
    """
    if isinstance(t_steps, Tensor):
        if t_steps.dim() != 1 or t_steps.dtype == torch.bool or t_steps.dtype.is_complex:
            raise ValueError(
                f"{name} must be a 1-D tensor or sequence of times, got shape {tuple(t_steps.shape)} of {t_steps.dtype}"
            )
        times = t_steps.detach().to(torch.float64).tolist()
    else:
        try:
            times = [float(t) for t in t_steps]
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a 1-D tensor or a sequence of numbers, got {t_steps!r}") from None
    if len(times) < 2:
        raise ValueError(f"{name} must hold at least 2 times (steps >= 1), got {len(times)}")
    if not all(math.isfinite(t) and 0 <= t <= 1 for t in times):
        raise ValueError(f"{name} must be finite times in [0, 1], got {times}")
    if not all(a > b for a, b in zip(times, times[1:])):
        raise ValueError(f"{name} must be strictly decreasing (from noise to data), got {times}")
    return times


# Checks shared with GraphedSampler.


def check_dtype(dtype) -> torch.dtype:
    if dtype not in STATE_DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    return dtype


def label_dim_of(net) -> int:
    return int(getattr(net, "label_dim", 0) or 0)


def check_guidance(net, class_labels, cfg_scale) -> None:
    """Labels only for a conditional net; guidance only with labels (all-null labels would make it a no-op)."""
    if class_labels is not None and label_dim_of(net) == 0:
        raise ValueError("class_labels were given but the model is unconditional (label_dim=0)")
    if cfg_scale is None:
        return
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (Real, Tensor)):
        raise TypeError(f"cfg_scale must be None, a number or a tensor, got {type(cfg_scale).__name__}")
    if label_dim_of(net) == 0:
        raise ValueError("cfg_scale needs a conditional model (label_dim > 0); use cfg_scale=None")
    if class_labels is None:
        raise ValueError("cfg_scale needs class_labels (guidance towards the null label alone does nothing)")


def one_hot_labels(net, class_labels, batch_size: int, device) -> Tensor | None:
    """The labels as the net's (B, label_dim) float rows, converted once before the loop."""
    if class_labels is None or not hasattr(net, "as_one_hot"):
        return class_labels
    return net.as_one_hot(class_labels, batch_size, device)


def check_noise(noise, name: str = "noise") -> None:
    if not isinstance(noise, Tensor) or not noise.is_floating_point() or noise.dim() < 1 or noise.shape[0] < 1:
        raise TypeError(f"{name} must be a floating-point tensor of shape (B, *feature) with B >= 1")


@contextlib.contextmanager
def eval_mode(net):
    """The net in eval mode (no dropout) for the duration, its mode restored afterwards."""
    was_training = getattr(net, "training", False)
    if isinstance(net, nn.Module):
        net.eval()
    try:
        yield
    finally:
        if isinstance(net, nn.Module):
            net.train(was_training)


# One step of the model: f_{s,t}(x) with or without guidance. t and s are Python floats
# (eager) or precomputed (B,) float64 device tensors (GraphedSampler); same values, same kernels.


def model_step(net, x: Tensor, t, s, labels, cfg_scale) -> Tensor:
    if cfg_scale is None:
        return net(x, t, s, labels)
    return net.guided(x, t, s, labels, cfg_scale)


def pushforward_loop(net, x: Tensor, step_times, labels, cfg_scale) -> Tensor:
    """x ← f_{s,t}(x) for each (t, s) in step_times."""
    for t_cur, t_next in step_times:
        x = model_step(net, x, t_cur, t_next, labels, cfg_scale).to(x.dtype)
    return x


def restart_loop(net, x: Tensor, step_times, renoise, fresh_noise: Tensor, labels, cfg_scale) -> Tensor:
    """x ← f_{eps, t_i}(x) for each (t_i, eps) in step_times; between steps x ← alpha·x + (sigma·sigma_d)·z_i.

    renoise: (alpha_{t_{i+1}}, sigma_{t_{i+1}}·sigma_d) Python floats for the N - 1 re-noisings;
    fresh_noise: (N - 1, B, *feature) standard normal draws z_i.
    """
    for i, (t_cur, t_end) in enumerate(step_times):
        x = model_step(net, x, t_cur, t_end, labels, cfg_scale).to(x.dtype)
        if i < len(renoise):
            alpha, noise_scale = renoise[i]
            x = alpha * x + noise_scale * fresh_noise[i]
    return x


def restart_coefficients(net, times: list[float]) -> list[tuple[float, float]]:
    """(alpha_t, sigma_t·sigma_d) at t_1 … t_{N-1}, in float64 on the host."""
    sched = net.schedule
    return [(sched.alpha(t), sched.sigma(t) * net.sigma_data) for t in times[1:-1]]


def check_restart_noise(restart_noise, steps: int, x: Tensor) -> Tensor | None:
    """restart_noise as an (N - 1, B, *feature) tensor on x's device in x's dtype, or None."""
    if restart_noise is None:
        return None
    expected = (steps - 1, *x.shape)
    if isinstance(restart_noise, (list, tuple)):
        if not all(isinstance(z, Tensor) for z in restart_noise):
            raise TypeError("restart_noise must be a tensor or a sequence of tensors")
        restart_noise = torch.stack(list(restart_noise)) if restart_noise else x.new_empty(expected)
    if not isinstance(restart_noise, Tensor) or not restart_noise.is_floating_point():
        raise TypeError("restart_noise must be a floating-point tensor of shape (steps - 1, B, *feature)")
    if tuple(restart_noise.shape) != expected:
        raise ValueError(
            f"restart_noise must have shape (steps - 1, B, *feature) = {expected}, got {tuple(restart_noise.shape)}"
        )
    return restart_noise.to(device=x.device, dtype=x.dtype)


# The public samplers.


@torch.no_grad()
def pushforward(
    net,
    noise: Tensor,
    t_steps,
    class_labels: Tensor | None = None,
    cfg_scale: float | Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Pushforward sampling: x ← f_{t_{i+1}, t_i}(x) over the grid, from x = noise at t_0.

    Args:
        net: an `imm_kernels.Preconditioner` (any module with its forward/guided signature);
            it runs in eval mode, its mode is restored afterwards.
        noise: (B, *feature) draws of the prior N(0, sigma_d² I) at t_0.
        t_steps: the N + 1 decreasing times (e.g. from `time_grid`).
        class_labels: (B,) class indices or (B, label_dim) one-hot rows for a conditional net;
            None is the null label.
        cfg_scale: None for no guidance; w for classifier-free guidance G_u + w·(G_c - G_u)
            (conditional net and class_labels needed).
        dtype: the state's dtype between steps, float32 or float64 (float64 feeds the backbone
            float64 inputs: give it float64 weights).

    Returns:
        (B, *feature) samples at t_N, in `dtype`.
    """
    check_noise(noise)
    times = check_time_steps(t_steps)
    check_guidance(net, class_labels, cfg_scale)
    x = noise.to(check_dtype(dtype))
    labels = one_hot_labels(net, class_labels, x.shape[0], x.device)
    with eval_mode(net):
        return pushforward_loop(net, x, list(zip(times[:-1], times[1:])), labels, cfg_scale)


@torch.no_grad()
def restart(
    net,
    noise: Tensor,
    t_steps,
    class_labels: Tensor | None = None,
    cfg_scale: float | Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    restart_noise: Tensor | Sequence[Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Restart sampling: x ← f_{eps, t_i}(x), then re-noise to t_{i+1}, except after the last step.

    eps is the grid's last time t_N. The re-noising is x ← alpha_{t_{i+1}}·x + sigma_{t_{i+1}}·sigma_d·z_i
    with fresh standard normal z_i: given as restart_noise, (N - 1, B, *feature) or a sequence of
    N - 1 tensors (B, *feature), or else drawn all at once before the loop from `generator`
    (on the noise's device). Other arguments as `pushforward`.
    """
    check_noise(noise)
    times = check_time_steps(t_steps)
    check_guidance(net, class_labels, cfg_scale)
    x = noise.to(check_dtype(dtype))
    steps = len(times) - 1
    fresh = check_restart_noise(restart_noise, steps, x)
    if fresh is None:
        fresh = torch.randn((steps - 1, *x.shape), generator=generator, device=x.device, dtype=x.dtype)
    labels = one_hot_labels(net, class_labels, x.shape[0], x.device)
    step_times = [(t, times[-1]) for t in times[:-1]]
    with eval_mode(net):
        return restart_loop(net, x, step_times, restart_coefficients(net, times), fresh, labels, cfg_scale)
