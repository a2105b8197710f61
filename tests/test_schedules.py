"""imm_kernels.schedules against float64 hand computations with the math module (docs/design.md §1)."""

import math

import pytest
import torch

from imm_kernels import schedules

TIMES = [1e-4, 0.05, 0.3, 0.5, 0.77, 0.994]


def fm_reference(t: float) -> dict[str, float]:
    return {
        "alpha": 1 - t,
        "sigma": t,
        "logsnr": 2 * math.log((1 - t) / t),
        "dlogsnr_dt": -2 / (t * (1 - t)),
        "eta": t / (1 - t),
    }


def vp_cosine_reference(t: float) -> dict[str, float]:
    angle = math.pi * t / 2
    return {
        "alpha": math.cos(angle),
        "sigma": math.sin(angle),
        "logsnr": -2 * math.log(math.tan(angle)),
        "dlogsnr_dt": -math.pi / (math.sin(angle) * math.cos(angle)),
        "eta": math.tan(angle),
    }


REFERENCES = {"fm": fm_reference, "vp_cosine": vp_cosine_reference}


@pytest.mark.parametrize("name", ["fm", "vp_cosine"])
@pytest.mark.parametrize("t", TIMES)
def test_formulas_match_hand_computation(name, t):
    schedule = schedules.get(name)
    for quantity, expected in REFERENCES[name](t).items():
        got = getattr(schedule, quantity)(t)
        assert isinstance(got, float)
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-15), quantity


@pytest.mark.parametrize("name", ["fm", "vp_cosine"])
def test_logsnr_is_log_of_alpha_over_sigma_squared(name):
    schedule = schedules.get(name)
    for t in TIMES:
        expected = math.log(schedule.alpha(t) ** 2 / schedule.sigma(t) ** 2)
        assert schedule.logsnr(t) == pytest.approx(expected, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("name", ["fm", "vp_cosine"])
def test_dlogsnr_dt_matches_central_differences(name):
    schedule = schedules.get(name)
    t = torch.tensor(TIMES[1:], dtype=torch.float64)
    h = 1e-6
    finite_difference = (schedule.logsnr(t + h) - schedule.logsnr(t - h)) / (2 * h)
    torch.testing.assert_close(schedule.dlogsnr_dt(t), finite_difference, rtol=1e-7, atol=0)


@pytest.mark.parametrize("name", ["fm", "vp_cosine"])
def test_eta_inv_inverts_eta(name):
    schedule = schedules.get(name)
    t = torch.linspace(0, 0.999, 1001, dtype=torch.float64)
    torch.testing.assert_close(schedule.eta_inv(schedule.eta(t)), t, rtol=1e-12, atol=1e-15)
    assert schedule.eta(0.0) == 0.0 and schedule.eta_inv(0.0) == 0.0


@pytest.mark.parametrize("name", ["fm", "vp_cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_tensor_output_keeps_dtype_shape_and_is_rounded_from_float64(name, dtype):
    schedule = schedules.get(name)
    t = torch.rand(3, 5, dtype=torch.float64).clamp(0.01, 0.99).to(dtype)
    for quantity in ("alpha", "sigma", "logsnr", "dlogsnr_dt", "eta"):
        got = getattr(schedule, quantity)(t)
        assert got.dtype == dtype and got.shape == t.shape
        expected = getattr(schedule, quantity)(t.double()).to(dtype)
        assert torch.equal(got, expected), quantity


def test_integer_tensor_gives_default_float_dtype():
    assert schedules.fm.alpha(torch.tensor([0, 1])).dtype == torch.get_default_dtype()


def test_gradients_flow_through_tensor_inputs():
    t = torch.tensor([0.25, 0.5], requires_grad=True)
    schedules.vp_cosine.sigma(t).sum().backward()
    torch.testing.assert_close(t.grad, (math.pi / 2) * torch.cos(math.pi * t.detach() / 2))


def test_get_returns_the_module_level_schedules():
    assert schedules.get("fm") is schedules.fm
    assert schedules.get("vp_cosine") is schedules.vp_cosine


@pytest.mark.parametrize("bad", ["cosine", "FM", None])
def test_get_unknown_name_raises(bad):
    with pytest.raises(ValueError, match=r"schedule must be one of \('fm', 'vp_cosine'\)"):
        schedules.get(bad)
