"""Data sets for training and evaluating IMM models, and PNG writers for their samples.

Every data set comes back as one in-memory float32 tensor: the data here (8×8 digits,
2-D toys, folders of small images, arrays of VAE latents) fits in memory, and a
tensor is what the trainer indexes. Images are (N, C, H, W) scaled to [-1, 1];
vectors are (N, D).

The train/test split of finite data is fixed: every fifth sample (indices 4, 9, 14,
… in the data's own order: sorted file paths, array rows) is held out. It does not
depend on the run's seed, so held-out data never leaks into training whatever seed
a run uses, and with files sorted by class folder it is stratified.

The digits are split per class instead (see `digits_split_indices`): sklearn's order
cycles through the classes, so every fifth digit overall would hold out 2.5 times as
many 3s as 1s. Their split also sets aside the training digits of the digits metric's
classifier, so that a model is never scored in features fitted to its own training
digits.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..validation import check_choice

SPLITS = ("train", "test", "all")
# The digits' splits: load_dataset's, and the training digits of the digits metric's classifier.
DIGITS_SPLITS = ("train", "classifier", "test", "all")
TOY2D_KINDS = ("checkerboard", "8gaussians")
BUILTIN_DATASETS = ("digits", "toy2d", *TOY2D_KINDS)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARRAY_SUFFIXES = (".npy", ".npz")
HELD_OUT_EVERY = 5
# The largest side of a training image read from a folder: the pixel-space models here train on
# images up to 64×64 (ImageNet is trained as 32×32 latents), and every image is held in memory as
# float32, 12 MB for one 1024×1024 RGB image.
MAX_IMAGE_SIDE = 1024
# Class indices must be below this. The model's label table and each one-hot batch grow with the
# class count (a label of 2**45 once asked for 256 TB); the largest common label set, ImageNet-21k,
# has 21841 classes.
MAX_NUM_CLASSES = 100_000

_GRAYSCALE_MODES = ("1", "L", "LA")
# What decoding a truncated or corrupt image can raise (UnidentifiedImageError is an OSError).
_IMAGE_FILE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error)
# What reading a truncated or corrupt .npy/.npz can raise (numpy's format reader, zipfile, zlib).
_ARRAY_FILE_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)
_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
# 8 Gaussians: noise std relative to the circle's radius (as in FFJORD's toy).
_EIGHT_GAUSSIANS_NOISE = 0.125


class DataFileError(ValueError):
    """A data file that cannot be used; the message names the file and what is wrong with it."""


@dataclass(frozen=True)
class Dataset:
    """A whole data set in memory.

    x: float32, (N, C, H, W) for images or (N, D) for vectors.
    labels: int64 (N,) class indices in [0, num_classes), or None when unlabelled.
    num_classes: 0 when unlabelled.
    kind: "image" or "vector".
    name: where it came from (a built-in name or a path), for logs and configs.
    """

    x: Tensor
    labels: Tensor | None
    num_classes: int
    kind: str
    name: str

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one sample, e.g. (1, 8, 8) or (2,)."""
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return self.x.shape[0]


def load_dataset(name_or_path: str | os.PathLike, *, split: str = "train", seed: int = 0, **options) -> Dataset:
    """Loads a built-in data set or user data.

    name_or_path: "digits" (sklearn's 8×8 digits, labelled); "toy2d" (option
    toy="checkerboard" or "8gaussians"), or "checkerboard" / "8gaussians" directly;
    a folder of .png/.jpg images (labels from class subfolders); or a .npy/.npz
    array (npz: key "x" or its only array, optional "y" labels). A local folder
    named like a built-in is read when given as a Path or as "./digits".
    split: "train", "test" (every fifth sample, held out; for digits every fifth of each class, and
    "train" is three of every five: see `digits_split_indices`) or "all".
    seed: draws the toy2d samples; the split of finite data does not depend on it.
    options: toy2d takes toy= and num_samples= (before the split, default 10000).

    A data file that cannot be used (truncated or corrupt, pickled objects, NaN or infinite values,
    a shape or labels that do not fit, images of mixed sizes, larger than MAX_IMAGE_SIDE, with
    transparency) raises DataFileError, a ValueError whose message names the file and the fault.
    """
    check_choice("split", split, SPLITS)
    name = os.fspath(name_or_path)
    if isinstance(name_or_path, str) and name in BUILTIN_DATASETS:
        if name == "digits":
            if options:
                raise TypeError(f"digits takes no options, got {sorted(options)}")
            digits = _load_digits()
            if split == "all":
                return digits
            rows = digits_split_indices(split, digits.labels)
            return Dataset(digits.x[rows], digits.labels[rows], digits.num_classes, digits.kind, digits.name)
        else:
            if name in TOY2D_KINDS:
                options = {"toy": name, **options}
            dataset = _sample_toy2d(seed=seed, **options)
    else:
        path = user_data_path(name, options)
        if path.is_dir():
            dataset = _load_image_folder(path)
        elif path.suffix.lower() in ARRAY_SUFFIXES:
            dataset = _load_array_file(path)
        else:
            raise ValueError(
                f"{path}: unsupported data file; expected a folder of images or a {' / '.join(ARRAY_SUFFIXES)} array"
            )
    return _take_split(dataset, split)


def user_data_path(name: str, options: dict) -> Path:
    """The path of user data (not a built-in set), which must exist and takes no options."""
    path = Path(name)
    if not path.exists():
        raise FileNotFoundError(
            f"name_or_path {name!r} is neither a built-in data set {BUILTIN_DATASETS} nor an existing path"
        )
    if options:
        raise TypeError(f"user data takes no options, got {sorted(options)}")
    return path


def archive_data_key(path: Path, members) -> str:
    """The data array of an .npz archive with these member names: "x", or its only array besides "y"."""
    keys = list(members)
    data_keys = ["x"] if "x" in keys else [k for k in keys if k != "y"]
    if len(data_keys) != 1:
        raise DataFileError(f"{path}: expected a key 'x' or exactly one array (besides 'y'), got keys {keys}")
    return data_keys[0]


def _take_split(dataset: Dataset, split: str) -> Dataset:
    if split == "all":
        return dataset
    held_out = torch.arange(len(dataset)) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    keep = held_out if split == "test" else ~held_out
    if not keep.any():
        raise ValueError(
            f"{dataset.name} has {len(dataset)} samples, too few for a {split!r} split "
            f"(every {HELD_OUT_EVERY}th sample is held out); use split='all'"
        )
    labels = None if dataset.labels is None else dataset.labels[keep]
    return Dataset(dataset.x[keep], labels, dataset.num_classes, dataset.kind, dataset.name)


def digits_split_indices(split: str, labels: Tensor | None = None) -> Tensor:
    """Ascending indices into sklearn's 1797 digits (the "all" split) of one of DIGITS_SPLITS.

    The split is per class: number each class's digits 0, 1, 2, … in sklearn's order; number 4 of
    every five (4, 9, 14, …) is "test" (355 digits, held out), number 3 (3, 8, 13, …) is
    "classifier" (357 digits, the training digits of the digits metric's classifier, in
    imm_kernels.train.metrics), numbers 0, 1 and 2 are "train" (1085 digits, what models train
    on). So every split has the whole set's class proportions, and the three are disjoint.
    labels: the digits' labels if already loaded (the split depends on nothing else).
    """
    check_choice("split", split, DIGITS_SPLITS)
    labels = _load_digits().labels if labels is None else labels
    rank_in_class = torch.empty_like(labels)
    for digit in labels.unique():
        members = labels == digit
        rank_in_class[members] = torch.arange(int(members.sum()))
    position = rank_in_class % HELD_OUT_EVERY
    keep = {
        "train": position < HELD_OUT_EVERY - 2,
        "classifier": position == HELD_OUT_EVERY - 2,
        "test": position == HELD_OUT_EVERY - 1,
        "all": torch.ones_like(position, dtype=torch.bool),
    }[split]
    return keep.nonzero().squeeze(1)


def _load_digits() -> Dataset:
    """sklearn's 1797 8×8 digits (bundled with sklearn, no download); pixels 0..16 → [-1, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div_(8.0).sub_(1.0).unsqueeze(1)
    labels = torch.from_numpy(digits.target).long()
    return Dataset(x, labels, 10, "image", "digits")


def _sample_toy2d(*, seed: int, toy: str = "checkerboard", num_samples: int = 10000) -> Dataset:
    """A 2-D toy with unit standard deviation per coordinate."""
    check_choice("toy", toy, TOY2D_KINDS)
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    gen = torch.Generator().manual_seed(seed)
    if toy == "checkerboard":
        # Columns of width 1 over [-2, 2); rows of height 1 alternate by column parity.
        # Each coordinate is uniform on [-2, 2): std 4/sqrt(12).
        x1 = 4 * torch.rand(num_samples, generator=gen, dtype=torch.float64) - 2
        row = torch.rand(num_samples, generator=gen, dtype=torch.float64)
        row = row - 2 * torch.randint(0, 2, (num_samples,), generator=gen) + torch.floor(x1) % 2
        points = torch.stack([x1, row], 1) / (4 / math.sqrt(12))
    else:
        # Eight modes on a circle of radius R with noise std 0.125 R: per-coordinate
        # variance R²/2 + (0.125 R)², so R below gives std 1.
        radius = 1 / math.sqrt(0.5 + _EIGHT_GAUSSIANS_NOISE**2)
        angle = torch.randint(0, 8, (num_samples,), generator=gen) * (2 * math.pi / 8)
        centres = radius * torch.stack([angle.cos(), angle.sin()], 1)
        noise = torch.randn(num_samples, 2, generator=gen, dtype=torch.float64)
        points = centres + _EIGHT_GAUSSIANS_NOISE * radius * noise
    return Dataset(points.float(), None, 0, "vector", f"toy2d:{toy}")


def _load_image_folder(root: Path) -> Dataset:
    """Images of one size; labelled by top-level subfolder when every image is in one."""
    files, class_of_file = image_folder_files(root)
    pixels, first = [], None
    for path in files:
        image = read_image(path)
        if first is None:
            first = (path, image.size)
        elif image.size != first[1]:
            raise _image_size_error(root, first[0], first[1], path, image.size)
        pixels.append(image)
    mode = "L" if all(image.mode in _GRAYSCALE_MODES for image in pixels) else "RGB"
    x = _image_pixels([image.convert(mode) for image in pixels])
    labels, num_classes = folder_labels(class_of_file)
    return Dataset(x, labels, num_classes, "image", str(root))


def image_folder_files(root: Path) -> tuple[list[Path], list[str | None]]:
    """A folder's image files, sorted, and each one's class subfolder (None for images at the top level)."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{root}: no {'/'.join(IMAGE_SUFFIXES)} images found in this folder or its subfolders")
    class_of_file = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else None for p in files]
    at_top = [p for p, c in zip(files, class_of_file) if c is None]
    if at_top and len(at_top) < len(files):
        raise ValueError(
            f"{root}: has images both at the top level (e.g. {at_top[0].name}) and in subfolders; "
            "put every image in a class subfolder (labelled) or none (unlabelled)"
        )
    return files, class_of_file


def _image_size_error(root: Path, first: Path, first_size, path: Path, size) -> DataFileError:
    return DataFileError(
        f"{root}: images differ in size: {first.name} is {first_size[0]}×{first_size[1]} but "
        f"{path.name} is {size[0]}×{size[1]} (width×height); resize them to one size"
    )


def _image_pixels(images) -> Tensor:
    """(N, C, H, W) float32 in [-1, 1] from PIL images of one size, all in mode "L" or all "RGB"."""
    arrays = np.stack([np.asarray(image) for image in images])
    if arrays.ndim == 3:
        arrays = arrays[..., None]
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()


def folder_labels(class_of_file: list[str | None]) -> tuple[Tensor | None, int]:
    """(labels, num_classes): class subfolders numbered in sorted order, or (None, 0) when unlabelled."""
    if None in class_of_file:
        return None, 0
    class_names = sorted(set(class_of_file))
    index = {name: i for i, name in enumerate(class_names)}
    return torch.tensor([index[c] for c in class_of_file], dtype=torch.long), len(class_names)


def read_image(path: Path, *, limit_side: bool = True):
    """One decoded image file (a PIL image) or a DataFileError naming the file.

    Past Image.MAX_IMAGE_PIXELS PIL warns that the file could be a decompression bomb, and past twice
    that it refuses; both are errors here, as are images larger than MAX_IMAGE_SIDE (checked from the
    header, before decoding; limit_side=False skips this, for callers that crop), animations, 16-bit and
    float images and transparent pixels.
    """
    from PIL import Image

    with _image_file_errors(path):
        image = Image.open(path)
        with image:
            if limit_side:
                _check_image_side(path, image.size)
            # A camera JPEG's extra MPO frames (previews, depth) are no animation: its first frame is the photo.
            if getattr(image, "n_frames", 1) > 1 and image.format != "MPO":
                raise DataFileError(f"{path}: an animation of {image.n_frames} frames; save one frame per file")
            image.load()
    if image.mode.startswith(("I", "F")):
        raise DataFileError(f"{path}: {image.mode} images (16-bit or float) are not supported; save as 8-bit")
    if "A" in image.getbands() or "transparency" in image.info:
        lowest_alpha, _ = image.convert("RGBA").getchannel("A").getextrema()
        if lowest_alpha < 255:
            raise DataFileError(
                f"{path}: has transparent pixels, which training would see as their hidden colour; "
                "flatten the image onto a background"
            )
    return image


def read_image_header(path: Path) -> tuple[tuple[int, int], str]:
    """(width, height) and PIL mode of an image file, from its header (no decoding); errors as read_image's."""
    from PIL import Image

    with _image_file_errors(path), Image.open(path) as image:
        _check_image_side(path, image.size)
        return image.size, image.mode


@contextlib.contextmanager
def _image_file_errors(path: Path):
    """Turns what opening or decoding `path` raises, and PIL's decompression-bomb warning, into DataFileErrors."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except DataFileError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataFileError(f"{path}: too many pixels to decode safely ({err})") from err
    except _IMAGE_FILE_ERRORS as err:
        raise DataFileError(f"{path}: unreadable image ({err})") from err


def _check_image_side(path: Path, size: tuple[int, int]) -> None:
    width, height = size
    if max(width, height) > MAX_IMAGE_SIDE:
        raise DataFileError(
            f"{path}: image is {width}×{height}; training images may be at most {MAX_IMAGE_SIDE} "
            "pixels on a side: resize them"
        )


def _load_array_file(path: Path) -> Dataset:
    """(N, D) vectors or (N, C, H, W) images/latents.

    uint8 arrays are taken as 0..255 pixels and scaled to [-1, 1]; other numbers are
    used as they are (latents come already scaled by their VAE's factor).
    """
    array, labels = read_array_file(path)
    check_array_layout(path, array.dtype, array.shape)
    if array.dtype == np.uint8:
        x = torch.from_numpy(array).float().div_(127.5).sub_(1.0)
    else:
        with np.errstate(over="ignore"):  # values beyond float32 become inf, reported just below
            x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if not torch.isfinite(x).all():
        raise DataFileError(f"{path}: array contains NaN or infinite values (or values beyond float32)")
    labels, num_classes = (None, 0) if labels is None else checked_labels(path, labels, array.shape[0])
    return Dataset(x, labels, num_classes, "image" if x.dim() == 4 else "vector", str(path))


def check_array_layout(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    """Real numbers, (N, D) or (N, C, H, W), not empty: what an array's header tells."""
    if dtype == np.bool_ or not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
        raise DataFileError(f"{path}: array has dtype {dtype}; expected real numbers (float or integer)")
    if len(shape) not in (2, 4):
        raise DataFileError(
            f"{path}: array has shape {shape}; expected (N, D) vectors or (N, C, H, W) images "
            "(add a channel axis to (N, H, W) images)"
        )
    if shape[0] == 0 or math.prod(shape[1:]) == 0:
        raise DataFileError(f"{path}: array of shape {shape} is empty")


def checked_labels(path: Path, labels: np.ndarray, num_rows: int) -> tuple[Tensor, int]:
    """(int64 labels, num_classes) from a file's 'y' array, or a DataFileError naming the file."""
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataFileError(f"{path}: labels 'y' must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if labels.shape[0] != num_rows:
        raise DataFileError(f"{path}: labels 'y' has {labels.shape[0]} entries but the data has {num_rows} rows")
    if labels.min() < 0:
        raise DataFileError(f"{path}: labels 'y' must be >= 0, got min {labels.min()}")
    if labels.max() >= MAX_NUM_CLASSES:
        raise DataFileError(
            f"{path}: labels 'y' go up to {labels.max()}, but class indices must be below {MAX_NUM_CLASSES} "
            "(the model's label table grows with the class count); number the classes 0, 1, 2, ..."
        )
    return torch.from_numpy(labels.astype(np.int64)), int(labels.max()) + 1


def read_array_file(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(x, y or None) from a .npy file or an .npz archive (key "x" or its only array, and "y").

    The content decides which, as for np.load. Nothing is unpickled, and each array's header is
    checked against the bytes the file holds before any memory is allocated for it.
    """
    try:
        with open(path, "rb") as file:
            is_archive = file.read(2) == b"PK"  # a zip archive, as np.savez writes
        if not is_archive:
            return _read_npy(str(path), lambda: open(path, "rb"), path.stat().st_size), None
        with zipfile.ZipFile(path) as archive:
            members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
            data_key = archive_data_key(path, members)

            def read(key: str) -> np.ndarray:
                info = members[key]
                return _read_npy(f"{path}: array {key!r}", lambda: archive.open(info), info.file_size)

            return read(data_key), read("y") if "y" in members else None
    except DataFileError:
        raise
    except _ARRAY_FILE_ERRORS as err:
        raise DataFileError(f"{path}: unreadable array file, truncated or corrupt ({err})") from err


def _read_npy(what: str, open_stream, stored_bytes: int) -> np.ndarray:
    """The array in the .npy stream that open_stream() opens; `what` names it in errors."""
    try:
        with open_stream() as stream:
            version = np.lib.format.read_magic(stream)
            read_header = _NPY_HEADER_READERS.get(version)
            if read_header is not None:  # newer versions: numpy's reader below checks them
                shape, _, dtype = read_header(stream)
                needed = stream.tell() + math.prod(shape) * dtype.itemsize
                if needed > stored_bytes:
                    raise DataFileError(
                        f"{what}: truncated: its header declares shape {shape} of {dtype} ({needed} bytes "
                        f"with the header) but it holds {stored_bytes} bytes"
                    )
        with open_stream() as stream:
            return np.lib.format.read_array(stream, allow_pickle=False)
    except DataFileError:
        raise
    except MemoryError as err:
        raise DataFileError(f"{what}: too large to load into memory ({err})") from err
    except _ARRAY_FILE_ERRORS as err:
        raise DataFileError(f"{what}: unreadable, truncated or corrupt ({err})") from err


# Sample grids show each image at least this many pixels across: an 8×8 digit becomes 64×64, each of its
# pixels an 8×8 block (nearest neighbour), so the digit reads plainly at any screen's scale.
GRID_MIN_SIDE = 64
_WHITE, _BLACK = 255, 0


def to_uint8_images(samples: Tensor) -> Tensor:
    """(N, C, H, W) samples in [-1, 1] -> uint8 pixels, the rule of the sample PNGs (save_image_grid) and of
    FID (imm_kernels.fid): round((clamp(x, -1, 1) + 1) · 127.5).

    This is IMM's own pixel decoding, floor(127.5·x + 128) clipped to [0, 255], except for values
    within float rounding of a half-integer pixel.
    """
    if not isinstance(samples, Tensor) or not samples.dtype.is_floating_point:
        what = (
            f"Tensor of dtype {samples.dtype} and shape {tuple(samples.shape)}"
            if isinstance(samples, Tensor)
            else type(samples).__name__
        )
        raise TypeError(f"samples must be a floating-point tensor, got {what}")
    return ((samples.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def grid_upscale(height: int, width: int) -> int:
    """save_image_grid's default pixel repeat: each image at least GRID_MIN_SIDE pixels across."""
    return max(1, math.ceil(GRID_MIN_SIDE / max(height, width)))


def save_image_grid(
    images: Tensor,
    path: str | os.PathLike,
    nrow: int = 8,
    upscale: int | None = None,
    *,
    row_labels: Sequence[str] | None = None,
) -> Path:
    """Writes (N, C, H, W) images in [-1, 1] (values outside are clipped) as one PNG grid.

    nrow: images per row. upscale: integer pixel repeat (nearest neighbour); None picks one that makes
    each image at least GRID_MIN_SIDE pixels across, so 8×8 digits are plainly visible. C must be 1 or 3.
    row_labels: one text per grid row (e.g. its step count), written in a white margin left of the rows.
    """
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a non-empty (N, C, H, W) tensor with C = 1 or 3, got {shape}")
    if not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow must be a positive int, got {nrow!r}")
    num, channels, height, width = images.shape
    if upscale is None:
        upscale = grid_upscale(height, width)
    elif not isinstance(upscale, int) or upscale < 1:
        raise ValueError(f"upscale must be a positive int or None, got {upscale!r}")
    cols, rows = min(nrow, num), math.ceil(num / nrow)
    if row_labels is not None and (
        isinstance(row_labels, str) or len(row_labels) != rows or not all(isinstance(t, str) for t in row_labels)
    ):
        raise ValueError(f"row_labels must be {rows} strings, one per grid row, got {row_labels!r}")

    from PIL import Image

    pixels = to_uint8_images(images.detach().float().cpu())
    pixels = pixels.repeat_interleave(upscale, 2).repeat_interleave(upscale, 3)
    height, width, pad = height * upscale, width * upscale, 2
    grid = torch.full((channels, rows * (height + pad) + pad, cols * (width + pad) + pad), 255, dtype=torch.uint8)
    for i in range(num):
        top, left = pad + (i // nrow) * (height + pad), pad + (i % nrow) * (width + pad)
        grid[:, top : top + height, left : left + width] = pixels[i]
    array = grid.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[..., 0] if channels == 1 else array)
    if row_labels is not None:
        image = _label_rows(image, row_labels, [pad + r * (height + pad) + height / 2 for r in range(rows)], height)
    path = Path(path)
    image.save(path, format="PNG")
    return path


def _label_font(size: int):
    """DejaVu Sans at `size` pixels (matplotlib ships it, so labels look alike everywhere); Pillow's
    built-in font where FreeType is missing."""
    import matplotlib
    from PIL import ImageFont

    try:
        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except (OSError, ImportError):
        return ImageFont.load_default()


def _label_rows(image, labels: Sequence[str], centres: list[float], row_height: int):
    """image with a white margin on its left holding labels[r], vertically centred on centres[r]."""
    from PIL import Image, ImageDraw

    font = _label_font(min(max(row_height // 4, 12), 32))
    boxes = [ImageDraw.Draw(image).textbbox((0, 0), label, font=font) for label in labels]
    gap = 8
    margin = max(right for _, _, right, _ in boxes) + 2 * gap
    ink, paper = (_BLACK, _WHITE) if image.mode == "L" else ((_BLACK,) * 3, (_WHITE,) * 3)
    labelled = Image.new(image.mode, (image.width + margin, image.height), paper)
    labelled.paste(image, (margin, 0))
    draw = ImageDraw.Draw(labelled)
    for label, (_, top, _, bottom), centre in zip(labels, boxes, centres):
        draw.text((gap, round(centre - (top + bottom) / 2)), label, fill=ink, font=font)
    return labelled


def save_scatter_plot(
    points: Tensor,
    path: str | os.PathLike,
    *,
    extent: float | None = None,
    size: int = 512,
    background: Tensor | None = None,
    label: str | None = None,
) -> Path:
    """Writes (N, 2) points as a PNG scatter plot: dark 2×2-pixel dots on white, grey axes.

    extent: the plot covers [-extent, extent]² (points outside are left out); None uses
    1.05 × the largest |coordinate|, so the whole sample shows. size: the PNG's width and height.
    background: (M, 2) draws of the data (many, e.g. 10**5), shown under the points as a grey
    histogram, darker where the data are denser, so a sample reads against the density it should have.
    label: a text in the top-left corner (e.g. the step count).
    """
    xy = _finite_points("points", points)
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    if extent is None:
        extent = 1.05 * float(xy.abs().max()) if len(xy) else 1.0
        extent = extent if extent > 0 else 1.0
    elif not extent > 0:
        raise ValueError(f"extent must be positive, got {extent!r}")

    from PIL import Image, ImageDraw

    if background is None:
        canvas = np.full((size, size), _WHITE, dtype=np.uint8)
    else:
        canvas = _density_shading(*_scatter_pixels(_finite_points("background", background), extent, size), size)
    centre = size // 2
    canvas[centre, :] = np.minimum(canvas[centre, :], _AXIS_GREY)
    canvas[:, centre] = np.minimum(canvas[:, centre], _AXIS_GREY)
    row, col = _scatter_pixels(xy, extent, size)
    for d_row in (0, 1):
        for d_col in (0, 1):
            canvas[row + d_row, col + d_col] = _POINT_GREY
    image = Image.fromarray(canvas)
    if label is not None:
        ImageDraw.Draw(image).text((6, 4), label, fill=_BLACK, font=_label_font(max(12, size // 32)))
    path = Path(path)
    image.save(path, format="PNG")
    return path


# Grey levels of the scatter plots: axes, points, and the darkest background (the densest data).
_AXIS_GREY, _POINT_GREY, _DENSEST_GREY = 200, 30, 170
# The background histogram's cells are this many pixels on a side: 128² cells on a 512-pixel plot.
_DENSITY_CELL = 4


def _finite_points(name: str, points: Tensor) -> Tensor:
    """An (N, 2) tensor's rows that are finite, as float64 on the CPU; ValueError for any other shape."""
    if not isinstance(points, Tensor) or points.dim() != 2 or points.shape[1] != 2:
        shape = tuple(points.shape) if isinstance(points, Tensor) else type(points).__name__
        raise ValueError(f"{name} must be an (N, 2) tensor, got {shape}")
    xy = points.detach().double().cpu()
    return xy[torch.isfinite(xy).all(1)]


def _scatter_pixels(xy: Tensor, extent: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of the top-left pixel of each point's 2×2 dot, for the points inside the plot; y grows upwards."""
    col = ((xy[:, 0] / extent + 1) * (size - 2) / 2).round().long()
    row = ((1 - xy[:, 1] / extent) * (size - 2) / 2).round().long()
    inside = (col >= 0) & (col <= size - 2) & (row >= 0) & (row <= size - 2)
    return row[inside].numpy(), col[inside].numpy()


def _density_shading(row: np.ndarray, col: np.ndarray, size: int) -> np.ndarray:
    """A (size, size) uint8 canvas: white where no data fell, down to _DENSEST_GREY at the densest cells.

    The shade follows the square root of the count, so thin tails still show; the 99th percentile of
    the occupied cells is full shade, so one crowded cell does not wash out the rest.
    """
    cells = math.ceil(size / _DENSITY_CELL)
    counts = np.bincount((row // _DENSITY_CELL) * cells + col // _DENSITY_CELL, minlength=cells * cells)
    counts = counts.reshape(cells, cells).astype(np.float64)
    occupied = counts[counts > 0]
    full = np.percentile(occupied, 99) if len(occupied) else 1.0
    shade = np.sqrt(np.clip(counts / full, 0.0, 1.0))
    grey = np.round(_WHITE - (_WHITE - _DENSEST_GREY) * shade).astype(np.uint8)
    return np.repeat(np.repeat(grey, _DENSITY_CELL, 0), _DENSITY_CELL, 1)[:size, :size].copy()
