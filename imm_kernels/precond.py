"""The IMM model f_{s,t}(x_t) around any backbone G(x, c_noise_t, c_noise_s, class_labels) (docs/design.md §1.2).

    f_{s,t}(x_t) = c_skip(s,t)·x_t + c_out(s,t)·G(c_in(t)·x_t, scale·t, scale·s or scale·(t - s), labels)

The coefficients are computed in float64, the skip/out combination in float32 (float64
for float64 x); only the backbone runs under autocast. Every parameterisation gives
f_{s,s}(x) = x exactly.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from . import schedules
from .ops.reference import compute_dtype
from .schedules import Time, float64_eval
from .validation import (
    check_choice,
    check_nonnegative_int,
    check_number,
    check_positive,
    check_positive_int,
    check_time_range,
)

__all__ = ["Preconditioner", "PARAMS", "TIME_EMBEDS", "MIXED_PRECISIONS", "check_parameterisation"]

PARAMS = ("euler_fm", "simple_edm", "identity")
TIME_EMBEDS = ("identity", "stride")
MIXED_PRECISIONS = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_parameterisation(schedule: str, param: str, time_embed: str) -> schedules.Schedule:
    """The schedule called `schedule`, once `param` and `time_embed` are known to be valid with it."""
    chosen = schedules.get(schedule)
    check_choice("param", param, PARAMS)
    if param == "euler_fm" and chosen is not schedules.fm:
        raise ValueError(f"param='euler_fm' needs schedule='fm', got schedule={schedule!r}")
    check_choice("time_embed", time_embed, TIME_EMBEDS)
    return chosen


class Preconditioner(nn.Module):
    """f_{s,t}(x) for a backbone called as backbone(x_in, c_noise_t, c_noise_s, class_labels).

    Args:
        backbone: the network G; c_noise_* are (B,) tensors, class_labels a (B, label_dim)
            one-hot float tensor or None when label_dim == 0.
        schedule: "fm" or "vp_cosine" (see `imm_kernels.schedules`).
        param: "euler_fm" (fm only), "simple_edm" or "identity" (DDIM of an x-prediction).
        time_embed: the backbone's second time, "identity" (s) or "stride" (t - s).
        sigma_data: the data standard deviation sigma_d.
        T, eps: the largest and smallest times, 0 <= eps < T <= 1 (IMMLoss also needs T < 1).
        label_dim: number of classes; 0 for an unconditional model.
        time_scale: the factor applied to the times given to the backbone.
        mixed_precision: None, "bf16" or "fp16": autocast dtype of the backbone.
        sample_shape: the per-sample shape (e.g. (C, R, R)) when known; samplers and the CLI
            read it (`imm_kernels.load_official` and `load_model` set it).

    Calling conventions: besides floats and (B,) tensors, times may be given as the official
    IMM code does, e.g. (B, 1, 1, 1) or (1,) tensors; labels as (B,) class indices, (B, label_dim)
    float or integer rows (soft rows are passed on as they are), or one (1, label_dim) row for
    the whole batch.
    """

    def __init__(
        self,
        backbone: nn.Module,
        schedule: str = "fm",
        param: str = "euler_fm",
        time_embed: str = "identity",
        sigma_data: float = 0.5,
        T: float = 0.994,
        eps: float = 0.0,
        label_dim: int = 0,
        time_scale: float = 1000.0,
        mixed_precision: str | None = None,
        sample_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if not callable(backbone):
            raise TypeError(f"backbone must be callable (an nn.Module), got {type(backbone).__name__}")
        self.schedule = check_parameterisation(schedule, param, time_embed)
        self.backbone = backbone
        self.param = param
        self.time_embed = time_embed
        self.sigma_data = check_positive("sigma_data", sigma_data)
        self.eps, self.T = check_time_range(eps, T)
        self.label_dim = check_nonnegative_int("label_dim", label_dim)
        self.time_scale = check_positive("time_scale", time_scale)
        self.mixed_precision = check_choice("mixed_precision", mixed_precision, tuple(MIXED_PRECISIONS))
        if sample_shape is not None:
            sample_shape = tuple(check_positive_int("sample_shape entries", n) for n in sample_shape)
        self.sample_shape = sample_shape

    # Coefficients: float64 inside, returned in the dtype of t (see schedules.float64_eval).

    def c_in(self, t: Time) -> Time:
        """1 / (sigma_d·sqrt(alpha_t² + sigma_t²))."""
        return float64_eval(self._c_in, t)

    def c_skip(self, s: Time, t: Time) -> Time:
        return float64_eval(lambda t64, s64: self._skip_out(s64, t64)[0], t, s)

    def c_out(self, s: Time, t: Time) -> Time:
        return float64_eval(lambda t64, s64: self._skip_out(s64, t64)[1], t, s)

    def kernel_bandwidth(self, s: Time, t: Time) -> Time:
        """The MMD bandwidth w~(s,t) = 1/|c_out(s,t)| (docs/design.md §1.3 step 4).

        Where s == t it is 1 instead of infinite: both MMD sides are then x_t, so MMD² is
        0 for any bandwidth, and an infinite one would only turn its zero gradient into NaN.
        """
        return float64_eval(lambda t64, s64: self._kernel_bandwidth(s64, t64), t, s)

    def _c_in(self, t: Tensor) -> Tensor:
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        return 1 / (self.sigma_data * torch.sqrt(alpha**2 + sigma**2))

    def _skip_out(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(c_skip, c_out) for float64 s and t."""
        sched = self.schedule
        alpha_s, sigma_s, alpha_t, sigma_t = sched.alpha(s), sched.sigma(s), sched.alpha(t), sched.sigma(t)
        if self.param == "euler_fm":
            c_out = -(t - s) * self.sigma_data
            return torch.ones_like(c_out), c_out
        if self.param == "simple_edm":
            norm_sq = alpha_t**2 + sigma_t**2
            c_skip = (alpha_t * alpha_s + sigma_t * sigma_s) / norm_sq
            c_out = -self.sigma_data * (alpha_s * sigma_t - alpha_t * sigma_s) / torch.sqrt(norm_sq)
            return c_skip, c_out
        # identity: f = (alpha_s - alpha_t·sigma_s/sigma_t)·G + (sigma_s/sigma_t)·x_t.
        # At s == t the ratio is 1 exactly, also at t = s = 0 where the formula is 0/0.
        same = s == t
        ratio = torch.where(same, 1.0, sigma_s / torch.where(same, 1.0, sigma_t))
        return ratio, alpha_s - alpha_t * ratio

    def _kernel_bandwidth(self, s: Tensor, t: Tensor) -> Tensor:
        sched = self.schedule
        alpha_s, sigma_s, alpha_t, sigma_t = sched.alpha(s), sched.sigma(s), sched.alpha(t), sched.sigma(t)
        if self.param == "euler_fm":
            bandwidth = 1 / ((t - s) * self.sigma_data)
        elif self.param == "simple_edm":
            bandwidth = torch.sqrt(alpha_t**2 + sigma_t**2) / (
                self.sigma_data * torch.abs(alpha_s * sigma_t - alpha_t * sigma_s)
            )
        else:
            bandwidth = torch.abs(sigma_t / (alpha_s * sigma_t - sigma_s * alpha_t))
        return torch.where(s == t, 1.0, bandwidth)

    # Labels and times.

    def as_one_hot(self, class_labels: Tensor | None, batch_size: int, device: torch.device) -> Tensor | None:
        """class_labels as (B, label_dim) float32 rows; None for an unconditional model.

        Accepts (B,) integer class indices, (B, label_dim) float rows (one-hot, all-zero for the
        null label, or soft rows, passed on unchanged), (B, label_dim) integer rows (as floats),
        or a single (1, label_dim) row for the whole batch. None on a conditional model is the
        null label (all zeros).
        """
        if self.label_dim == 0:
            if class_labels is not None:
                raise ValueError("class_labels were given but the model is unconditional (label_dim=0)")
            return None
        if class_labels is None:
            return torch.zeros(batch_size, self.label_dim, device=device)
        if not isinstance(class_labels, Tensor):
            raise TypeError(f"class_labels must be a tensor or None, got {type(class_labels).__name__}")
        if class_labels.dtype == torch.bool or class_labels.is_complex():
            raise TypeError(f"class_labels must be integer or floating-point, got {class_labels.dtype}")
        if class_labels.dim() == 2:
            if class_labels.shape[1] != self.label_dim or class_labels.shape[0] not in (1, batch_size):
                raise ValueError(
                    f"class_labels rows must have shape ({batch_size}, {self.label_dim}) or (1, {self.label_dim}), "
                    f"got {tuple(class_labels.shape)}"
                )
            return class_labels.to(device=device, dtype=torch.float32).expand(batch_size, -1)
        if class_labels.is_floating_point() or class_labels.shape != (batch_size,):
            raise ValueError(
                f"class_labels must be ({batch_size},) integer class indices or rows of shape "
                f"({batch_size}, {self.label_dim}), got {tuple(class_labels.shape)} of {class_labels.dtype}"
            )
        return nn.functional.one_hot(class_labels.to(device).long(), self.label_dim).float()

    @staticmethod
    def _per_sample(value: Time, name: str, batch_size: int, like: Tensor) -> Tensor:
        """A float or a tensor holding one value or one per sample ((), (1,), (B,), (B, 1, 1, 1), ...) as a
        (B,) float64 tensor on like's device."""
        if not isinstance(value, Tensor):
            return torch.full((batch_size,), check_number(name, value), dtype=torch.float64, device=like.device)
        if value.dim() > 0 and (value.shape[0] not in (1, batch_size) or any(n != 1 for n in value.shape[1:])):
            raise ValueError(
                f"{name} must be a number or a tensor of shape (), (1,), ({batch_size},) or ({batch_size}, 1, ...), "
                f"got {tuple(value.shape)}"
            )
        return value.to(device=like.device, dtype=torch.float64).reshape(-1).expand(batch_size)

    def _check_x(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1:
            raise TypeError("x must be a floating-point tensor of shape (B, *feature)")

    # The model.

    def _run_backbone(self, x: Tensor, t: Tensor, s: Tensor, labels: Tensor | None, force_fp32: bool) -> Tensor:
        """G(c_in(t)·x, scale·t, scale·s or scale·(t - s), labels) in the compute dtype of x."""
        cdtype = compute_dtype(x.dtype)
        x_in = self._c_in(t).to(cdtype).view(-1, *[1] * (x.dim() - 1)) * x.to(cdtype)
        second_time = t - s if self.time_embed == "stride" else s
        c_noise_t = (self.time_scale * t).to(cdtype)
        c_noise_s = (self.time_scale * second_time).to(cdtype)
        if force_fp32:  # also overrides an autocast region the caller may have opened
            precision = torch.autocast(x.device.type, enabled=False)
        elif self.mixed_precision is not None:
            precision = torch.autocast(x.device.type, dtype=MIXED_PRECISIONS[self.mixed_precision])
        else:
            precision = contextlib.nullcontext()
        with precision:
            out = self.backbone(x_in, c_noise_t, c_noise_s, labels)
        if out.shape != x.shape:
            raise ValueError(f"the backbone returned shape {tuple(out.shape)} for an input of shape {tuple(x.shape)}")
        return out.to(cdtype)

    def _skip_out_combine(self, x: Tensor, t: Tensor, s: Tensor, backbone_out: Tensor) -> Tensor:
        c_skip, c_out = self._skip_out(s, t)
        shape = (-1, *[1] * (x.dim() - 1))
        cdtype = backbone_out.dtype
        return c_skip.to(cdtype).view(shape) * x.to(cdtype) + c_out.to(cdtype).view(shape) * backbone_out

    def forward(
        self, x: Tensor, t: Time, s: Time, class_labels: Tensor | None = None, *, force_fp32: bool = False
    ) -> Tensor:
        """f_{s,t}(x) for x at time t, mapped to time s <= t.

        Args:
            x: (B, *feature) at time t.
            t, s: floats, 0-dim or (B,) tensors (per sample), with s <= t.
            class_labels: (B,) class indices or (B, label_dim) one-hot rows; None is the
                null label on a conditional model.
            force_fp32: run the backbone in float32 even if autocast is configured or active.

        Returns:
            (B, *feature) in float32 (float64 for float64 x).
        """
        self._check_x(x)
        batch_size = x.shape[0]
        t = self._per_sample(t, "t", batch_size, x)
        s = self._per_sample(s, "s", batch_size, x)
        labels = self.as_one_hot(class_labels, batch_size, x.device)
        return self._skip_out_combine(x, t, s, self._run_backbone(x, t, s, labels, force_fp32))

    def guided(
        self,
        x: Tensor,
        t: Time,
        s: Time,
        class_labels: Tensor | None,
        cfg_scale: float | Tensor,
        *,
        force_fp32: bool = False,
    ) -> Tensor:
        """f_{s,t}(x) with classifier-free guidance: G = G_u + w·(G_c - G_u) before c_skip/c_out.

        The conditional and null-label inputs run as one batch of 2B through the backbone.
        cfg_scale (w) is a float, or a 0-dim or (B,) tensor; w = 1 is the conditional model.
        """
        if self.label_dim == 0:
            raise ValueError("guided() needs a conditional model (label_dim > 0)")
        self._check_x(x)
        batch_size = x.shape[0]
        t = self._per_sample(t, "t", batch_size, x)
        s = self._per_sample(s, "s", batch_size, x)
        labels = self.as_one_hot(class_labels, batch_size, x.device)
        both = self._run_backbone(
            torch.cat([x, x]),
            torch.cat([t, t]),
            torch.cat([s, s]),
            torch.cat([labels, torch.zeros_like(labels)]),
            force_fp32,
        )
        conditional, unconditional = both.chunk(2)
        scale = self._per_sample(cfg_scale, "cfg_scale", batch_size, x).to(both.dtype).view(-1, *[1] * (x.dim() - 1))
        return self._skip_out_combine(x, t, s, unconditional + scale * (conditional - unconditional))

    def cfg_forward(
        self,
        x: Tensor,
        t: Time,
        s: Time,
        class_labels: Tensor | None = None,
        force_fp32: bool = False,
        cfg_scale: float | Tensor | None = None,
    ) -> Tensor:
        """The official IMM code's name and argument order: `guided` when cfg_scale is given, else `forward`."""
        if cfg_scale is None:
            return self(x, t, s, class_labels, force_fp32=force_fp32)
        return self.guided(x, t, s, class_labels, cfg_scale, force_fp32=force_fp32)
