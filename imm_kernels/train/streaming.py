"""Training data too large to load up front, and a loader that fetches each step's rows ahead of time.

`open_dataset` opens the data that `load_dataset` reads, plus folders of array shards, as a
`DataSource`: an object that knows its length, sample shape, kind and classes, and reads the rows
it is asked for (`rows`):

- a .npy array, or an .npz archive saved by `np.savez`, is memory-mapped: nothing is read until
  rows are asked for, and then only those rows (ImageNet-256 latents, 1.28M × 4×32×32 float32,
  are 21 GB on disk and a few MB of page cache per batch);
- a folder whose top level holds .npy/.npz files is one data set of shards, in sorted name order
  (zero-pad the numbers: shard_0002 sorts before shard_0010), each memory-mapped;
- a folder of images is listed up front (and each image's header read, for its size and colours)
  and decoded when its rows are asked for;
- the built-in data sets, and an .npz archive saved by `np.savez_compressed` (a compressed member
  cannot be mapped), are loaded by `load_dataset` and held in memory.

Rows come back as `load_dataset` would give them (float32; uint8 pixels scaled to [-1, 1]; other
numbers as they are), and the split is `load_dataset`'s: every fifth sample of the data's own order
held out. What a header shows (dtype, shape, labels, the bytes a file holds) is checked when the data
is opened; NaN or infinite values, which only reading finds, raise DataFileError when their row is read.

`BatchLoader` turns a function step → row indices (the trainer's `batch_indices`) into a stream of
(x, labels) batches in step order, read ahead in DataLoader worker processes, with optional random
horizontal flips drawn from (seed, rank, step), so that a run resumed at any step sees the same data.
"""

from __future__ import annotations

import itertools
import math
import os
import struct
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ..validation import check_choice
from .data import (
    _ARRAY_FILE_ERRORS,
    _GRAYSCALE_MODES,
    _NPY_HEADER_READERS,
    ARRAY_SUFFIXES,
    BUILTIN_DATASETS,
    HELD_OUT_EVERY,
    IMAGE_SUFFIXES,
    SPLITS,
    DataFileError,
    Dataset,
    _image_pixels,
    _image_size_error,
    _read_npy,
    archive_data_key,
    check_array_layout,
    checked_labels,
    folder_labels,
    image_folder_files,
    load_dataset,
    read_image,
    read_image_header,
    user_data_path,
)

# The seed stream of the flips, distinct from the trainer's streams (0: data order, 1: each step's draws).
FLIP_STREAM = 2
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_ZIP_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # a zip member's local header, before its name and extra field


class DataSource:
    """A data set whose rows are read when asked for (see `open_dataset`).

    len(source): the samples in its split. shape: one sample's shape, e.g. (4, 32, 32) or (2,).
    kind: "image" (N, C, H, W) or "vector" (N, D). num_classes: 0 when unlabelled. name: where it
    came from. rows(indices): the samples at those positions of the split.
    """

    def __init__(
        self,
        *,
        name: str,
        kind: str,
        shape: tuple[int, ...],
        num_classes: int,
        labels: Tensor | None,
        total: int,
        split: str,
    ) -> None:
        self.name, self.kind, self.shape, self.num_classes = name, kind, shape, num_classes
        self._labels = labels  # of all `total` samples, int64
        self._split = split
        self._length = _split_length(total, split, name)

    def __len__(self) -> int:
        return self._length

    @property
    def labelled(self) -> bool:
        return self._labels is not None

    def rows(self, indices: Tensor) -> tuple[Tensor, Tensor | None]:
        """(x, labels) of the samples at `indices` (1-D integers in [0, len(self)), any device), in their
        order: x float32 on the CPU, labels int64 on the CPU or None when unlabelled."""
        indices = torch.as_tensor(indices)
        if indices.dim() != 1 or indices.dtype not in _INDEX_DTYPES:
            shape = tuple(indices.shape)
            raise TypeError(f"indices must be a 1-D integer tensor, got {indices.dtype} of shape {shape}")
        rows = indices.cpu().numpy().astype(np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"indices must lie in [0, {len(self)}) for {self.name}, got {rows.min()}..{rows.max()}")
        rows = _split_rows_to_data_rows(rows, self._split)
        labels = None if self._labels is None else self._labels[torch.from_numpy(rows)]
        return self._read_x(rows), labels

    def _read_x(self, rows: np.ndarray) -> Tensor:
        """float32 samples at these rows of the whole data (before the split)."""
        raise NotImplementedError


class InMemorySource(DataSource):
    """A `Dataset` already in memory (the built-ins, compressed .npz archives) behind the DataSource interface."""

    def __init__(self, dataset: Dataset) -> None:
        super().__init__(
            name=dataset.name,
            kind=dataset.kind,
            shape=dataset.shape,
            num_classes=dataset.num_classes,
            labels=dataset.labels,
            total=len(dataset),
            split="all",  # load_dataset took the split
        )
        self.x = dataset.x

    def _read_x(self, rows: np.ndarray) -> Tensor:
        return self.x[torch.from_numpy(rows)]


class ArraySource(DataSource):
    """Memory-mapped arrays (one file or a folder of shards) read as one data set, shard after shard."""

    def __init__(self, name: str, shards: list[MappedArray], labels: Tensor | None, num_classes: int, split: str):
        self.shards = shards
        self._shard_starts = np.cumsum([0] + [shard.shape[0] for shard in shards])
        shape = shards[0].shape[1:]
        super().__init__(
            name=name,
            kind="image" if len(shape) == 3 else "vector",
            shape=shape,
            num_classes=num_classes,
            labels=labels,
            total=int(self._shard_starts[-1]),
            split=split,
        )

    def _read_x(self, rows: np.ndarray) -> Tensor:
        shard_of_row = np.searchsorted(self._shard_starts, rows, side="right") - 1
        batch = np.empty((len(rows), *self.shape), dtype=self.shards[0].dtype)
        for shard in np.unique(shard_of_row):
            chosen = shard_of_row == shard
            batch[chosen] = self.shards[shard].array()[rows[chosen] - self._shard_starts[shard]]
        # The scaling of load_dataset, so that both give the same numbers.
        if batch.dtype == np.uint8:
            x = torch.from_numpy(batch).float().div_(127.5).sub_(1.0)
        else:
            with np.errstate(over="ignore"):  # values beyond float32 become inf, reported just below
                x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        finite = torch.isfinite(x.flatten(1)).all(1)
        if not finite.all():
            row = int(rows[int((~finite).nonzero()[0])])
            shard = int(np.searchsorted(self._shard_starts, row, side="right") - 1)
            raise DataFileError(
                f"{self.shards[shard].path}: row {row - self._shard_starts[shard]} contains NaN or infinite "
                "values (or values beyond float32)"
            )
        return x


class ImageFolderSource(DataSource):
    """A folder of images of one size, decoded when read; labelled by class subfolder as in load_dataset."""

    def __init__(self, root: Path, split: str) -> None:
        self.root = root
        self.files, class_of_file = image_folder_files(root)
        self.image_size, modes = None, set()
        for path in self.files:
            size, mode = read_image_header(path)
            if self.image_size is None:
                self.image_size = size
            elif size != self.image_size:
                raise _image_size_error(root, self.files[0], self.image_size, path, size)
            modes.add(mode)
        # load_dataset's rule: grayscale when every image is, otherwise RGB.
        self.mode = "L" if modes <= set(_GRAYSCALE_MODES) else "RGB"
        labels, num_classes = folder_labels(class_of_file)
        width, height = self.image_size
        super().__init__(
            name=str(root),
            kind="image",
            shape=(1 if self.mode == "L" else 3, height, width),
            num_classes=num_classes,
            labels=labels,
            total=len(self.files),
            split=split,
        )

    def _read_x(self, rows: np.ndarray) -> Tensor:
        images = []
        for row in rows:
            path = self.files[row]
            image = read_image(path)
            if image.size != self.image_size:  # the file changed since it was opened
                raise _image_size_error(self.root, self.files[0], self.image_size, path, image.size)
            images.append(image.convert(self.mode))
        if not images:
            return torch.empty(0, *self.shape)
        return _image_pixels(images)


class MappedArray:
    """An array stored at a byte offset of a file, memory-mapped read-only on first use. A pickled copy
    (a DataLoader worker's) maps the file anew rather than carrying the array's bytes."""

    def __init__(self, path: Path, offset: int, dtype: np.dtype, shape: tuple[int, ...], fortran_order: bool):
        self.path, self.offset, self.dtype, self.shape, self.fortran_order = path, offset, dtype, shape, fortran_order
        self._array = None

    def array(self) -> np.memmap:
        if self._array is None:
            order = "F" if self.fortran_order else "C"
            self._array = np.memmap(self.path, self.dtype, "r", offset=self.offset, shape=self.shape, order=order)
        return self._array

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}


def open_dataset(name_or_path: str | os.PathLike, *, split: str = "train", seed: int = 0, **options) -> DataSource:
    """Opens a data set for reading rows on demand (see the module's docstring for each kind of data).

    name_or_path, split, seed and options: as for `load_dataset`; a folder whose top level holds
    .npy/.npz files is also accepted: its shards (each an array, or an .npz with "x" or one array and
    optional labels "y") are read as one data set. Shards must agree in sample shape, dtype and in
    having labels; a shard that does not, or cannot be memory-mapped, raises DataFileError naming it.
    """
    check_choice("split", split, SPLITS)
    name = os.fspath(name_or_path)
    if isinstance(name_or_path, str) and name in BUILTIN_DATASETS:
        return InMemorySource(load_dataset(name, split=split, seed=seed, **options))
    path = user_data_path(name, options)
    if path.is_dir():
        shard_paths = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in ARRAY_SUFFIXES)
        if not shard_paths:
            return ImageFolderSource(path, split)
        images = next((p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES), None)
        if images is not None:
            raise ValueError(
                f"{path}: holds array shards ({shard_paths[0].name}) and images ({images.name}); "
                "keep a data set's shards or its images in a folder of their own"
            )
        return _open_shards(str(path), shard_paths, split)
    if path.suffix.lower() not in ARRAY_SUFFIXES:
        raise ValueError(
            f"{path}: unsupported data file; expected a folder of images or a {' / '.join(ARRAY_SUFFIXES)} array"
        )
    if is_compressed_archive(path):
        return InMemorySource(load_dataset(path, split=split))
    return _open_shards(str(path), [path], split)


def _open_shards(name: str, paths: list[Path], split: str) -> ArraySource:
    shards, labels = [], []
    for path in paths:
        shard, shard_labels = map_array_file(path)
        check_array_layout(path, shard.dtype, shard.shape)
        if shards:
            first = shards[0]
            if shard.shape[1:] != first.shape[1:]:
                raise DataFileError(
                    f"{path}: samples of shape {shard.shape[1:]}, but {first.path.name} holds {first.shape[1:]}; "
                    "every shard must hold samples of one shape"
                )
            if shard.dtype != first.dtype:
                raise DataFileError(
                    f"{path}: dtype {shard.dtype}, but {first.path.name} holds {first.dtype}; "
                    "save every shard with one dtype (uint8 is scaled as pixels, other numbers are not)"
                )
            if (shard_labels is None) != (labels[0] is None):
                with_labels, without = (path, first.path) if shard_labels is not None else (first.path, path)
                raise DataFileError(
                    f"{path}: {with_labels.name} has labels 'y' but {without.name} has none; label every shard or none"
                )
        shards.append(shard)
        labels.append(None if shard_labels is None else checked_labels(path, shard_labels, shard.shape[0])[0])
    all_labels = None if labels[0] is None else torch.cat(labels)
    num_classes = 0 if all_labels is None else int(all_labels.max()) + 1
    return ArraySource(name, shards, all_labels, num_classes, split)


def is_compressed_archive(path: Path) -> bool:
    try:
        with open(path, "rb") as file:
            if file.read(2) != b"PK":
                return False
        with zipfile.ZipFile(path) as archive:
            return any(info.compress_type != zipfile.ZIP_STORED for info in archive.infolist())
    except _ARRAY_FILE_ERRORS:
        return False  # map_array_file reports what is wrong with it


def map_array_file(path: Path) -> tuple[MappedArray, np.ndarray | None]:
    """(the data array, mapped; labels 'y' read into memory, or None) of a .npy file or an uncompressed .npz."""
    try:
        with open(path, "rb") as file:
            is_archive = file.read(2) == b"PK"
        if not is_archive:
            return _map_npy(str(path), path, 0, path.stat().st_size), None
        with zipfile.ZipFile(path) as archive:
            members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
            data_key = archive_data_key(path, members)
            info = members[data_key]
            what = f"{path}: array {data_key!r}"
            if info.compress_type != zipfile.ZIP_STORED:
                raise DataFileError(
                    f"{what} is compressed (np.savez_compressed), and a compressed array cannot be memory-mapped; "
                    "save the shards with np.savez or np.save"
                )
            array = _map_npy(what, path, _zip_member_data_offset(path, info), info.file_size)
            if "y" not in members:
                return array, None
            return array, _read_npy(f"{path}: array 'y'", lambda: archive.open(members["y"]), members["y"].file_size)
    except DataFileError:
        raise
    except _ARRAY_FILE_ERRORS as err:
        raise DataFileError(f"{path}: unreadable array file, truncated or corrupt ({err})") from err


def _zip_member_data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Where a stored (uncompressed) member's bytes start in the archive: after its local header."""
    with open(path, "rb") as file:
        file.seek(info.header_offset)
        header = file.read(_ZIP_LOCAL_HEADER.size)
    if len(header) < _ZIP_LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise DataFileError(f"{path}: corrupt archive: no local header for {info.filename!r}")
    *_, name_length, extra_length = _ZIP_LOCAL_HEADER.unpack(header)
    return info.header_offset + _ZIP_LOCAL_HEADER.size + name_length + extra_length


def _map_npy(what: str, path: Path, start: int, stored_bytes: int) -> MappedArray:
    """The .npy array that starts `start` bytes into `path` and takes `stored_bytes`; `what` names it in errors."""
    with open(path, "rb") as stream:
        stream.seek(start)
        version = np.lib.format.read_magic(stream)
        read_header = _NPY_HEADER_READERS.get(version)
        if read_header is None:
            raise DataFileError(f"{what}: .npy format version {version} cannot be memory-mapped; save it with np.save")
        shape, fortran_order, dtype = read_header(stream)
        data_start = stream.tell()
    if dtype.hasobject:
        raise DataFileError(f"{what}: holds Python objects (dtype {dtype}); expected real numbers (float or integer)")
    needed = data_start - start + math.prod(shape) * dtype.itemsize
    if needed > stored_bytes:
        raise DataFileError(
            f"{what}: truncated: its header declares shape {shape} of {dtype} ({needed} bytes "
            f"with the header) but it holds {stored_bytes} bytes"
        )
    return MappedArray(path, data_start, dtype, shape, fortran_order)


def _split_length(total: int, split: str, name: str) -> int:
    held_out = total // HELD_OUT_EVERY  # samples HELD_OUT_EVERY - 1, 2 HELD_OUT_EVERY - 1, ...
    length = {"all": total, "test": held_out, "train": total - held_out}[split]
    if length == 0:
        raise ValueError(
            f"{name} has {total} samples, too few for a {split!r} split "
            f"(every {HELD_OUT_EVERY}th sample is held out); use split='all'"
        )
    return length


def _split_rows_to_data_rows(rows: np.ndarray, split: str) -> np.ndarray:
    """Positions in a split → rows of the whole data: the split of load_dataset, without an index table."""
    if split == "test":
        return rows * HELD_OUT_EVERY + (HELD_OUT_EVERY - 1)
    if split == "train":  # HELD_OUT_EVERY - 1 kept, one skipped
        return rows + rows // (HELD_OUT_EVERY - 1)
    return rows


def data_std(source: DataSource, *, max_rows: int = 65536, seed: int = 0, chunk_rows: int = 1024) -> float:
    """The standard deviation of the source's values (unbiased, in float64), the trainer's default sigma_data.

    All rows when the source has at most max_rows, else max_rows rows drawn without replacement
    from `seed` (an estimate: a full pass over 21 GB of latents takes minutes). Read in chunks of
    chunk_rows, so memory stays at one chunk.
    """
    for arg, value in (("max_rows", max_rows), ("chunk_rows", chunk_rows)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    if len(source) <= max_rows:
        rows = torch.arange(len(source))
    else:
        rows = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))[:max_rows].sort().values
    count, mean, squares = 0, 0.0, 0.0  # squares: the sum of squared deviations from the mean
    for chunk in rows.split(chunk_rows):
        values = source.rows(chunk)[0].double().flatten()
        chunk_mean = values.mean().item()
        chunk_squares = (values - chunk_mean).square().sum().item()
        total = count + values.numel()
        # Chan et al.'s merge of two (count, mean, squares) summaries.
        squares += chunk_squares + (chunk_mean - mean) ** 2 * count * values.numel() / total
        mean += (chunk_mean - mean) * values.numel() / total
        count = total
    return math.sqrt(squares / (count - 1))


class _StepBatches(torch.utils.data.Dataset):
    """What a DataLoader worker computes: the batch of one (step, indices) request."""

    def __init__(self, source: DataSource, flip: bool, seed: int, rank: int) -> None:
        self.source, self.flip, self.seed, self.rank = source, flip, seed, rank

    def __getitem__(self, request: tuple[int, Tensor]) -> tuple[Tensor, Tensor | None]:
        step, indices = request
        x, labels = self.source.rows(indices)
        if self.flip:
            flipped = flip_mask(len(indices), seed=self.seed, rank=self.rank, step=step)
            x[flipped] = x[flipped].flip(-1)
        return x, labels


def flip_mask(size: int, *, seed: int, rank: int, step: int) -> Tensor:
    """Which samples of a rank's batch at `step` BatchLoader mirrors (bool, (size,)): a fair coin each,
    drawn from (seed, rank, step) alone."""
    key = np.random.SeedSequence(seed, spawn_key=(FLIP_STREAM, rank, step)).generate_state(1, np.uint64)[0]
    gen = torch.Generator().manual_seed(int(key >> np.uint64(1)))
    return torch.rand(size, generator=gen) < 0.5


class BatchLoader:
    """The batches of steps start_step, start_step + 1, ... (up to stop_step, or without end), in step order.

    source: where the rows come from (a DataSource). batch_indices: step → this rank's row indices
    (1-D integer tensor, e.g. `Trainer.batch_indices`); it is called in this process, a few steps
    ahead of the batch being yielded (num_workers × prefetch_factor requests in flight).
    num_workers: DataLoader worker processes that read the rows; 0 reads them in this process.
    pin_memory: pin the yielded tensors for fast copies to the GPU (None: when CUDA is available).
    flip: mirror each image left–right with probability 1/2 (images only), the coins drawn from
    (seed, rank, step): see `flip_mask`.

    Each batch is a function of (source, batch_indices(step), seed, rank, step) alone, so the
    batches do not depend on num_workers, and a loader started at step k (or iterated again after
    k batches: `next_step` is where the next iteration starts) yields what an uninterrupted one
    yields from step k. Yields (x float32, labels int64 or None), on the CPU.
    """

    def __init__(
        self,
        source: DataSource,
        batch_indices: Callable[[int], Tensor],
        *,
        start_step: int = 0,
        stop_step: int | None = None,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        pin_memory: bool | None = None,
        flip: bool = False,
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        if not isinstance(source, DataSource):
            raise TypeError(f"source must be a DataSource (see open_dataset), got {type(source).__name__}")
        if not callable(batch_indices):
            raise TypeError(f"batch_indices must be a function step -> indices, got {type(batch_indices).__name__}")
        for arg, value, lowest in (
            ("start_step", start_step, 0),
            ("num_workers", num_workers, 0),
            ("prefetch_factor", prefetch_factor, 1),
            ("seed", seed, 0),
            ("rank", rank, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
                raise ValueError(f"{arg} must be an int >= {lowest}, got {value!r}")
        if stop_step is not None and (not isinstance(stop_step, int) or stop_step < start_step):
            raise ValueError(f"stop_step must be None or an int >= start_step={start_step}, got {stop_step!r}")
        if flip and source.kind != "image":
            raise ValueError(f"flip mirrors images, but {source.name} holds {source.kind}s")
        self.source, self.batch_indices = source, batch_indices
        self.next_step, self.stop_step = start_step, stop_step
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.flip, self.seed, self.rank = flip, seed, rank

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        first = self.next_step
        steps = itertools.count(first) if self.stop_step is None else range(first, self.stop_step)
        requests = ((step, torch.as_tensor(self.batch_indices(step)).cpu()) for step in steps)
        loader = DataLoader(
            _StepBatches(self.source, self.flip, self.seed, self.rank),
            batch_size=None,  # each request is one whole batch
            sampler=requests,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
        )
        for x, labels in loader:
            self.next_step += 1
            yield x, labels


def check_rank_split(
    batch_indices_of: Callable[[int, int], Tensor],
    *,
    steps: range,
    world_size: int,
    group_size: int,
    dataset_size: int,
) -> None:
    """Checks that the ranks' batches split the data as a DistributedSampler would; raises ValueError if not.

    batch_indices_of(rank, step): rank's row indices at step (e.g. each rank's `Trainer.batch_indices`).
    Over `steps`, every rank must take the same number of rows, a multiple of group_size (so the
    IMM groups, consecutive group_size rows of a rank's batch, are never split between ranks), and
    the rows that the ranks take, in (step, rank) order, must walk through epochs of the data: every
    dataset_size consecutive positions (from position 0 of step 0) hold each row once. So no row is seen
    twice in an epoch, by one rank or by two; a batch that crosses an epoch's end can repeat a row of the
    epoch before, as one process's batch would.
    """
    stream, local_batch = [], None
    for step in steps:
        for rank in range(world_size):
            rows = torch.as_tensor(batch_indices_of(rank, step)).cpu().long()
            if local_batch is None:
                local_batch = len(rows)
            if len(rows) % group_size:
                raise ValueError(
                    f"rank {rank} takes {len(rows)} rows at step {step}, not a multiple of group_size={group_size}: "
                    "a group would be split between ranks"
                )
            if len(rows) != local_batch:
                raise ValueError(
                    f"rank {rank} takes {len(rows)} rows at step {step}, but rank 0 took {local_batch} at step "
                    f"{steps.start}; every rank must take the same number"
                )
            if len(rows) and (rows.min() < 0 or rows.max() >= dataset_size):
                raise ValueError(f"rank {rank} takes rows outside [0, {dataset_size}) at step {step}")
            stream.append(rows)
    if not stream:
        return
    rows = torch.cat(stream)
    positions = steps.start * world_size * local_batch + torch.arange(len(rows))
    # Within one epoch the rows are distinct iff (epoch, row) pairs are; a full epoch then holds each row once.
    keys = (positions // dataset_size) * dataset_size + rows
    _, first_of_key, counts = _unique_first(keys)
    if (counts > 1).any():
        repeat = int(first_of_key[counts > 1].min())
        second = int((keys[repeat + 1 :] == keys[repeat]).nonzero()[0]) + repeat + 1
        raise ValueError(
            f"row {int(rows[repeat])} is taken twice in epoch {int(positions[repeat]) // dataset_size}: "
            f"at {_where(repeat, steps, world_size, local_batch)} and {_where(second, steps, world_size, local_batch)}"
        )


def _unique_first(keys: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(unique keys, the position of each one's first occurrence, its count)."""
    unique, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    first = torch.full((len(unique),), len(keys), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(keys)), reduce="amin")
    return unique, first, counts


def _where(position: int, steps: range, world_size: int, local_batch: int) -> str:
    step_offset, within = divmod(position, world_size * local_batch)
    return f"step {steps.start + step_offset}, rank {within // local_batch}"
