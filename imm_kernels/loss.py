"""IMMLoss: one Inductive Moment Matching training objective, the steps of docs/design.md §1.3."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .ops.backends import BACKEND_NAMES
from .ops.mmd import mmd_loss
from .precond import Preconditioner
from .schedules import Time, float64_eval
from .validation import (
    check_choice,
    check_nonnegative_int,
    check_number,
    check_positive_int,
    check_probability,
    check_time_range,
)

__all__ = ["IMMLoss", "IMMDraws"]


@dataclass(frozen=True)
class IMMDraws:
    """The random draws of one IMMLoss call: times (s, r, t) per group, the label-dropout keep mask
    per sample (None without label dropout) and the standard normal noise (B, *feature).

    Drawn once for a whole step and sliced by groups (`groups`), they let gradient accumulation
    compute exactly the loss of the whole batch, micro-batch by micro-batch.
    """

    s: Tensor
    r: Tensor
    t: Tensor
    keep: Tensor | None
    noise: Tensor

    @property
    def num_groups(self) -> int:
        return self.t.shape[0]

    def groups(self, start: int, stop: int) -> IMMDraws:
        """The draws of groups start..stop-1 (their particles' rows of keep and noise)."""
        group_size = self.noise.shape[0] // self.num_groups
        rows = slice(start * group_size, stop * group_size)
        keep = None if self.keep is None else self.keep[rows]
        return IMMDraws(self.s[start:stop], self.r[start:stop], self.t[start:stop], keep, self.noise[rows])


def _unwrap(net: nn.Module) -> Preconditioner:
    """The Preconditioner inside DDP/FSDP (`.module`) or torch.compile (`._orig_mod`) wrappers."""
    inner = net
    while not isinstance(inner, Preconditioner):
        wrapped = getattr(inner, "module", None) or getattr(inner, "_orig_mod", None)
        if not isinstance(wrapped, nn.Module):
            raise TypeError(f"net must be an imm_kernels.Preconditioner (or wrap one), got {type(net).__name__}")
        inner = wrapped
    return inner


def _no_phase(name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


class IMMLoss(nn.Module):
    """The IMM loss mean_g w(t_g)·MMD²_g between f_{s,t}(x_t) and the stop-gradient f_{s,r}(x_r).

    Args:
        net: the Preconditioner f (or a DDP / torch.compile wrapper of one); it is called
            for both passes, so the wrapper syncs the gradients.
        group_size: M, particles per group sharing (s, r, t); 1 is the consistency-model-style baseline.
        k: r is one 1/2^k step of the eta range below t.
        a, b: time-weight exponent and log-SNR shift (docs/design.md §1.3 step 6).
        eps, T: the time range; None takes the net's. 0 <= eps < T < 1.
        label_dropout: probability of replacing a sample's label by the null label (CFG training).
        target_fp32: run the target pass's backbone without autocast.
        backend: the `mmd_loss` backend.
    """

    def __init__(
        self,
        net: nn.Module,
        group_size: int = 4,
        k: int = 12,
        a: float = 1,
        b: float = 4,
        eps: float | None = None,
        T: float | None = None,
        label_dropout: float = 0.0,
        target_fp32: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.net = net
        _unwrap(net)  # fails early with a clear error
        self.group_size = check_positive_int("group_size", group_size)
        self.k = check_nonnegative_int("k", k)
        self.a = check_number("a", a)
        self.b = check_number("b", b)
        self.eps, self.T = check_time_range(
            self.precond.eps if eps is None else eps, self.precond.T if T is None else T, finite_eta=True
        )
        self.label_dropout = check_probability("label_dropout", label_dropout)
        if self.label_dropout > 0 and self.precond.label_dim == 0:
            raise ValueError("label_dropout > 0 needs a conditional net (label_dim > 0)")
        self.target_fp32 = bool(target_fp32)
        self.backend = check_choice("backend", backend, BACKEND_NAMES)
        # phase(name) -> context around the parts of a call, "forward" (both passes) and "loss" (the
        # MMD): the trainer times them and names them for profilers (NVTX). A no-op by default.
        self.phase = _no_phase

    @property
    def precond(self) -> Preconditioner:
        """The Preconditioner inside `net` (a property, so state_dict holds its weights once)."""
        return _unwrap(self.net)

    def sample_times(
        self, num_groups: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(s, r, t), each (G,) float32, with eps <= s <= r <= t <= T (step 1).

        t ~ U(eps, T), s ~ U(eps, t), and r = max(s, eta_inv(clamp(eta_t - (eta_max - eta_min)/2^k,
        eta_min, eta_max))), drawn and computed in float64. Draws, in order: G uniforms for t,
        then G for s.
        """

        def uniform() -> Tensor:
            return torch.rand(num_groups, dtype=torch.float64, device=device, generator=generator)

        t = self.eps + (self.T - self.eps) * uniform()
        s = self.eps + (t - self.eps) * uniform()
        schedule = self.precond.schedule
        eta_min, eta_max = schedule.eta(self.eps), schedule.eta(self.T)
        eta_r = (schedule.eta(t) - (eta_max - eta_min) / 2**self.k).clamp(eta_min, eta_max)
        r = torch.minimum(torch.maximum(s, schedule.eta_inv(eta_r)), t)
        return s.float(), r.float(), t.float()

    def kernel_bandwidth(self, s: Time, t: Time) -> Time:
        """w~(s,t) of the net's parameterisation (docs/design.md §1.3 step 4)."""
        return self.precond.kernel_bandwidth(s, t)

    def time_weight(self, t: Time) -> Time:
        """w(t) = ½·sigmoid(b - lambda_t)·(-dlambda/dt)·alpha_t^a/(alpha_t² + sigma_t²) (step 6)."""
        return float64_eval(self._time_weight, t)

    def _time_weight(self, t: Tensor) -> Tensor:
        schedule = self.precond.schedule
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        weight = (
            0.5
            * torch.sigmoid(self.b - schedule.logsnr(t))
            * -schedule.dlogsnr_dt(t)
            * alpha**self.a
            / (alpha**2 + sigma**2)
        )
        # The limit at t = 0 is 0 (sigmoid(b - lambda) ~ e^b·eta² outruns -dlambda/dt ~ 2/t);
        # the formula itself reads 0·inf there.
        return torch.where(t > 0, weight, 0.0)

    def draw(self, x: Tensor) -> IMMDraws:
        """The random draws of a call on a batch shaped like x, in the order `forward` draws them."""
        batch_size = x.shape[0]
        s, r, t = self.sample_times(batch_size // self.group_size, x.device)
        keep = torch.rand(batch_size, device=x.device) >= self.label_dropout if self.label_dropout > 0 else None
        noise_dtype = x.dtype if x.dtype == torch.float64 else torch.float32
        return IMMDraws(s, r, t, keep, torch.randn(x.shape, dtype=noise_dtype, device=x.device))

    def forward(
        self,
        x: Tensor,
        class_labels: Tensor | None = None,
        *,
        draws: IMMDraws | None = None,
        groups_in_step: int | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss for a batch of data x (B = G·group_size, consecutive rows form a group).

        Random draws, in order: `sample_times`, the label-dropout uniforms (B, only when
        label_dropout > 0), the noise (standard normal, x's shape), then whatever the net draws
        (dropout), replayed for the target pass. `draws` gives them instead (see `IMMDraws`).
        groups_in_step: the number of groups the loss is averaged over (default: this batch's G);
            the micro-batches of an accumulated step pass the step's, so that their losses add up
            to the whole batch's.

        Returns:
            (loss, stats): the scalar loss, and detached (G,) tensors "s", "r", "t",
            "time_weight" and "weighted_mmd" (w(t_g)·MMD²_g; the loss is their mean).
        """
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[0] == 0:
            raise TypeError("x must be a floating-point tensor of shape (B, *feature) with B >= 1")
        batch_size = x.shape[0]
        if batch_size % self.group_size != 0:
            raise ValueError(f"the batch size {batch_size} is not divisible by group_size={self.group_size}")
        num_groups = batch_size // self.group_size
        net = self.precond
        if draws is None:
            draws = self.draw(x)
        elif draws.num_groups != num_groups or draws.noise.shape != x.shape:
            raise ValueError(
                f"draws are for {draws.num_groups} groups of noise {tuple(draws.noise.shape)}, "
                f"the batch has {num_groups} groups of {tuple(x.shape)}"
            )
        groups_in_step = num_groups if groups_in_step is None else check_positive_int("groups_in_step", groups_in_step)

        s, r, t = draws.s, draws.r, draws.t
        labels = net.as_one_hot(class_labels, batch_size, x.device)
        if draws.keep is not None:
            labels = labels * draws.keep[:, None]

        # Coefficients from the float32 times in float64, rounded once to the data's compute dtype.
        s64, r64, t64 = s.double(), r.double(), t.double()
        schedule = net.schedule
        x = x.float() if x.dtype != torch.float64 else x
        noise = draws.noise.to(x.dtype) * net.sigma_data
        x_t = self._per_particle(schedule.alpha(t64), x) * x + self._per_particle(schedule.sigma(t64), x) * noise
        x_r = self._per_particle(schedule.alpha(r64), x) * x + self._per_particle(schedule.sigma(r64), x) * noise
        s_p, r_p, t_p = (v.repeat_interleave(self.group_size) for v in (s, r, t))

        # The student pass runs inside fork_rng, which restores the RNG state on exit, so the
        # target pass draws the same dropout masks and leaves the RNG advanced as usual.
        with self.phase("forward"):
            with torch.random.fork_rng(**self._rng_devices(x.device)):
                student = self.net(x_t, t_p, s_p, labels)
            with torch.no_grad():
                target = self.net(x_r, r_p, s_p, labels, force_fp32=self.target_fp32)

        weight = self.time_weight(t64)
        # The loss is the mean of w(t_g) MMD²_g, summed as terms weighted w(t_g) / G: each term then
        # receives a gradient of 1 from .backward(), the one for which the fused kernels compute dx
        # in the forward (a .mean() would send 1/G, and that dx would be computed again).
        with self.phase("loss"):
            terms = mmd_loss(
                student,
                target,
                self.group_size,
                self.kernel_bandwidth(s64, t64),
                weight / groups_in_step,
                reduction="none",
                backend=self.backend,
            )
        stats = {
            "s": s,
            "r": r,
            "t": t,
            "time_weight": weight.to(terms.dtype),
            "weighted_mmd": terms.detach() * groups_in_step,
        }
        return terms.sum(), stats

    def _per_particle(self, per_group: Tensor, x: Tensor) -> Tensor:
        """(G,) -> (B, 1, ..., 1) in x's dtype: each group's value for each of its particles."""
        return per_group.to(x.dtype).repeat_interleave(self.group_size).view(-1, *[1] * (x.dim() - 1))

    @staticmethod
    def _rng_devices(device: torch.device) -> dict:
        """fork_rng arguments covering the CPU generator and, for an accelerator, x's device."""
        if device.type == "cpu":
            return {"devices": []}
        index = device.index if device.index is not None else torch.get_device_module(device.type).current_device()
        return {"devices": [index], "device_type": device.type}
