"""Noise schedules x_t = alpha(t)·x + sigma(t)·eps, t in [0, 1] (0 = data, 1 = noise).

Every function computes in float64 and returns the input's dtype: a tensor in gives a
tensor of the same dtype, shape and device (integer tensors give the default float
dtype); a Python number in gives a Python float. Gradients flow through tensor inputs.

    >>> from imm_kernels import schedules
    >>> schedules.get("fm").eta(0.5)
    1.0
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

from .validation import check_choice

__all__ = ["Schedule", "FlowMatching", "VPCosine", "fm", "vp_cosine", "get", "SCHEDULE_NAMES", "float64_eval"]

Time = float | Tensor


def float64_eval(fn: Callable[..., Tensor], *values: Time) -> Time:
    """fn applied to float64 versions of `values`, returned in the dtype of the inputs.

    The output dtype and device follow the first tensor argument; Python numbers are
    filled on that device (no host-to-device copy). With no tensor argument the
    result is a Python float.
    """
    reference = next((v for v in values if isinstance(v, Tensor)), None)
    if reference is None:
        return float(fn(*(torch.tensor(float(v), dtype=torch.float64) for v in values)))
    out_dtype = reference.dtype if reference.is_floating_point() else torch.get_default_dtype()
    args = [
        v.to(torch.float64) if isinstance(v, Tensor) else torch.full_like(reference, v, dtype=torch.float64)
        for v in values
    ]
    return fn(*args).to(out_dtype)


class Schedule(ABC):
    """alpha, sigma, log-SNR lambda = log(alpha²/sigma²), its t-derivative, and eta = sigma/alpha.

    Subclasses give the float64 formulas (the `_`-methods); the public methods add the
    dtype handling of `float64_eval`.
    """

    name: str

    def alpha(self, t: Time) -> Time:
        return float64_eval(self._alpha, t)

    def sigma(self, t: Time) -> Time:
        return float64_eval(self._sigma, t)

    def logsnr(self, t: Time) -> Time:
        return float64_eval(self._logsnr, t)

    def dlogsnr_dt(self, t: Time) -> Time:
        return float64_eval(self._dlogsnr_dt, t)

    def eta(self, t: Time) -> Time:
        return float64_eval(self._eta, t)

    def eta_inv(self, eta: Time) -> Time:
        """The time t with eta(t) = eta (eta >= 0)."""
        return float64_eval(self._eta_inv, eta)

    @abstractmethod
    def _alpha(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def _sigma(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def _logsnr(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def _dlogsnr_dt(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def _eta(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def _eta_inv(self, eta: Tensor) -> Tensor: ...

    def __repr__(self) -> str:
        return f"schedules.{self.name}"


class FlowMatching(Schedule):
    """alpha = 1 - t, sigma = t (rectified flow / flow matching)."""

    name = "fm"

    def _alpha(self, t: Tensor) -> Tensor:
        return 1 - t

    def _sigma(self, t: Tensor) -> Tensor:
        return t

    def _logsnr(self, t: Tensor) -> Tensor:
        # 2·log((1 - t)/t), with log1p for accuracy at small t.
        return 2 * (torch.log1p(-t) - torch.log(t))

    def _dlogsnr_dt(self, t: Tensor) -> Tensor:
        return -2 / (t * (1 - t))

    def _eta(self, t: Tensor) -> Tensor:
        return t / (1 - t)

    def _eta_inv(self, eta: Tensor) -> Tensor:
        return eta / (1 + eta)


class VPCosine(Schedule):
    """alpha = cos(pi·t/2), sigma = sin(pi·t/2) (variance preserving, cosine)."""

    name = "vp_cosine"

    def _alpha(self, t: Tensor) -> Tensor:
        return torch.cos(0.5 * math.pi * t)

    def _sigma(self, t: Tensor) -> Tensor:
        return torch.sin(0.5 * math.pi * t)

    def _logsnr(self, t: Tensor) -> Tensor:
        return -2 * torch.log(torch.tan(0.5 * math.pi * t))

    def _dlogsnr_dt(self, t: Tensor) -> Tensor:
        half_angle = 0.5 * math.pi * t
        return -math.pi / (torch.sin(half_angle) * torch.cos(half_angle))

    def _eta(self, t: Tensor) -> Tensor:
        return torch.tan(0.5 * math.pi * t)

    def _eta_inv(self, eta: Tensor) -> Tensor:
        return (2 / math.pi) * torch.atan(eta)


fm = FlowMatching()
vp_cosine = VPCosine()

_SCHEDULES: dict[str, Schedule] = {s.name: s for s in (fm, vp_cosine)}
SCHEDULE_NAMES = tuple(_SCHEDULES)


def get(name: str) -> Schedule:
    """The schedule called `name` ("fm" or "vp_cosine")."""
    return _SCHEDULES[check_choice("schedule", name, SCHEDULE_NAMES)]
