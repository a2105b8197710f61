"""A small "digits FID": Fréchet distance in the feature space of a digit classifier.

Pixel-space Fréchet distance only compares means and covariances of pixels, so a
Gaussian fitted to the training pixels (blurry blobs, no digit shapes) scores close
to zero on it. Features of a classifier trained to recognise digits (here a tiny
CNN on the training split only) separate real digits from such blobs; the
classifier's mean confidence on the samples says whether they look like any digit.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import load_dataset

DIGITS_SHAPE = (1, 8, 8)
FEATURE_DIM = 64
_CLASSIFIER_EPOCHS = 15
_CLASSIFIER_BATCH = 128
_CLASSIFIER_LR = 3e-3


def frechet_distance(mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray, cov_b: np.ndarray) -> float:
    """Fréchet distance between N(mean_a, cov_a) and N(mean_b, cov_b), in float64.

    ‖μ_a − μ_b‖² + tr Σ_a + tr Σ_b − 2 tr (Σ_a Σ_b)^½. The last trace is taken as
    Σ √eig(Σ_a^½ Σ_b Σ_a^½): that matrix is symmetric PSD with the same eigenvalues
    as Σ_a Σ_b, so symmetric eigendecompositions suffice, with no complex parts,
    ridge or warnings when a covariance is singular (dead ReLU features, constant
    border pixels).
    """
    mean_a, mean_b = np.asarray(mean_a, np.float64), np.asarray(mean_b, np.float64)
    cov_a, cov_b = np.atleast_2d(np.asarray(cov_a, np.float64)), np.atleast_2d(np.asarray(cov_b, np.float64))
    if mean_a.shape != mean_b.shape or mean_a.ndim != 1:
        raise ValueError(f"mean_a and mean_b must be vectors of one length, got {mean_a.shape} and {mean_b.shape}")
    dim = mean_a.shape[0]
    for name, cov in (("cov_a", cov_a), ("cov_b", cov_b)):
        if cov.shape != (dim, dim):
            raise ValueError(f"{name} must be ({dim}, {dim}) to match the means, got {cov.shape}")
    if not all(np.isfinite(v).all() for v in (mean_a, mean_b, cov_a, cov_b)):
        return math.nan
    eigenvalues, eigenvectors = np.linalg.eigh(cov_a)
    sqrt_a = (eigenvectors * np.sqrt(eigenvalues.clip(min=0))) @ eigenvectors.T
    product = sqrt_a @ cov_b @ sqrt_a
    trace_covmean = np.sqrt(np.linalg.eigvalsh((product + product.T) / 2).clip(min=0)).sum()
    diff = mean_a - mean_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_covmean)


def frechet_distance_between(samples_a: Tensor | np.ndarray, samples_b: Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted (mean, full covariance) to two (N, D) sample sets."""
    stats = []
    for name, samples in (("samples_a", samples_a), ("samples_b", samples_b)):
        if isinstance(samples, Tensor):
            samples = samples.detach().cpu().double().numpy()
        array = np.asarray(samples, np.float64)
        if array.ndim != 2 or array.shape[0] < 2:
            raise ValueError(f"{name} must be (N, D) with N >= 2, got shape {array.shape}")
        stats.append((array.mean(0), np.cov(array, rowvar=False)))
    return frechet_distance(*stats[0], *stats[1])


class DigitClassifier(nn.Module):
    """Tiny CNN for (N, 1, 8, 8) digits in [-1, 1]; features() is its FEATURE_DIM-wide penultimate layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: Tensor) -> Tensor:
        h = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def train_digit_classifier(seed: int = 0) -> tuple[DigitClassifier, float]:
    """Trains the classifier on the digits train split; returns it (eval mode) and its test-split accuracy.

    Deterministic for a seed whatever the caller's thread count (training runs on one thread,
    whose reduction order is fixed); the global RNG and thread count are left as they were.
    """
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, accuracy = _train_classifier(train, test, seed)
    finally:
        torch.set_num_threads(threads)
    return model, accuracy


def _train_classifier(train, test, seed: int) -> tuple[DigitClassifier, float]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier()
        optimizer = torch.optim.AdamW(model.parameters(), lr=_CLASSIFIER_LR, weight_decay=1e-4)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(_CLASSIFIER_EPOCHS):
            for batch in torch.randperm(len(train), generator=gen).split(_CLASSIFIER_BATCH):
                loss = F.cross_entropy(model(train.x[batch]), train.labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        accuracy = (model(test.x).argmax(1) == test.labels).double().mean().item()
    return model, accuracy


_CLASSIFIERS: dict[int, tuple[DigitClassifier, float]] = {}


def _digits_samples(samples: Tensor) -> Tensor:
    """Checks the shape and clips to [-1, 1], as saving the samples as images would."""
    if not isinstance(samples, Tensor) or tuple(samples.shape[1:]) != DIGITS_SHAPE or samples.shape[0] < 2:
        shape = tuple(samples.shape) if isinstance(samples, Tensor) else type(samples).__name__
        raise ValueError(f"samples must be (N, 1, 8, 8) digits with N >= 2, got {shape}")
    return samples.detach().float().cpu().clamp(-1, 1)


class DigitsEvaluator:
    """Scores (N, 1, 8, 8) digit samples in [-1, 1] against the held-out digits.

    The classifier is trained once per seed and process (a few seconds) and shared
    by every evaluator with that seed.
    """

    def __init__(self, seed: int = 0) -> None:
        if seed not in _CLASSIFIERS:
            _CLASSIFIERS[seed] = train_digit_classifier(seed)
        self.classifier, self.test_accuracy = _CLASSIFIERS[seed]
        held_out_features = self.features(load_dataset("digits", split="test").x)
        self._reference = (held_out_features.mean(0), np.cov(held_out_features, rowvar=False))

    def features(self, samples: Tensor) -> np.ndarray:
        """(N, FEATURE_DIM) float64 penultimate-layer features of the clipped samples."""
        with torch.no_grad():
            return self.classifier.features(_digits_samples(samples)).double().numpy()

    def fd(self, samples: Tensor) -> float:
        """Feature-space Fréchet distance from the held-out digits (lower is better; NaN samples give NaN)."""
        features = self.features(samples)
        return frechet_distance(features.mean(0), np.cov(features, rowvar=False), *self._reference)

    def confidence(self, samples: Tensor) -> float:
        """The classifier's mean max-softmax probability on the samples (digit-like samples score near 1)."""
        with torch.no_grad():
            return self.classifier(_digits_samples(samples)).softmax(1).amax(1).double().mean().item()

    def reference_rows(self, num_samples: int, seed: int = 0) -> dict[str, tuple[float, float]]:
        """(fd, confidence) of the baselines a model's row should be read against, each on num_samples samples.

        "real (train split)": training digits, the FD of real digits at this sample size (about the
        metric's resolution);
        "gaussian fit": gaussian_fit_samples, matching pixel means and covariances;
        "noise N(0, 0.5²)": the IMM prior, what an untrained model's samples look like.
        """
        train = load_dataset("digits", split="train").x
        if not isinstance(num_samples, int) or not 2 <= num_samples <= len(train):
            raise ValueError(
                f"num_samples must be an int in [2, {len(train)}] (the train split's size), got {num_samples!r}"
            )
        gen = torch.Generator().manual_seed(seed)
        rows = {
            "real (train split)": train[torch.randperm(len(train), generator=gen)[:num_samples]],
            "gaussian fit": gaussian_fit_samples(num_samples, seed),
            "noise N(0, 0.5²)": 0.5 * torch.randn(num_samples, *DIGITS_SHAPE, generator=gen),
        }
        return {name: (self.fd(samples), self.confidence(samples)) for name, samples in rows.items()}


def gaussian_fit_samples(num_samples: int, seed: int = 0) -> Tensor:
    """(num_samples, 1, 8, 8) draws from N(mean, covariance) of the training digits' pixels, clipped to [-1, 1].

    Before clipping these match the pixels' mean and covariance exactly, so
    pixel-space FD barely tells these blobs from digits; the feature-space FD must.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    pixels = load_dataset("digits", split="train").x.flatten(1).double()
    mean = pixels.mean(0)
    # Border pixels are constant, so the covariance is singular: sample through its
    # eigendecomposition instead of a Cholesky factor.
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(pixels.T))
    factor = eigenvectors * eigenvalues.clamp_min(0).sqrt()
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(num_samples, pixels.shape[1], generator=gen, dtype=torch.float64)
    return (mean + noise @ factor.T).clamp(-1, 1).float().reshape(num_samples, *DIGITS_SHAPE)
