"""The shared argument checks: each names its argument, and a bad value gets the same message from the model,
the loss, the training config and the command line."""

import math

import numpy as np
import pytest
from torch import nn

from imm_kernels import IMMLoss, Preconditioner
from imm_kernels.train.trainer import TrainConfig
from imm_kernels.validation import (
    check_choice,
    check_finite,
    check_nonnegative_int,
    check_number,
    check_positive,
    check_positive_int,
    check_probability,
    check_rate,
    check_time_range,
)

from helpers import cli_fails


def raised(error: type[Exception], check, *args, **kwargs) -> str:
    with pytest.raises(error) as info:
        check(*args, **kwargs)
    return str(info.value)


# Each validator on its own: the value it returns, and its message naming the argument.


def test_check_choice():
    assert check_choice("kind", "edm", ("uniform", "edm")) == "edm"
    assert check_choice("mixed_precision", None, (None, "bf16")) is None
    assert raised(ValueError, check_choice, "kind", "cosine", ("uniform", "edm")) == (
        "kind must be one of ('uniform', 'edm'), got 'cosine'"
    )
    assert raised(ValueError, check_choice, "schedule", None, ("fm",)) == "schedule must be one of ('fm',), got None"


def test_check_number_and_check_positive():
    assert check_number("a", np.float32(2.5)) == 2.5 and type(check_number("a", 3)) is float
    assert check_number("a", -math.inf) == -math.inf
    assert raised(TypeError, check_number, "b", "4") == "b must be a number, got str"
    assert raised(TypeError, check_number, "b", True) == "b must be a number, got bool"
    assert check_positive("rho", 7) == 7.0 and check_positive("time_scale", math.inf) == math.inf
    assert raised(ValueError, check_positive, "sigma_data", 0) == "sigma_data must be positive, got 0.0"
    assert raised(ValueError, check_positive, "rho", math.nan) == "rho must be positive, got nan"
    assert raised(TypeError, check_positive, "time_scale", "1000") == "time_scale must be a number, got str"


def test_check_finite():
    assert check_finite("a", -1) == -1.0
    assert check_finite("lr", 1e-3, positive=True) == 1e-3
    assert check_finite("grad_clip", 0.0, nonnegative=True) == 0.0
    assert raised(ValueError, check_finite, "lr", math.inf) == "lr must be a finite number, got inf"
    assert raised(ValueError, check_finite, "lr", "0.1") == "lr must be a finite number, got '0.1'"
    assert raised(ValueError, check_finite, "lr", False) == "lr must be a finite number, got False"
    assert raised(ValueError, check_finite, "lr", 0, positive=True) == "lr must be positive, got 0"
    assert raised(ValueError, check_finite, "weight_decay", -0.5, nonnegative=True) == (
        "weight_decay must be >= 0, got -0.5"
    )


def test_check_ints():
    assert check_positive_int("steps", np.int64(3)) == 3 and type(check_positive_int("steps", np.int64(3))) is int
    assert check_nonnegative_int("k", 0) == 0
    for bad in (0, 2.0, True, "2"):
        assert raised(ValueError, check_positive_int, "batch", bad) == f"batch must be an int >= 1, got {bad!r}"
    for bad in (-1, 0.0, False, None):
        assert raised(ValueError, check_nonnegative_int, "k", bad) == f"k must be a non-negative int, got {bad!r}"


def test_check_probability_and_check_rate():
    assert check_probability("label_dropout", 1) == 1.0 and check_probability("label_dropout", 0) == 0.0
    assert check_rate("ema_decay", 0) == 0.0 and check_rate("dropout", 0.5) == 0.5
    for bad in (1.5, -0.1, math.nan, True, "0.1"):
        assert raised(ValueError, check_probability, "label_dropout", bad) == (
            f"label_dropout must be a probability in [0, 1], got {bad!r}"
        )
    for bad in (1.0, -0.1, math.nan, False):
        assert raised(ValueError, check_rate, "ema_decay", bad) == f"ema_decay must be in [0, 1), got {bad!r}"


def test_check_time_range():
    assert check_time_range(0, 1) == (0.0, 1.0)
    assert check_time_range(0.002, 0.994, finite_eta=True) == (0.002, 0.994)
    assert raised(ValueError, check_time_range, 0.5, 0.5) == (
        "the times must satisfy 0 <= eps < T <= 1, got eps=0.5, T=0.5"
    )
    assert raised(ValueError, check_time_range, -0.1, 0.5) == (
        "the times must satisfy 0 <= eps < T <= 1, got eps=-0.1, T=0.5"
    )
    assert raised(ValueError, check_time_range, 0.0, 1.0, finite_eta=True) == (
        "the times must satisfy 0 <= eps < T < 1 (eta(T) must be finite), got eps=0.0, T=1.0"
    )
    assert raised(TypeError, check_time_range, 0.0, "1") == "T must be a number, got str"
    assert raised(TypeError, check_time_range, None, 0.5) == "eps must be a number, got NoneType"


# One bad value through every layer that takes it: the same message.


class IdentityBackbone(nn.Module):
    def forward(self, x, c_noise_t, c_noise_s, class_labels):
        return x


LAYERS = {
    "Preconditioner": lambda **kwargs: Preconditioner(IdentityBackbone(), **kwargs),
    "IMMLoss": lambda **kwargs: IMMLoss(Preconditioner(IdentityBackbone()), **kwargs),
    "TrainConfig": lambda **kwargs: TrainConfig(**kwargs),
}

SAME_MESSAGE_CASES = [
    # (arguments, the layers that take them, `imm-kernels train` flags or None for argparse choices, message)
    (
        dict(schedule="cosine"),
        ("Preconditioner", "TrainConfig"),
        None,
        "schedule must be one of ('fm', 'vp_cosine'), got 'cosine'",
    ),
    (
        dict(param="edm"),
        ("Preconditioner", "TrainConfig"),
        None,
        "param must be one of ('euler_fm', 'simple_edm', 'identity'), got 'edm'",
    ),
    (
        dict(time_embed="sum"),
        ("Preconditioner", "TrainConfig"),
        None,
        "time_embed must be one of ('identity', 'stride'), got 'sum'",
    ),
    (
        dict(schedule="vp_cosine"),
        ("Preconditioner", "TrainConfig"),
        ["--schedule", "vp_cosine"],
        "param='euler_fm' needs schedule='fm', got schedule='vp_cosine'",
    ),
    (
        dict(sigma_data=0.0),
        ("Preconditioner", "TrainConfig"),
        ["--sigma-data", "0"],
        "sigma_data must be positive, got 0.0",
    ),
    (
        dict(eps=0.5, T=0.5),
        ("IMMLoss", "TrainConfig"),
        ["--eps", "0.5", "--T", "0.5"],
        "the times must satisfy 0 <= eps < T < 1 (eta(T) must be finite), got eps=0.5, T=0.5",
    ),
    (
        dict(T=1.0),
        ("IMMLoss", "TrainConfig"),
        ["--T", "1"],
        "the times must satisfy 0 <= eps < T < 1 (eta(T) must be finite), got eps=0.0, T=1.0",
    ),
    (dict(group_size=0), ("IMMLoss", "TrainConfig"), ["--group-size", "0"], "group_size must be an int >= 1, got 0"),
    (dict(k=-1), ("IMMLoss", "TrainConfig"), ["--k", "-1"], "k must be a non-negative int, got -1"),
    (
        dict(label_dropout=1.5),
        ("IMMLoss", "TrainConfig"),
        ["--label-dropout", "1.5"],
        "label_dropout must be a probability in [0, 1], got 1.5",
    ),
    (
        dict(backend="fused"),
        ("IMMLoss", "TrainConfig"),
        None,
        "backend must be one of ('auto', 'triton', 'native', 'cuda', 'torch'), got 'fused'",
    ),
]


@pytest.mark.parametrize(
    "arguments, layers, flags, message",
    SAME_MESSAGE_CASES,
    ids=[",".join(f"{name}={value}" for name, value in case[0].items()) for case in SAME_MESSAGE_CASES],
)
def test_a_bad_value_gets_one_message_from_every_layer(tmp_path, capsys, arguments, layers, flags, message):
    for layer in layers:
        assert raised(ValueError, LAYERS[layer], **arguments) == message, layer
    if flags is not None:
        err = cli_fails(capsys, "train", "--out", str(tmp_path / "run"), *flags)
        assert err == f"imm-kernels train: error: {message}\n"
        assert not (tmp_path / "run").exists()


def test_the_model_and_the_time_grid_share_the_time_check():
    from imm_kernels.sampling import time_grid

    message = "the times must satisfy 0 <= eps < T <= 1, got eps=0.3, T=0.3"
    assert raised(ValueError, Preconditioner, IdentityBackbone(), T=0.3, eps=0.3) == message
    assert raised(ValueError, time_grid, "uniform", 2, 0.3, 0.3) == message


@pytest.mark.parametrize("field", ["label_dropout", "dropout", "ema_decay"])
def test_train_config_takes_no_bool_for_a_rate(field):
    # Every number check treats a bool as no number; the rate and probability checks were the exceptions.
    with pytest.raises(ValueError, match=f"^{field} must be"):
        TrainConfig(**{field: False})
