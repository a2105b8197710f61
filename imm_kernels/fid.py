"""Inception FID and KID of image samples against reference images or reference statistics (the `fid` extra).

The scores are the standard ones: features are the 2048 pool3 activations of the TensorFlow
Inception-v3 of 2015-12-05 (the network of the FID paper's code and of the ADM / guided-diffusion
evaluation suite), through torch-fidelity's port of it ("inception-v3-compat": the same weights and
TensorFlow 1.x's bilinear resize to 299×299). The metrics are torchmetrics':
`FrechetInceptionDistance` and `KernelInceptionDistance` (the cubic polynomial kernel of the KID
paper, 100 subsets of up to 1000), fed through their hook for a custom feature extractor.

Why those two packages. torch-fidelity's network is a port of that TensorFlow graph, resize
included, whose values its authors document to match the reference implementations' to machine
precision; it loads its weights from a given local file, and torchmetrics' own standard FID uses
it. torch-fidelity and clean-fid import torchvision, whose Linux wheels on PyPI are CUDA builds:
next to a CPU-only torch they fail to import (torchvision 0.28.0 with torch 2.13.0+cpu), and so
does every package that then imports torchvision, diffusers included. torchmetrics needs no
torchvision, so the `fid` extra is torchmetrics alone: the metric code runs, and is tested,
everywhere; torch-fidelity (with the torchvision built for the machine's torch) is needed only
where the real network runs.
torchmetrics offers no precision/recall, so neither does this module.

Features come from full float32 convolutions (cuDNN's TF32, PyTorch's default on recent GPUs, is
off while the network runs).

Nothing is downloaded: the network's weights come from a local file (`INCEPTION_WEIGHTS_FILE`,
from `INCEPTION_WEIGHTS_URL`, fetched once on a machine with internet access), by default from
where torch-fidelity would cache it (`default_inception_weights()`).

Samples become pixels as the sample PNGs do (`to_uint8_images`); one-channel images are scored as
grey RGB images. A reference is a folder of images, or a .npz holding Inception statistics `mu` and
`sigma` (the format the common suites write), uint8 images `arr_0` (N, H, W, C), or both: `mu` and
`sigma`, when present, are the reference of the FID, and images, when present, add the KID.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .train.data import to_uint8_images  # the sample PNGs' rule, so FID scores the pixels a grid shows
from .validation import check_positive_int

__all__ = [
    "INCEPTION_WEIGHTS_FILE",
    "INCEPTION_WEIGHTS_URL",
    "INCEPTION_FEATURES",
    "DEFAULT_BATCH_SIZE",
    "KID_SUBSETS",
    "KID_SUBSET_SIZE",
    "default_inception_weights",
    "inception_weights_path",
    "load_inception",
    "to_uint8_images",
    "image_features",
    "Reference",
    "load_reference",
    "save_reference",
    "FidScores",
    "FidScorer",
    "format_fid_table",
]

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
INCEPTION_FEATURES = 2048
# Images per Inception call: about 2 GB of float32 activations at 299×299.
DEFAULT_BATCH_SIZE = 200
# The KID paper's estimate: the mean (and spread) of the unbiased MMD² over random subsets.
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000

_NPZ_STATISTICS_KEYS = ("mu", "sigma")
_NPZ_IMAGES_KEY = "arr_0"
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Inception's final layer in the weights file: 1008 classes (the 2015 graph's) by 2048 features.
_INCEPTION_FC_SHAPE = (1008, INCEPTION_FEATURES)


# The network.


def default_inception_weights() -> Path:
    """Where the Inception weights are looked for without an explicit path: torch's hub cache
    ($TORCH_HOME/hub/checkpoints, ~/.cache/torch/hub/checkpoints by default), where torch-fidelity
    would download them."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def inception_weights_path(weights: str | os.PathLike | None = None) -> Path:
    """The Inception weights file: `weights` if given, else default_inception_weights().

    FileNotFoundError, one line saying which file to fetch from where and where to put it, when it
    is missing.
    """
    path = default_inception_weights() if weights is None else Path(weights)
    if path.is_file():
        return path
    given = f"weights={str(weights)!r} (--inception-weights)" if weights is not None else "no weights given and"
    raise FileNotFoundError(
        f"Inception weights not found: {given} no file at {str(path)!r}. Download {INCEPTION_WEIGHTS_URL} "
        f"on a machine with internet access, then pass its path with --inception-weights PATH (weights=PATH) "
        f"or copy it to {str(default_inception_weights())!r}"
    )


class _FeatureHead(nn.Module):
    """torch-fidelity's extractor, which returns a tuple of the requested features, as (N, 2048) features."""

    def __init__(self, extractor: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor

    def forward(self, images: Tensor) -> Tensor:
        return self.extractor(images)[0]


def load_inception(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """The FID Inception-v3 on `device`: uint8 (N, 3, H, W) images -> (N, 2048) float32 pool3 features.

    weights: the file INCEPTION_WEIGHTS_FILE (see inception_weights_path; nothing is downloaded).
    Needs torch-fidelity, and through it a torchvision built for the installed torch.
    """
    path = inception_weights_path(weights)
    _check_inception_weights(path)
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except (ImportError, RuntimeError) as err:  # a torchvision built for another torch fails with RuntimeError
        cpu_build = (
            " (a +cpu torch needs torchvision's +cpu build, from the PyTorch index)"
            if "+cpu" in torch.__version__
            else ""
        )
        raise ImportError(
            "the FID Inception network comes from torch-fidelity, which could not be imported "
            f"({type(err).__name__}: {err}); install the torchvision release built for torch {torch.__version__}"
            f"{cpu_build}, then pip install torch-fidelity==0.4.0"
        ) from err
    try:
        extractor = FeatureExtractorInceptionV3(
            "inception-v3-compat", [str(INCEPTION_FEATURES)], feature_extractor_weights_path=str(path)
        )
    except RuntimeError as err:  # load_state_dict: missing or misshapen tensors, listed one by one
        detail = " ".join(str(err).split())
        raise ValueError(
            f"{path}: not the FID Inception weights {INCEPTION_WEIGHTS_FILE}: its tensors do not fit the network "
            f"({detail[:200]}{'…' if len(detail) > 200 else ''})"
        ) from err
    return _FeatureHead(extractor).to(device).eval().requires_grad_(False)


def _check_inception_weights(path: Path) -> None:
    """A clear error for a file that is not the Inception state dict, before torch-fidelity unpickles it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for a file that is not a tensor archive
        raise ValueError(f"{path}: not a readable PyTorch weights file ({type(err).__name__}: {err})") from err
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    if not isinstance(fc, Tensor) or tuple(fc.shape) != _INCEPTION_FC_SHAPE:
        raise ValueError(
            f"{path}: not the FID Inception weights {INCEPTION_WEIGHTS_FILE} "
            f"(expected a state dict with fc.weight of shape {_INCEPTION_FC_SHAPE})"
        )


# Pixels and features.


def image_features(images: Tensor, network: nn.Module, *, batch_size: int = DEFAULT_BATCH_SIZE) -> Tensor:
    """The network's features of uint8 (N, C, H, W) images (C = 1 or 3), float64 on the CPU, batch by batch.

    Each batch moves to the network's device; one-channel images are repeated to grey RGB. cuDNN's TF32
    convolutions are off while the network runs.
    """
    _check_uint8_images("images", images, channels_dim=1)
    check_positive_int("batch_size", batch_size)
    return _features(images.split(batch_size), network)


def _features(batches, network: nn.Module) -> Tensor:
    device = next(network.parameters()).device
    features = []
    # Full float32 convolutions: cuDNN's default TF32 ones would move the features, so the scores, on recent GPUs.
    allow_tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
    try:
        with torch.no_grad():
            for batch in batches:
                batch = batch.to(device).contiguous()  # one memory layout, so one result, whatever the source
                if batch.shape[1] == 1:
                    batch = batch.repeat(1, 3, 1, 1)
                output = network(batch)
                if not isinstance(output, Tensor) or output.dim() != 2 or output.shape[0] != batch.shape[0]:
                    raise ValueError(f"network must return (N, D) features for N images, got {_describe(output)}")
                features.append(output.detach().to("cpu", torch.float64))
    finally:
        torch.backends.cudnn.allow_tf32 = allow_tf32
    return torch.cat(features)


def _check_uint8_images(name: str, images, *, channels_dim: int) -> None:
    if not isinstance(images, (Tensor, np.ndarray)) or images.dtype not in (torch.uint8, np.uint8):
        raise TypeError(f"{name} must be uint8 pixels, got {_describe(images)}")
    layout = "(N, C, H, W)" if channels_dim == 1 else "(N, H, W, C)"
    if images.ndim != 4 or images.shape[channels_dim] not in (1, 3) or images.shape[0] < 1:
        raise ValueError(f"{name} must be {layout} images with C = 1 or 3, got shape {tuple(images.shape)}")


def _describe(value) -> str:
    if isinstance(value, (Tensor, np.ndarray)):
        return f"{type(value).__name__} of dtype {value.dtype} and shape {tuple(value.shape)}"
    return type(value).__name__


# References.


@dataclass(frozen=True)
class Reference:
    """What samples are scored against.

    mean, cov: the reference features' mean (D,) and covariance (D, D), float64 (the FID's reference).
    features: (N, D) float64 features of the reference images (the KID's), None for statistics alone.
    image_size: (height, width) of the reference images, None for statistics alone.
    source: where it came from, for tables.
    """

    mean: np.ndarray
    cov: np.ndarray
    features: Tensor | None
    image_size: tuple[int, int] | None
    source: str

    @property
    def num_features(self) -> int:
        return self.mean.shape[0]


def load_reference(
    path: str | os.PathLike, network: nn.Module | None = None, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> Reference:
    """The reference at `path`: a folder of .png/.jpg images (all one size, searched recursively) or a .npz.

    A .npz holds `mu` (D,) and `sigma` (D, D), Inception statistics as the ADM suite and others
    write them; or `arr_0`, uint8 images (N, H, W, C) with C = 1 or 3 (or (N, H, W)); or both, when
    `mu` and `sigma` are the FID's reference and the images the KID's. Images need `network` (see
    load_inception); a .npz of statistics alone needs none.
    """
    path = Path(path)
    check_positive_int("batch_size", batch_size)
    if path.is_dir():
        return _folder_reference(path, _required_network(network, path), batch_size)
    if path.suffix.lower() != ".npz":
        raise ValueError(f"reference {str(path)!r} must be a folder of images or a .npz file")
    if not path.is_file():
        raise FileNotFoundError(f"reference {str(path)!r}: no such file or folder")
    return _npz_reference(path, network, batch_size)


def _required_network(network: nn.Module | None, path: Path) -> nn.Module:
    if network is None:
        raise ValueError(f"reference {str(path)!r} holds images: give network (load_inception) to score them")
    return network


def _folder_reference(root: Path, network: nn.Module, batch_size: int) -> Reference:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    if len(files) < 2:
        kinds = "/".join(_IMAGE_SUFFIXES)
        raise ValueError(f"reference {str(root)!r}: needs at least 2 {kinds} images, found {len(files)}")
    first_size = _read_rgb(files[0]).shape[:2]

    def batches():
        for start in range(0, len(files), batch_size):
            pixels = []
            for file in files[start : start + batch_size]:
                image = _read_rgb(file)
                if image.shape[:2] != first_size:
                    (height, width), (first_height, first_width) = image.shape[:2], first_size
                    raise ValueError(
                        f"reference {str(root)!r}: images differ in size: {files[0].name} is {first_width}×"
                        f"{first_height}, {file.name} is {width}×{height} (width×height)"
                    )
                pixels.append(image)
            yield torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)

    return _reference_of_features(_features(batches(), network), first_size, str(root))


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for a truncated or foreign file
        raise ValueError(f"{path}: unreadable image ({err})") from err


def _reference_of_features(features: Tensor, image_size, source: str) -> Reference:
    array = features.numpy()
    return Reference(array.mean(0), np.cov(array, rowvar=False), features, tuple(image_size), source)


def _npz_reference(path: Path, network: nn.Module | None, batch_size: int) -> Reference:
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            arrays = {key: npz[key] for key in (*_NPZ_STATISTICS_KEYS, _NPZ_IMAGES_KEY) if key in keys}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"reference {str(path)!r}: not a readable .npz ({err})") from err
    has_statistics = all(key in arrays for key in _NPZ_STATISTICS_KEYS)
    if not has_statistics and _NPZ_IMAGES_KEY not in arrays:
        raise ValueError(
            f"reference {str(path)!r} holds {sorted(keys)}: expected 'mu' and 'sigma' (Inception statistics) "
            "or 'arr_0' (uint8 images (N, H, W, C))"
        )
    features = image_size = None
    if _NPZ_IMAGES_KEY in arrays and (network is not None or not has_statistics):
        images = arrays[_NPZ_IMAGES_KEY]
        if images.ndim == 3 and images.dtype == np.uint8:  # (N, H, W) grey images
            images = images[..., None]
        _check_uint8_images(f"reference {str(path)!r}: arr_0", images, channels_dim=3)
        if images.shape[0] < 2:
            raise ValueError(f"reference {str(path)!r}: arr_0 needs at least 2 images, got {images.shape[0]}")
        nchw = torch.from_numpy(images).permute(0, 3, 1, 2)
        features = _features(nchw.split(batch_size), _required_network(network, path))
        image_size = images.shape[1:3]
    if not has_statistics:
        return _reference_of_features(features, image_size, str(path))
    mean, cov = (np.asarray(arrays[key], np.float64) for key in _NPZ_STATISTICS_KEYS)
    if mean.ndim != 1 or cov.shape != (mean.shape[0], mean.shape[0]):
        raise ValueError(f"reference {str(path)!r}: mu must be (D,) and sigma (D, D), got {mean.shape} and {cov.shape}")
    if not (np.isfinite(mean).all() and np.isfinite(cov).all()):
        raise ValueError(f"reference {str(path)!r}: mu and sigma must be finite")
    if features is not None and features.shape[1] != mean.shape[0]:
        raise ValueError(
            f"reference {str(path)!r}: arr_0's features have {features.shape[1]} dimensions, mu {mean.shape[0]}"
        )
    return Reference(mean, cov, features, None if image_size is None else tuple(image_size), str(path))


def save_reference(path: str | os.PathLike, reference: Reference) -> Path:
    """Writes the reference's statistics as a .npz of `mu` and `sigma` (float64), which load_reference reads back."""
    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise ValueError(f"path must end in .npz, got {str(path)!r}")
    with open(path, "wb") as file:  # np.savez would add .npz to a name ending in .NPZ
        np.savez(file, mu=reference.mean, sigma=reference.cov)
    return path


# Scores.


@dataclass(frozen=True)
class FidScores:
    """One sample set's scores: FID, and KID's mean and standard deviation over subsets of kid_subset_size
    (nan, and kid_subset_size 0, when the reference has no image features)."""

    fid: float
    kid_mean: float
    kid_std: float
    num_samples: int
    kid_subset_size: int


class _GivenFeatures(nn.Module):
    """torchmetrics' custom feature extractor for features computed beforehand: update() is handed them."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


class FidScorer:
    """Scores sample sets (their features, see image_features) against one reference, through torchmetrics.

    KID is computed when the reference has image features: `kid_subsets` random subsets of
    min(kid_subset_size, samples, reference images) each, drawn from `seed` (the global torch
    generator is left as it was).
    """

    def __init__(
        self,
        reference: Reference,
        *,
        kid_subsets: int = KID_SUBSETS,
        kid_subset_size: int = KID_SUBSET_SIZE,
        seed: int = 0,
    ) -> None:
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance
        except ImportError as err:
            raise ImportError(f"FID needs torchmetrics: pip install 'imm-kernels[fid]' ({err})") from err
        check_positive_int("kid_subsets", kid_subsets)
        if check_positive_int("kid_subset_size", kid_subset_size) < 2:  # the unbiased MMD² needs pairs
            raise ValueError(f"kid_subset_size must be >= 2, got {kid_subset_size}")
        self.reference = reference
        self.kid_subsets, self.kid_subset_size, self.seed = kid_subsets, kid_subset_size, seed
        self._fid = FrechetInceptionDistance(feature=_GivenFeatures(reference.num_features), reset_real_features=False)
        # torchmetrics holds the reference as sums (Σx, Σxxᵀ, n) from which compute() forms the mean and the
        # unbiased covariance; these sums give back (mean, cov) for any n, and n = 2 cancels the least.
        n = 2
        self._fid.real_features_sum = torch.from_numpy(n * reference.mean)
        outer = np.outer(reference.mean, reference.mean)
        self._fid.real_features_cov_sum = torch.from_numpy((n - 1) * reference.cov + n * outer)
        self._fid.real_features_num_samples = torch.tensor(n)

    def score(self, features: Tensor) -> FidScores:
        """FID and KID of the samples whose (N, D) features are given (N >= 2)."""
        if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[1] != self.reference.num_features:
            raise ValueError(
                f"features must be (N, {self.reference.num_features}) to match the reference, got {_describe(features)}"
            )
        if features.shape[0] < 2:
            raise ValueError(f"features must hold at least 2 samples, got {features.shape[0]}")
        if not torch.isfinite(features).all():
            raise ValueError("features must be finite")
        features = features.detach().to("cpu", torch.float64)
        self._fid.reset()  # the sample sums only: reset_real_features=False keeps the reference
        self._fid.update(features, real=False)
        fid = float(self._fid.compute())
        kid_mean = kid_std = math.nan
        subset_size = 0
        if self.reference.features is not None:
            subset_size = min(self.kid_subset_size, features.shape[0], self.reference.features.shape[0])
            kid_mean, kid_std = self._kid(features, subset_size)
        return FidScores(fid, kid_mean, kid_std, features.shape[0], subset_size)

    def _kid(self, features: Tensor, subset_size: int) -> tuple[float, float]:
        from torchmetrics.image.kid import KernelInceptionDistance

        with warnings.catch_warnings():  # that it keeps every feature in memory: so do we, by design
            warnings.filterwarnings("ignore", "Metric `Kernel Inception Distance` will save all extracted features")
            kid = KernelInceptionDistance(
                feature=_GivenFeatures(features.shape[1]), subsets=self.kid_subsets, subset_size=subset_size
            )
        kid.update(self.reference.features, real=True)
        kid.update(features, real=False)
        with torch.random.fork_rng(devices=[]):  # its subsets come from the global generator
            torch.manual_seed(self.seed)
            mean, std = kid.compute()
        return float(mean), float(std)


def format_fid_table(rows: dict[str, FidScores], reference: Reference) -> str:
    """Plain text: a row per sample set (FID, KID × 10³ ± std, samples), then what the columns mean."""
    width = max(len("samples"), *(len(name) for name in rows))
    header = f"{'samples':<{width}}  {'FID':>9}  {'KID×10³ ± std':>15}  {'count':>7}"
    lines = [header, "-" * len(header)]
    for name, scores in rows.items():
        kid = "—" if math.isnan(scores.kid_mean) else f"{1e3 * scores.kid_mean:6.2f} ± {1e3 * scores.kid_std:5.2f}"
        lines.append(f"{name:<{width}}  {scores.fid:9.3f}  {kid:>15}  {scores.num_samples:>7}")
    if reference.features is None:
        against = f"the statistics in {reference.source} (no images, so no KID)"
    else:
        against = f"{reference.features.shape[0]} reference images ({reference.source})"
    lines.append(f"FID and KID in Inception-v3 pool3 features ({reference.num_features}), against {against}")
    subset_sizes = {scores.kid_subset_size for scores in rows.values() if scores.kid_subset_size}
    if subset_sizes:
        lines.append(f"KID: mean ± std over subsets of {'/'.join(map(str, sorted(subset_sizes)))}")
    return "\n".join(lines)
