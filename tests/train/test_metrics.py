"""Digits FID: the Fréchet distance against closed forms, its draws and spread against direct recomputations
and sampling theory, the split it is scored on, mode coverage, and the table."""

import math

import numpy as np
import pytest
import torch

import imm_kernels.train.metrics as metrics
from imm_kernels.train import DigitsEvaluator, frechet_distance, frechet_distance_between, gaussian_fit_samples
from imm_kernels.train.data import digits_split_indices, load_dataset
from imm_kernels.train.evaluation import MetricRow, digits_metric_rows, format_metric_table, untrained_net
from imm_kernels.train.metrics import (
    FD_DRAWS,
    covered_classes,
    fd_draws_between,
    floor_fd_draws_within,
    train_digit_classifier,
)
from imm_kernels.train.trainer import TrainConfig, Trainer


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


# Draws of the FD and their spread, on synthetic features


def test_fd_draws_match_a_direct_recomputation():
    gen = np.random.default_rng(0)
    features, reference = gen.normal(size=(60, 3)), gen.normal(size=(41, 3)) + 0.5
    values = fd_draws_between(features, reference, 20, draws=4, seed=7)
    floor = floor_fd_draws_within(reference, 20, draws=4, seed=7)
    # The documented draws: reference permutations from the seed, subsets of the features from seed + 1.
    reference_gen, subset_gen = torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)
    for i in range(4):
        permutation = torch.randperm(41, generator=reference_gen).numpy()
        reference_rows, real_rows = permutation[:20], permutation[20:40]
        subset = torch.randperm(60, generator=subset_gen)[:20].numpy()
        assert values[i] == pytest.approx(frechet_distance_between(features[subset], reference[reference_rows]))
        assert floor[i] == pytest.approx(frechet_distance_between(reference[real_rows], reference[reference_rows]))
    assert values.shape == floor.shape == (4,) and len(set(values.tolist())) == 4
    assert np.array_equal(fd_draws_between(features, reference, 20, draws=4, seed=7), values)


def test_floor_draws_vary_like_independent_samples():
    # Two disjoint draws of one pool must be scored like two independent samples of its distribution:
    # same mean (no shared rows pulling the FD down) and about the same spread.
    gen = np.random.default_rng(1)
    dim, size = 8, 50
    independent = [
        frechet_distance_between(gen.normal(size=(size, dim)), gen.normal(size=(size, dim))) for _ in range(800)
    ]
    pools = [floor_fd_draws_within(gen.normal(size=(2 * size + 1, dim)), size, seed=i) for i in range(30)]
    assert np.mean([p.mean() for p in pools]) == pytest.approx(np.mean(independent), rel=0.05)
    assert np.mean([p.std(ddof=1) for p in pools]) == pytest.approx(np.std(independent), rel=0.2)


def test_fd_draws_approach_the_true_fd_and_spread_shrinks_with_the_sample_size():
    # N(shift, 1.5² I) against N(0, I) in 4-D: FD = |shift|² + 4 (1.5 - 1)² = 2.
    gen = np.random.default_rng(2)
    # Pools 10 times the largest N: its draws are then nearly independent (see fd_draws_between).
    samples = gen.normal(size=(16_000, 4)) * 1.5 + np.array([1.0, 0.0, 0.0, 0.0])
    reference = gen.normal(size=(32_000, 4))
    # 400 draws: their std is then known to about 4%.
    draws = {size: fd_draws_between(samples, reference, size, draws=400) for size in (25, 100, 400, 1600)}
    means = {size: values.mean() for size, values in draws.items()}
    spreads = {size: values.std(ddof=1) for size, values in draws.items()}
    assert means[1600] == pytest.approx(2.0, rel=0.03)
    assert means[25] - 2.0 > means[100] - 2.0 > means[400] - 2.0 > 0  # the upward bias, about O(dim / N)
    # The sampling spread goes as 1/√N: a factor 2 per quadrupling of N.
    for small, large in ((25, 100), (100, 400), (400, 1600)):
        assert 1.7 < spreads[small] / spreads[large] < 2.6, spreads


def test_fd_draws_bad_arguments():
    features = np.zeros((10, 2))
    with pytest.raises(ValueError, match=r"sample_size must be an int in \[2, 5\]"):
        fd_draws_between(features, features, 6)
    with pytest.raises(ValueError, match="sample_size must be"):
        floor_fd_draws_within(features, 1)
    with pytest.raises(ValueError, match="more than the 3 samples"):
        fd_draws_between(features[:3], features, 4)
    with pytest.raises(ValueError, match="draws must be an int >= 2"):
        floor_fd_draws_within(features, 2, draws=1)


def test_covered_classes_counts_half_a_fair_share_exactly():
    assert covered_classes(np.full(10, 7)) == 10
    assert covered_classes(np.array([5, 10, 10, 10, 10, 10, 10, 10, 10, 15])) == 10  # 5 of 100: half of 10
    assert covered_classes(np.array([4, 11, 10, 10, 10, 10, 10, 10, 10, 15])) == 9
    assert covered_classes(np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 30])) == 1


# The digits evaluator


@pytest.fixture(scope="module")
def evaluator() -> DigitsEvaluator:
    return DigitsEvaluator(seed=0)


def test_classifier_accuracy_on_held_out_digits(evaluator):
    assert evaluator.test_accuracy >= 0.98


def test_classifier_training_is_deterministic_and_keeps_the_global_rng(evaluator):
    state = torch.get_rng_state()
    model, accuracy = train_digit_classifier(seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert accuracy == evaluator.test_accuracy
    for name, value in model.state_dict().items():
        assert torch.equal(value, evaluator.classifier.state_dict()[name]), name
    assert DigitsEvaluator(seed=0).classifier is evaluator.classifier  # trained once per process


def _digit_set(x: torch.Tensor) -> set[bytes]:
    return {digit.numpy().tobytes() for digit in x}


def test_held_out_digits_are_neither_the_models_nor_the_classifiers_training_digits(evaluator):
    train = load_dataset("digits", split="train")
    test = load_dataset("digits", split="test")
    classifier_digits, _ = metrics._classifier_digits()
    held_out, models, classifier = _digit_set(evaluator.held_out.x), _digit_set(train.x), _digit_set(classifier_digits)
    assert held_out == _digit_set(test.x) and len(held_out) == len(test) == 355
    assert len(classifier) == 357 and len(models) == len(train) == 1085
    assert not held_out & models and not held_out & classifier and not models & classifier
    # By index: the same three sets, disjoint, covering all 1797 digits.
    indices = {split: set(digits_split_indices(split).tolist()) for split in ("train", "classifier", "test")}
    assert sum(map(len, indices.values())) == 1797 and set.union(*indices.values()) == set(range(1797))
    everything = load_dataset("digits", split="all").x
    assert _digit_set(everything[sorted(indices["classifier"])]) == classifier
    assert _digit_set(everything[sorted(indices["test"])]) == held_out


def test_classifier_trains_on_the_classifier_digits_only(monkeypatch):
    batches = []
    original_shifted = metrics._shifted
    monkeypatch.setattr(
        metrics, "_shifted", lambda batch, gen: (batches.append(batch), original_shifted(batch, gen))[1]
    )
    metrics.train_digit_classifier(seed=0)
    trained_on = _digit_set(torch.cat(batches))
    classifier_digits, _ = metrics._classifier_digits()
    assert trained_on == _digit_set(classifier_digits)


def test_floor_draws_are_disjoint_held_out_digits(evaluator):
    features = evaluator.features(evaluator.held_out.x)
    floor = evaluator.floor_fd_draws(30, draws=3, seed=5)
    gen = torch.Generator().manual_seed(5)
    for value in floor:
        permutation = torch.randperm(len(evaluator.held_out), generator=gen).numpy()
        assert not set(permutation[:30]) & set(permutation[30:60])
        assert value == pytest.approx(
            frechet_distance_between(features[permutation[30:60]], features[permutation[:30]])
        )


def test_real_training_digits_score_like_the_floor(evaluator):
    # The classifier never saw the models' training digits, so they score like new real digits:
    # a generator that reproduces its training set lands on the floor, not below it.
    size = evaluator.max_sample_size
    assert size == 177
    floor = evaluator.floor_fd_draws(size)
    training_digits = evaluator.fd_draws(load_dataset("digits", split="train").x, size)
    assert abs(training_digits.mean() - floor.mean()) < floor.std(ddof=1)
    assert floor.shape == training_digits.shape == (FD_DRAWS,)


def test_reference_is_the_held_out_split(evaluator):
    # Zero up to the eigendecompositions' rounding.
    assert evaluator.fd(load_dataset("digits", split="test").x) == pytest.approx(0.0, abs=1e-3)


def test_fd_orders_real_gaussian_fit_and_noise(evaluator):
    size = evaluator.max_sample_size
    floor = evaluator.floor_fd_draws(size)
    gaussian = evaluator.fd_draws(gaussian_fit_samples(1000, seed=0), size)
    noise = evaluator.fd_draws(0.5 * torch.randn(1000, 1, 8, 8, generator=torch.Generator().manual_seed(0)), size)
    assert floor.mean() + 5 * floor.std(ddof=1) < gaussian.mean()
    assert gaussian.mean() + 5 * gaussian.std(ddof=1) < noise.mean()


def test_class_histogram_counts_the_predicted_classes(evaluator):
    digits = load_dataset("digits", split="test")
    threes_and_sevens = torch.cat([digits.x[digits.labels == 3][:30], digits.x[digits.labels == 7][:10]])
    counts = evaluator.class_histogram(threes_and_sevens)
    assert counts.dtype == np.int64 and counts.shape == (10,) and counts.sum() == 40
    predicted = evaluator.classifier(threes_and_sevens).argmax(1)
    assert counts.tolist() == [int((predicted == digit).sum()) for digit in range(10)]
    assert counts[3] >= 29 and counts[7] >= 9  # the classifier is 99% accurate
    assert covered_classes(counts) == 2
    assert covered_classes(evaluator.class_histogram(digits.x)) == 10


def test_gaussian_fit_samples_match_training_moments():
    samples = gaussian_fit_samples(4000, seed=1)
    assert samples.shape == (4000, 1, 8, 8) and samples.dtype == torch.float32
    assert samples.min() >= -1 and samples.max() <= 1
    assert torch.equal(samples, gaussian_fit_samples(4000, seed=1))
    assert not torch.equal(samples, gaussian_fit_samples(4000, seed=2))
    train_mean = load_dataset("digits", split="train").x.mean(0)
    # Clipping to [-1, 1] raises the mean of the pixels that are mostly background (about 0.1 at most
    # on the 1085 training digits); 4000 draws add about 0.01 of noise.
    assert (samples.mean(0) - train_mean).abs().max() < 0.12


def test_fd_and_confidence_bad_samples(evaluator):
    with pytest.raises(ValueError, match=r"samples must be \(N, 1, 8, 8\)"):
        evaluator.fd(torch.zeros(10, 64))
    with pytest.raises(ValueError, match="N >= 2"):
        evaluator.confidence(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="N >= 2"):
        evaluator.class_histogram(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"sample_size must be an int in \[2, 177\]"):
        evaluator.fd_draws(torch.zeros(500, 1, 8, 8), 178)
    nan_samples = torch.zeros(10, 1, 8, 8)
    nan_samples[3, 0, 2, 2] = math.nan
    assert math.isnan(evaluator.fd(nan_samples))
    assert np.isnan(evaluator.fd_draws(nan_samples, 10, draws=2)).all()


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


# The table


def test_metric_rows_share_one_sample_size_and_the_real_row_is_the_held_out_digits(evaluator):
    trainer = Trainer(TrainConfig(steps=1, width=16, depth=1), None, progress=False)
    net = untrained_net(trainer.config, trainer.data_info)
    rows = digits_metric_rows({"model": net}, evaluator, untrained=net, steps=(1, 2), num_samples=60, draws=5)
    assert [row.name for row in rows] == [
        "real digits (held out)",
        "gaussian fit of the pixels",
        "untrained model, 1 step",
        "model, 1 step",
        "model, 2 steps",
    ]
    assert {(row.sample_size, row.draws) for row in rows} == {(30, 5)}  # half of 60 samples
    real = rows[0]
    assert real.fd == evaluator.floor_fd_draws(30, draws=5).mean()
    assert real.fd_std == pytest.approx(evaluator.floor_fd_draws(30, draws=5).std(ddof=1))
    assert real.class_counts == tuple(evaluator.class_histogram(evaluator.held_out.x).tolist())
    assert sum(real.class_counts) == 355 and real.covered_classes == 10
    assert all(sum(row.class_counts) == 60 for row in rows[1:])
    assert rows[2].fd == rows[3].fd and rows[2].fd_std == rows[3].fd_std > 0  # the same net, draws and noise
    capped = digits_metric_rows({}, evaluator, num_samples=1000, draws=2)
    assert {row.sample_size for row in capped} == {177}
    with pytest.raises(ValueError, match="num_samples must be an int >= 4"):
        digits_metric_rows({}, evaluator, num_samples=3)


def test_format_metric_table():
    rows = [
        MetricRow("real digits (held out)", 24.54, 0.9791, 7.86, 177, 50, (35, 36, 35, 36, 36, 35, 36, 35, 36, 35)),
        MetricRow("trained M=1 (EMA), 8 steps", 1234.5, 0.5, 0.04, 177, 50, (0, 0, 0, 0, 0, 0, 0, 0, 100, 900)),
    ]
    lines = format_metric_table(rows).splitlines()
    assert lines[0].split() == ["samples", "FD", "±", "std", "confidence", "classes", "rarest"]
    assert set(lines[1]) == {"-"} and len(lines[1]) == len(lines[0])
    assert lines[2].split() == ["real", "digits", "(held", "out)", "24.5", "±", "7.9", "0.979", "10/10", "9.9%"]
    assert lines[3].split()[-6:] == ["1234.5", "±", "0.0", "0.500", "2/10", "0.0%"]  # 10% and 90%
    assert "177 samples to as many held-out digits, mean ± std over 50 random draws" in lines[4]
    histogram = lines[lines.index("") + 1 :]
    assert histogram[0].split()[-10:] == [str(digit) for digit in range(10)]
    assert histogram[1].split()[-10:] == ["10"] * 10
    assert histogram[2].split()[-10:] == ["0"] * 8 + ["10", "90"]
    # Columns line up: every value ends where its header does.
    assert lines[2].index("±") == lines[3].index("±") == lines[0].index("±")
    assert all(len(line) <= 100 for line in lines)
