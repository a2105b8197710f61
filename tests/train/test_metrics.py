"""Digits FID: the Fréchet distance against closed forms, and the evaluator against its reference rows."""

import math

import numpy as np
import pytest
import torch

from imm_kernels.train import DigitsEvaluator, frechet_distance, frechet_distance_between, gaussian_fit_samples
from imm_kernels.train.data import load_dataset
from imm_kernels.train.metrics import train_digit_classifier


def test_frechet_distance_of_non_commuting_2d_gaussians_matches_closed_form():
    mean_a, mean_b = np.array([1.0, -2.0]), np.array([0.5, 0.5])
    cov_a = np.array([[2.0, 0.6], [0.6, 1.0]])
    cov_b = np.array([[0.5, -0.3], [-0.3, 3.0]])
    # For 2×2 SPD A, B: A·B has positive eigenvalues, so tr √(AB) = √(tr AB + 2 √(det A · det B)).
    tr_ab = 2.0 * 0.5 + 0.6 * -0.3 + 0.6 * -0.3 + 1.0 * 3.0
    det_a, det_b = 2.0 * 1.0 - 0.6**2, 0.5 * 3.0 - 0.3**2
    tr_sqrt = math.sqrt(tr_ab + 2 * math.sqrt(det_a * det_b))
    expected = (0.5**2 + 2.5**2) + (2.0 + 1.0) + (0.5 + 3.0) - 2 * tr_sqrt
    assert frechet_distance(mean_a, cov_a, mean_b, cov_b) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(mean_b, cov_b, mean_a, cov_a) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_of_diagonal_and_singular_gaussians():
    var_a, var_b = np.array([1.0, 4.0, 0.25, 9.0, 0.0]), np.array([4.0, 1.0, 0.25, 1.0, 0.0])
    mean_a, mean_b = np.zeros(5), np.array([0.0, 1.0, 0.0, 0.0, 2.0])
    # Diagonal covariances: Σ (√a − √b)² per coordinate, plus the squared mean shift.
    expected = 1.0 + 1.0 + 0.0 + 4.0 + 0.0 + (1.0 + 4.0)
    assert frechet_distance(mean_a, np.diag(var_a), mean_b, np.diag(var_b)) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(mean_a, np.diag(var_a), mean_a, np.diag(var_a)) == pytest.approx(0.0, abs=1e-12)


def test_frechet_distance_between_samples_approaches_the_closed_form():
    gen = np.random.default_rng(0)
    a = gen.normal(size=(200_000, 2)) * np.array([1.0, 2.0])
    b = gen.normal(size=(200_000, 2)) * np.array([3.0, 1.0]) + np.array([1.0, 0.0])
    expected = 1.0 + (1.0 - 3.0) ** 2 + (2.0 - 1.0) ** 2
    assert frechet_distance_between(torch.from_numpy(a), b) == pytest.approx(expected, rel=0.02)


def test_frechet_distance_bad_inputs():
    with pytest.raises(ValueError, match="cov_b must be"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))
    with pytest.raises(ValueError, match="mean_a and mean_b"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="samples_b must be"):
        frechet_distance_between(np.zeros((4, 2)), np.zeros((1, 2)))
    assert math.isnan(frechet_distance(np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2)))


@pytest.fixture(scope="module")
def evaluator() -> DigitsEvaluator:
    return DigitsEvaluator(seed=0)


def test_classifier_accuracy_on_held_out_digits(evaluator):
    assert evaluator.test_accuracy >= 0.95


def test_classifier_training_is_deterministic_and_keeps_the_global_rng(evaluator):
    state = torch.get_rng_state()
    model, accuracy = train_digit_classifier(seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert accuracy == evaluator.test_accuracy
    for name, value in model.state_dict().items():
        assert torch.equal(value, evaluator.classifier.state_dict()[name]), name
    assert DigitsEvaluator(seed=0).classifier is evaluator.classifier  # trained once per process


def test_reference_is_the_held_out_split(evaluator):
    # Zero up to the eigendecompositions' rounding (the real-data floor is ~20).
    assert evaluator.fd(load_dataset("digits", split="test").x) == pytest.approx(0.0, abs=1e-3)


def test_fd_orders_real_gaussian_fit_and_noise(evaluator):
    rows = evaluator.reference_rows(1000, seed=0)
    real, gaussian, noise = rows["real (train split)"], rows["gaussian fit"], rows["noise N(0, 0.5²)"]
    assert 0 < 2 * real[0] < gaussian[0] and 2 * gaussian[0] < noise[0]
    assert real[1] > 0.95 and real[1] > gaussian[1] and real[1] > noise[1]


def test_gaussian_fit_samples_match_training_moments():
    samples = gaussian_fit_samples(4000, seed=1)
    assert samples.shape == (4000, 1, 8, 8) and samples.dtype == torch.float32
    assert samples.min() >= -1 and samples.max() <= 1
    assert torch.equal(samples, gaussian_fit_samples(4000, seed=1))
    assert not torch.equal(samples, gaussian_fit_samples(4000, seed=2))
    train_mean = load_dataset("digits", split="train").x.mean(0)
    assert (samples.mean(0) - train_mean).abs().max() < 0.1


def test_fd_and_confidence_bad_samples(evaluator):
    with pytest.raises(ValueError, match=r"samples must be \(N, 1, 8, 8\)"):
        evaluator.fd(torch.zeros(10, 64))
    with pytest.raises(ValueError, match="N >= 2"):
        evaluator.confidence(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="num_samples"):
        evaluator.reference_rows(5000)
    nan_samples = torch.zeros(10, 1, 8, 8)
    nan_samples[3, 0, 2, 2] = math.nan
    assert math.isnan(evaluator.fd(nan_samples))


def test_classifier_does_not_depend_on_the_thread_count(evaluator):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2 if threads == 1 else 1)
        model, _ = train_digit_classifier(seed=0)
        assert torch.get_num_threads() == (2 if threads == 1 else 1)
    finally:
        torch.set_num_threads(threads)
    for name, value in model.state_dict().items():
        assert torch.equal(value, evaluator.classifier.state_dict()[name]), name
