"""Argument checks shared by the model, the loss, the training config, the samplers and the CLI.

Each check raises with a message that starts with the argument's name as the caller spells
it, so a bad value gives the same message whichever layer meets it first. A number is a
Python or NumPy real (int or float), never a bool.

Two families of number checks: `check_number` and `check_positive` raise TypeError for a
value that is not a number (the Python API's arguments); `check_finite` raises ValueError
for anything but a finite number (TrainConfig, whose values come from a file or the
command line).
"""

from __future__ import annotations

import math
from numbers import Integral, Real

__all__ = [
    "check_choice",
    "check_number",
    "check_positive",
    "check_finite",
    "check_positive_int",
    "check_nonnegative_int",
    "check_probability",
    "check_rate",
    "check_time_range",
]


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_choice(name: str, value, choices: tuple):
    """value, if it is one of `choices`; ValueError otherwise."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_number(name: str, value) -> float:
    """value as a float; TypeError if it is not a number."""
    if not _is_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def check_positive(name: str, value) -> float:
    """value as a float > 0 (infinity included); TypeError if not a number, ValueError if not positive."""
    value = check_number(name, value)
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def check_finite(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    """value as a float, finite (and > 0 or >= 0 where asked); ValueError otherwise."""
    if not _is_number(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


def check_positive_int(name: str, value) -> int:
    """value, an int >= 1; ValueError otherwise."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def check_nonnegative_int(name: str, value) -> int:
    """value, an int >= 0; ValueError otherwise."""
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def check_probability(name: str, value) -> float:
    """value as a float in [0, 1]; ValueError otherwise."""
    if not (_is_number(value) and 0 <= value <= 1):
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def check_rate(name: str, value) -> float:
    """value as a float in [0, 1), as a dropout rate or an EMA decay must be; ValueError otherwise."""
    if not (_is_number(value) and 0 <= value < 1):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def check_time_range(eps, T, *, finite_eta: bool = False) -> tuple[float, float]:
    """(eps, T) as floats with 0 <= eps < T <= 1, or T < 1 where finite_eta (eta(1) is infinite).

    TypeError if either is not a number, ValueError if they are out of order or range.
    """
    T, eps = check_number("T", T), check_number("eps", eps)
    if finite_eta and not 0 <= eps < T < 1:
        raise ValueError(f"the times must satisfy 0 <= eps < T < 1 (eta(T) must be finite), got eps={eps}, T={T}")
    if not 0 <= eps < T <= 1:
        raise ValueError(f"the times must satisfy 0 <= eps < T <= 1, got eps={eps}, T={T}")
    return eps, T
