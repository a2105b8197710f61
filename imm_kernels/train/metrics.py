"""A small "digits FID": Fréchet distance in the feature space of a digit classifier.

Pixel-space Fréchet distance only compares means and covariances of pixels, so a
Gaussian fitted to the training pixels (blurry blobs, no digit shapes) scores close
to zero on it. Features of a classifier trained to recognise digits (a tiny CNN)
separate real digits from such blobs; the classifier's mean confidence on the
samples says whether they look like any digit, and the histogram of its predicted
classes whether every digit is generated (mode coverage).

Three disjoint sets of sklearn's digits (`digits_split_indices`), each with the
whole set's class proportions: models train on "train", the classifier on
"classifier", and "test" (held out from both) is what samples are scored against.
So a generator that reproduces its training digits is not scored in features fitted
to them, and the real digits a table shows as its floor are new to both. (Most of
what once put real training digits above trained models was class proportions: a
split of every fifth digit in sklearn's order, which cycles through the classes,
held out 2.5 times as many 3s as 1s.)

The FD of N samples is biased upwards by about O(dim / N) and varies with the draw,
so a value means little alone. The table (imm_kernels.train.evaluation) therefore
scores every row with the same N against the same random draws of N held-out
digits, repeated: `floor_fd_draws` gives what real digits score (two disjoint draws
of held-out digits), `fd_draws` what the samples score, and the spread over the
draws is the resolution at which two rows differ.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import digits_split_indices, load_dataset

DIGITS_SHAPE = (1, 8, 8)
NUM_DIGIT_CLASSES = 10
FEATURE_DIM = 64
# Draws per FD in fd_draws / floor_fd_draws: enough that the std over them is known to about 10%.
FD_DRAWS = 50
# 357 training digits, so many small batches; each batch is shifted by up to one pixel (see _shifted).
_CLASSIFIER_EPOCHS = 40
_CLASSIFIER_BATCH = 64
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
        stats.append(_gaussian_stats(array))
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
    """Trains the classifier on the "classifier" digits; returns it (eval mode) and its accuracy on the
    held-out ("test") digits, a sanity check that its features know digits (about 0.99).

    Deterministic for a seed whatever the caller's thread count (training runs on one thread,
    whose reduction order is fixed); the global RNG and thread count are left as they were.
    """
    train, test = _classifier_digits(), load_dataset("digits", split="test")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, accuracy = _train_classifier(train, test, seed)
    finally:
        torch.set_num_threads(threads)
    return model, accuracy


def _classifier_digits() -> tuple[Tensor, Tensor]:
    """(digits, labels) of the "classifier" split: in neither the models' training digits nor the held-out ones."""
    everything = load_dataset("digits", split="all")
    rows = digits_split_indices("classifier", everything.labels)
    return everything.x[rows], everything.labels[rows]


def _shifted(batch: Tensor, gen: torch.Generator) -> Tensor:
    """The batch moved by up to one pixel each way (one random shift for all), background filling in.

    With 357 training digits the CNN otherwise fits their exact pixels: shifting raises its held-out
    accuracy from about 0.97 to 0.99 and halves the FD's spread relative to its range.
    """
    dx, dy = torch.randint(0, 3, (2,), generator=gen).tolist()
    return F.pad(batch, (1, 1, 1, 1), value=-1.0)[:, :, dy : dy + 8, dx : dx + 8]


def _train_classifier(train: tuple[Tensor, Tensor], test, seed: int) -> tuple[DigitClassifier, float]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier()
        optimizer = torch.optim.AdamW(model.parameters(), lr=_CLASSIFIER_LR, weight_decay=1e-4)
        gen = torch.Generator().manual_seed(seed)
        digits, labels = train
        for _ in range(_CLASSIFIER_EPOCHS):
            for batch in torch.randperm(len(digits), generator=gen).split(_CLASSIFIER_BATCH):
                loss = F.cross_entropy(model(_shifted(digits[batch], gen)), labels[batch])
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
    """Scores (N, 1, 8, 8) digit samples in [-1, 1] against the held-out ("test") digits.

    The classifier is trained once per seed and process (a few seconds) and shared
    by every evaluator with that seed.
    """

    def __init__(self, seed: int = 0) -> None:
        if seed not in _CLASSIFIERS:
            _CLASSIFIERS[seed] = train_digit_classifier(seed)
        self.classifier, self.test_accuracy = _CLASSIFIERS[seed]
        self.held_out = load_dataset("digits", split="test")
        self._held_out_features = self.features(self.held_out.x)
        self._reference = _gaussian_stats(self._held_out_features)

    @property
    def max_sample_size(self) -> int:
        """The largest sample_size of fd_draws / floor_fd_draws: two disjoint draws of held-out digits that size."""
        return len(self.held_out) // 2

    def sample_size(self, num_samples: int) -> int:
        """The FD's N for num_samples samples, as the digits table takes it: half of them (so that draws
        differ), at most max_sample_size."""
        return min(num_samples // 2, self.max_sample_size)

    def features(self, samples: Tensor) -> np.ndarray:
        """(N, FEATURE_DIM) float64 penultimate-layer features of the clipped samples."""
        with torch.no_grad():
            return self.classifier.features(_digits_samples(samples)).double().numpy()

    def fd(self, samples: Tensor) -> float:
        """Feature-space Fréchet distance from all held-out digits (lower is better; NaN samples give NaN).

        Its bias depends on the number of samples: compare values at one N only, or use fd_draws.
        """
        return frechet_distance(*_gaussian_stats(self.features(samples)), *self._reference)

    def fd_draws(self, samples: Tensor, sample_size: int, *, draws: int = FD_DRAWS, seed: int = 0) -> np.ndarray:
        """(draws,) FDs of random sample_size subsets of the samples to reference draws of the held-out
        digits, the same draws for every call with this sample_size, draws and seed (see fd_draws_between)."""
        return fd_draws_between(self.features(samples), self._held_out_features, sample_size, draws=draws, seed=seed)

    def floor_fd_draws(self, sample_size: int, *, draws: int = FD_DRAWS, seed: int = 0) -> np.ndarray:
        """(draws,) FDs of real digits: held-out digits disjoint from each reference draw of fd_draws
        (see floor_fd_draws_within), what a generator of exactly the digits' distribution scores."""
        return floor_fd_draws_within(self._held_out_features, sample_size, draws=draws, seed=seed)

    def confidence(self, samples: Tensor) -> float:
        """The classifier's mean max-softmax probability on the samples (digit-like samples score near 1)."""
        return self._probabilities(samples).amax(1).double().mean().item()

    def class_histogram(self, samples: Tensor) -> np.ndarray:
        """(10,) int64 counts of the classifier's predicted class (argmax) over the samples: mode coverage.

        A generator that covers every digit gives about equal counts (the digits' classes are balanced
        to within 3%); see covered_classes.
        """
        predicted = self._probabilities(samples).argmax(1)
        return torch.bincount(predicted, minlength=NUM_DIGIT_CLASSES).numpy().astype(np.int64)

    def _probabilities(self, samples: Tensor) -> Tensor:
        with torch.no_grad():
            return self.classifier(_digits_samples(samples)).softmax(1)


def fd_draws_between(
    features: np.ndarray, reference: np.ndarray, sample_size: int, *, draws: int = FD_DRAWS, seed: int = 0
) -> np.ndarray:
    """(draws,) FDs: draw i scores a random sample_size rows of features against reference draw i.

    Reference draw i is sample_size random rows of reference (see floor_fd_draws_within), the same
    for every call with this reference, sample_size, draws and seed, so two feature sets' values
    differ only by their features. The subsets of features are drawn without replacement with
    seed + 1; when features has fewer than about 4 × sample_size rows they overlap much, and the
    spread of the values understates the FD's sampling spread.
    """
    reference_draws = _reference_draws(len(reference), sample_size, draws, seed)
    if sample_size > len(features):
        raise ValueError(f"sample_size {sample_size} is more than the {len(features)} samples")
    gen = torch.Generator().manual_seed(seed + 1)
    fds = []
    with _one_blas_thread():
        for reference_rows, _ in reference_draws:
            subset = features[torch.randperm(len(features), generator=gen)[:sample_size].numpy()]
            fds.append(frechet_distance_between(subset, reference[reference_rows]))
    return np.array(fds)


def floor_fd_draws_within(
    reference: np.ndarray, sample_size: int, *, draws: int = FD_DRAWS, seed: int = 0
) -> np.ndarray:
    """(draws,) FDs between two disjoint random sample_size draws of reference's rows.

    Draw i splits a random permutation of the rows: its first sample_size rows are reference draw i
    of fd_draws_between (same reference, sample_size, draws and seed), the next sample_size the
    sample scored against it. So this is what a generator of exactly the reference's distribution
    scores, on average, at this sample size against the same reference draws: the floor of the
    FDs, with its spread. Because the two draws are disjoint halves of one permutation, their
    difference varies about as it would between independent draws of the distribution.
    """
    fds = []
    with _one_blas_thread():
        for reference_rows, sample_rows in _reference_draws(len(reference), sample_size, draws, seed):
            fds.append(frechet_distance_between(reference[sample_rows], reference[reference_rows]))
    return np.array(fds)


def _one_blas_thread():
    """numpy's BLAS on one thread for the FD draws: their FEATURE_DIM² covariances are too small to
    gain from threads, and a thread per core made each FD up to 40 times slower on a busy machine."""
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    return threadpool_limits(1, user_api="blas")


def _reference_draws(num_rows: int, sample_size: int, draws: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(reference rows, sample rows) per draw: two disjoint random sample_size of num_rows rows."""
    if not isinstance(sample_size, int) or not 2 <= sample_size <= num_rows // 2:
        raise ValueError(
            f"sample_size must be an int in [2, {num_rows // 2}] (half the reference's rows), got {sample_size!r}"
        )
    if not isinstance(draws, int) or draws < 2:
        raise ValueError(f"draws must be an int >= 2 (a spread needs two), got {draws!r}")
    gen = torch.Generator().manual_seed(seed)
    permutations = [torch.randperm(num_rows, generator=gen).numpy() for _ in range(draws)]
    return [(rows[:sample_size], rows[sample_size : 2 * sample_size]) for rows in permutations]


def covered_classes(class_counts: np.ndarray) -> int:
    """How many classes get at least half their fair share (1 / number of classes) of the counts."""
    counts = np.asarray(class_counts)
    return int((2 * len(counts) * counts >= counts.sum()).sum())


def _gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of (N, D) features."""
    return features.mean(0), np.cov(features, rowvar=False)


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
