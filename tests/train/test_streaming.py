"""Data read on demand: memory-mapped arrays and shard folders, lazily decoded image folders, the
built-ins through one interface, the split, the batch loader (workers, flips, resume), the rank split."""

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imm_kernels.train.data import DataFileError, load_dataset
from imm_kernels.train.streaming import (
    ArraySource,
    BatchLoader,
    ImageFolderSource,
    InMemorySource,
    check_rank_split,
    data_std,
    flip_mask,
    open_dataset,
)
from imm_kernels.train.trainer import ProcessInfo, TrainConfig, Trainer


def all_rows(source):
    return source.rows(torch.arange(len(source)))


def assert_same_data(source, dataset):
    assert len(source) == len(dataset) and source.shape == dataset.shape
    assert (source.kind, source.num_classes, source.name) == (dataset.kind, dataset.num_classes, dataset.name)
    x, labels = all_rows(source)
    assert x.dtype == torch.float32 and torch.equal(x, dataset.x)
    assert (labels is None) == (dataset.labels is None) and source.labelled == (dataset.labels is not None)
    if labels is not None:
        assert labels.dtype == torch.int64 and torch.equal(labels, dataset.labels)
    # Any order, repeats included, as a trainer's shuffled batch asks.
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(0)).repeat(2)
    x, labels = source.rows(order)
    assert torch.equal(x, dataset.x[order])
    if labels is not None:
        assert torch.equal(labels, dataset.labels[order])


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


# Memory-mapped arrays


def test_npy_rows_are_read_from_the_file_not_a_copy(tmp_path):
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    np.save(tmp_path / "x.npy", x)
    source = open_dataset(tmp_path / "x.npy", split="all")
    assert isinstance(source, ArraySource) and isinstance(source.shards[0].array(), np.memmap)
    assert torch.equal(source.rows(torch.tensor([7]))[0], torch.from_numpy(x[7:8]))
    # Rewrite row 7 in place (the data ends the file): a mapping sees it, a loaded copy would not.
    with open(tmp_path / "x.npy", "r+b") as file:
        file.seek(-3 * x[0].nbytes, 2)
        file.write(np.full(4, -5, np.float32).tobytes())
    assert torch.equal(source.rows(torch.tensor([7]))[0], torch.full((1, 4), -5.0))


def test_opening_a_large_array_reads_only_the_rows_asked_for(tmp_path):
    # 256 MiB of latents as a sparse file: the header, then zeros the disk does not store.
    path, shape = tmp_path / "latents.npy", (4096, 4, 64, 64)
    with open(path, "wb") as file:
        np.lib.format.write_array_header_1_0(file, {"descr": "<f4", "fortran_order": False, "shape": shape})
        file.truncate(file.tell() + int(np.prod(shape)) * 4)
    before = rss_bytes()
    source = open_dataset(path, split="train")
    x, labels = source.rows(torch.tensor([0, 3000, 17, 2048] * 16))
    grown = rss_bytes() - before
    assert x.shape == (64, 4, 64, 64) and labels is None and not x.any()
    assert grown < 32 * 2**20, f"opening and reading 64 rows grew the process by {grown / 2**20:.0f} MiB"
    # What goes to a DataLoader worker is the file's name, not its bytes.
    assert len(pickle.dumps(source)) < 10_000


def test_uncompressed_npz_is_mapped_and_a_compressed_one_is_loaded(tmp_path):
    x = np.random.default_rng(0).normal(size=(12, 3, 2, 2)).astype(np.float32)
    labels = np.arange(12) % 4
    np.savez(tmp_path / "stored.npz", y=labels, x=x)  # 'y' first: x's offset is not the archive's first member's
    source = open_dataset(tmp_path / "stored.npz")
    assert isinstance(source, ArraySource) and isinstance(source.shards[0].array(), np.memmap)
    assert_same_data(source, load_dataset(tmp_path / "stored.npz"))

    np.save(tmp_path / "fortran.npy", np.asfortranarray(x))  # a column-major array is mapped as one
    assert_same_data(open_dataset(tmp_path / "fortran.npy"), load_dataset(tmp_path / "fortran.npy"))

    np.savez_compressed(tmp_path / "compressed.npz", x=x, y=labels)
    source = open_dataset(tmp_path / "compressed.npz", split="test")
    assert isinstance(source, InMemorySource)
    assert_same_data(source, load_dataset(tmp_path / "compressed.npz", split="test"))


def write_shards(folder, x, labels=None, sizes=(5, 9, 1, 7), suffix=".npz"):
    """x (and labels) cut into shards of `sizes` rows, named so that sorting restores the order;
    written last shard first, so that reading them in the order they were made would be wrong."""
    folder.mkdir(parents=True, exist_ok=True)
    starts = np.cumsum((0, *sizes))
    for i in reversed(range(len(sizes))):
        part = slice(starts[i], starts[i + 1])
        path = folder / f"shard_{i:03d}{suffix}"
        if suffix == ".npy":
            np.save(path, x[part])
        else:
            np.savez(path, x=x[part], **({} if labels is None else {"y": labels[part]}))
    return folder


@pytest.mark.parametrize("split", ["train", "test", "all"])
def test_shard_folder_reads_as_the_concatenated_array(tmp_path, split):
    x = np.random.default_rng(1).normal(size=(22, 2, 3, 3)).astype(np.float32)
    labels = np.random.default_rng(2).integers(0, 5, 22)
    np.savez(tmp_path / "whole.npz", x=x, y=labels)
    source = open_dataset(write_shards(tmp_path / "shards", x, labels), split=split)
    expected = load_dataset(tmp_path / "whole.npz", split=split)
    assert len(source.shards) == 4
    assert_same_data(source, dataclasses.replace(expected, name=str(tmp_path / "shards")))

    pixels = np.random.default_rng(3).integers(0, 256, (22, 6), dtype=np.uint8)  # uint8: scaled as pixels
    np.save(tmp_path / "pixels.npy", pixels)
    source = open_dataset(write_shards(tmp_path / "pixel_shards", pixels, suffix=".npy"), split=split)
    expected = load_dataset(tmp_path / "pixels.npy", split=split)
    assert source.kind == "vector" and source.num_classes == 0
    assert torch.equal(all_rows(source)[0], expected.x)


def save(path, **arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    "second, match",
    [
        ({"x": np.zeros((3, 1, 2, 5), np.float32)}, r"samples of shape \(1, 2, 5\), but shard_0.npz holds \(1, 2, 4\)"),
        ({"x": np.zeros((3, 8), np.float32)}, r"samples of shape \(8,\), but shard_0.npz holds \(1, 2, 4\)"),
        ({"x": np.zeros((3, 1, 2, 4), np.float64)}, "dtype float64, but shard_0.npz holds float32"),
        ({"x": np.zeros((3, 1, 2, 4), np.float32)}, "shard_0.npz has labels 'y' but shard_1.npz has none"),
        (
            {"x": np.zeros((3, 1, 2, 4), np.float32), "y": np.zeros(2, int)},
            "labels 'y' has 2 entries but the data has 3",
        ),
        ({"x": np.zeros((3, 1, 2, 4), np.float32), "y": -np.ones(3, int)}, ">= 0"),
        ({"a": np.zeros((3, 1, 2, 4), np.float32), "b": np.zeros(3)}, "key 'x' or exactly one array"),
        ({"x": np.zeros((0, 1, 2, 4), np.float32), "y": np.zeros(0, int)}, "empty"),
        ({"x": np.array([[[["a"] * 4] * 2]] * 3)}, "dtype <U1; expected real numbers"),
    ],
)
def test_a_mismatched_shard_is_named(tmp_path, second, match):
    save(tmp_path / "shards/shard_0.npz", x=np.zeros((3, 1, 2, 4), np.float32), y=np.zeros(3, int))
    save(tmp_path / "shards/shard_1.npz", **second)
    with pytest.raises(DataFileError, match=match) as error:
        open_dataset(tmp_path / "shards")
    assert "shard_1.npz" in str(error.value)


def test_shards_that_cannot_be_mapped_are_named(tmp_path):
    (tmp_path / "a").mkdir()
    np.savez(tmp_path / "a/shard_0.npz", x=np.zeros((3, 2)))
    np.savez_compressed(tmp_path / "a/shard_1.npz", x=np.zeros((3, 2)))
    with pytest.raises(DataFileError, match=r"shard_1.npz: array 'x' is compressed .*np.savez or np.save"):
        open_dataset(tmp_path / "a")

    (tmp_path / "b").mkdir()
    np.save(tmp_path / "b/shard_0.npy", np.zeros((3, 2)))
    np.save(tmp_path / "b/shard_1.npy", np.zeros((3, 2)))
    data = (tmp_path / "b/shard_1.npy").read_bytes()
    (tmp_path / "b/shard_1.npy").write_bytes(data[:-8])
    with pytest.raises(DataFileError, match=r"shard_1.npy: truncated: its header declares shape \(3, 2\)"):
        open_dataset(tmp_path / "b")
    (tmp_path / "b/shard_1.npy").write_bytes(data[:5])
    with pytest.raises(DataFileError, match="shard_1.npy: unreadable array file"):
        open_dataset(tmp_path / "b")
    np.save(tmp_path / "b/shard_1.npy", np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True)
    with pytest.raises(DataFileError, match=r"shard_1.npy: holds Python objects"):
        open_dataset(tmp_path / "b")


def test_nan_is_reported_with_its_shard_and_row_when_read(tmp_path):
    bad = np.zeros((4, 3), np.float32)
    bad[2, 1] = np.nan
    np.save(tmp_path / "shard_0.npy", np.zeros((5, 3), np.float32))
    np.save(tmp_path / "shard_1.npy", bad)
    source = open_dataset(tmp_path, split="all")  # opening reads no rows
    assert source.rows(torch.tensor([0, 6, 8]))[0].abs().sum() == 0
    with pytest.raises(DataFileError, match="shard_1.npy: row 2 contains NaN"):
        source.rows(torch.tensor([0, 7]))
    # From a DataLoader worker too, as the same error.
    loader = BatchLoader(source, lambda step: torch.tensor([step, 7]), num_workers=1)
    with pytest.raises(DataFileError, match="shard_1.npy: row 2 contains NaN"):
        next(iter(loader))


def test_folders_and_files_open_dataset_refuses(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_data"):
        open_dataset("no_such_data")
    with pytest.raises(ValueError, match="split"):
        open_dataset("digits", split="val")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="unsupported data file"):
        open_dataset(tmp_path / "notes.txt")
    np.save(tmp_path / "x.npy", np.zeros((3, 2)))
    with pytest.raises(TypeError, match="no options"):
        open_dataset(tmp_path / "x.npy", toy="checkerboard")
    with pytest.raises(ValueError, match="too few for a 'test' split"):
        open_dataset(tmp_path / "x.npy", split="test")
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"holds array shards \(x.npy\) and images \(a.png\)"):
        open_dataset(tmp_path)


# The split and the built-ins


@pytest.mark.parametrize("num_rows", range(1, 13))
def test_the_split_is_load_datasets(tmp_path, num_rows):
    np.save(tmp_path / "x.npy", np.arange(num_rows * 2, dtype=np.float32).reshape(num_rows, 2))
    for split in ("train", "test", "all"):
        try:
            expected = load_dataset(tmp_path / "x.npy", split=split)
        except ValueError as eager_error:
            with pytest.raises(ValueError) as lazy_error:
                open_dataset(tmp_path / "x.npy", split=split)
            assert str(lazy_error.value) == str(eager_error)
            continue
        assert_same_data(open_dataset(tmp_path / "x.npy", split=split), expected)


@pytest.mark.parametrize("name, options", [("digits", {}), ("toy2d", {"toy": "8gaussians"}), ("checkerboard", {})])
@pytest.mark.parametrize("split", ["train", "test"])
def test_builtins_through_the_same_interface(name, options, split):
    source = open_dataset(name, split=split, seed=3, **options)
    assert isinstance(source, InMemorySource)
    assert_same_data(source, load_dataset(name, split=split, seed=3, **options))


def test_rows_takes_1d_integer_indices_in_range():
    source = open_dataset("digits", split="test")
    assert source.rows(torch.tensor([], dtype=torch.long))[0].shape == (0, 1, 8, 8)
    with pytest.raises(TypeError, match="1-D integer"):
        source.rows(torch.tensor([0.0]))
    with pytest.raises(TypeError, match="1-D integer"):
        source.rows(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(IndexError, match=r"\[0, 355\)"):  # 355 held-out digits
        source.rows(torch.tensor([0, 355]))
    with pytest.raises(IndexError, match=r"\[0, 355\)"):
        source.rows(torch.tensor([-1]))


# Image folders


def write_png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode).save(path)


@pytest.mark.parametrize("split", ["train", "test", "all"])
def test_image_folder_decoded_on_access_equals_the_eager_loader(tmp_path, split):
    rng = np.random.default_rng(0)
    for i in range(11):  # grayscale, RGB and palette images: RGB for all, as load_dataset does
        pixels = rng.integers(0, 256, (5, 6) if i % 3 else (5, 6, 3))
        write_png(tmp_path / "labelled" / f"class_{i % 3}" / f"{i:02d}.png", pixels)
    Image.fromarray(rng.integers(0, 256, (5, 6), dtype=np.uint8)).convert("P").save(tmp_path / "labelled/class_1/p.png")
    for i in range(6):
        write_png(tmp_path / "gray" / f"{i}.png", rng.integers(0, 256, (4, 4)))
    for folder, channels in (("labelled", 3), ("gray", 1)):
        source = open_dataset(tmp_path / folder, split=split)
        assert isinstance(source, ImageFolderSource) and source.shape[0] == channels
        assert_same_data(source, load_dataset(tmp_path / folder, split=split))


def test_image_folder_checks_sizes_up_front_and_pixels_when_read(tmp_path):
    write_png(tmp_path / "sizes/a.png", np.zeros((4, 4)))
    write_png(tmp_path / "sizes/b.png", np.zeros((4, 5)))
    with pytest.raises(DataFileError) as eager:
        load_dataset(tmp_path / "sizes")
    with pytest.raises(DataFileError) as lazy:
        open_dataset(tmp_path / "sizes")
    assert str(lazy.value) == str(eager.value) and "images differ in size" in str(lazy.value)

    # A truncated PNG: its header reads, its pixels do not; the error comes with the row that needs it.
    for name in ("a", "b"):
        write_png(tmp_path / "broken" / f"{name}.png", np.random.default_rng(0).integers(0, 256, (64, 64)))
    (tmp_path / "broken/b.png").write_bytes((tmp_path / "broken/b.png").read_bytes()[:300])
    source = open_dataset(tmp_path / "broken", split="all")
    assert source.rows(torch.tensor([0]))[0].shape == (1, 1, 64, 64)
    with pytest.raises(DataFileError, match="b.png: unreadable image"):
        source.rows(torch.tensor([1]))


# The batch loader


def shuffled_batches(size, batch, seed=0):
    """A stand-in for Trainer.batch_indices: a batch of distinct rows, drawn from (seed, step)."""
    return lambda step: torch.randperm(size, generator=torch.Generator().manual_seed(seed * 1000 + step))[:batch]


def collect(loader, count=None):
    batches = []
    for x, labels in loader:
        batches.append((x, labels))
        if len(batches) == count:
            break
    return batches


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for (x1, labels1), (x2, labels2) in zip(first, second):
        assert torch.equal(x1, x2)
        assert (labels1 is None and labels2 is None) or torch.equal(labels1, labels2)


@pytest.fixture(scope="module")
def latent_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("latents")
    x = np.random.default_rng(4).normal(size=(60, 4, 3, 5)).astype(np.float32)
    return write_shards(folder, x, np.arange(60) % 7, sizes=(20, 25, 15))


@pytest.mark.parametrize("flip", [False, True])
def test_batches_do_not_depend_on_the_number_of_workers(latent_shards, flip):
    source = open_dataset(latent_shards)
    indices = shuffled_batches(len(source), 8)
    serial = collect(BatchLoader(source, indices, stop_step=6, flip=flip, seed=1))
    parallel = collect(BatchLoader(source, indices, stop_step=6, num_workers=2, prefetch_factor=3, flip=flip, seed=1))
    assert_same_batches(serial, parallel)
    for step, (x, labels) in enumerate(serial):
        expected_x, expected_labels = source.rows(indices(step))
        assert torch.equal(labels, expected_labels)
        assert torch.equal(x, expected_x) != (flip and flip_mask(8, seed=1, rank=0, step=step).any())


def test_flips_are_drawn_from_seed_rank_and_step_and_mirror_images_only(latent_shards):
    source = open_dataset(latent_shards, split="all")
    indices = shuffled_batches(len(source), 16)
    batches = collect(BatchLoader(source, indices, stop_step=4, flip=True, seed=2, rank=1))
    for step, (x, _) in enumerate(batches):
        plain, _ = source.rows(indices(step))
        mirrored = flip_mask(16, seed=2, rank=1, step=step)
        assert torch.equal(x[mirrored], plain[mirrored].flip(-1)) and torch.equal(x[~mirrored], plain[~mirrored])
    # Each (seed, rank, step) draws its own coins; the same key always the same ones.
    masks = {
        key: flip_mask(64, seed=key[0], rank=key[1], step=key[2])
        for key in [(2, 1, 0), (2, 1, 1), (3, 1, 0), (2, 0, 0)]
    }
    assert all(torch.equal(mask, flip_mask(64, seed=s, rank=r, step=t)) for (s, r, t), mask in masks.items())
    assert len({tuple(mask.tolist()) for mask in masks.values()}) == 4
    share = torch.stack([flip_mask(64, seed=0, rank=0, step=step) for step in range(100)]).float().mean()
    assert 0.45 < share < 0.55

    with pytest.raises(ValueError, match="flip mirrors images, but toy2d:checkerboard holds vectors"):
        BatchLoader(open_dataset("checkerboard"), indices, flip=True)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_loader_resumes_where_another_stopped(latent_shards, num_workers):
    source = open_dataset(latent_shards, split="train")
    indices = shuffled_batches(len(source), 6, seed=5)
    options = dict(flip=True, seed=5, num_workers=num_workers)
    uninterrupted = collect(BatchLoader(source, indices, stop_step=9, **options))
    # A new loader started at step 4, as a resumed run makes one.
    assert_same_batches(collect(BatchLoader(source, indices, start_step=4, stop_step=9, **options)), uninterrupted[4:])
    # One loader left after 3 batches (its workers had read ahead) and iterated again.
    loader = BatchLoader(source, indices, **options)
    first = collect(loader, count=3)
    assert loader.next_step == 3
    assert_same_batches(first + collect(loader, count=6), uninterrupted)
    assert loader.next_step == 9


def test_loader_works_on_in_memory_and_image_sources(tmp_path):
    for i in range(10):
        write_png(tmp_path / f"c{i % 2}" / f"{i}.png", np.full((3, 3), 20 * i))
    images = open_dataset(tmp_path, split="all")
    batches = collect(BatchLoader(images, lambda step: torch.tensor([step, 9 - step]), stop_step=3, num_workers=2))
    assert [labels.tolist() for _, labels in batches] == [[0, 1]] * 3
    assert torch.equal(batches[1][0], images.rows(torch.tensor([1, 8]))[0])
    toy = open_dataset("checkerboard", split="all", num_samples=50)
    x, labels = next(iter(BatchLoader(toy, lambda step: torch.arange(5), pin_memory=False)))
    assert labels is None and torch.equal(x, toy.x[:5])


def test_loader_arguments():
    source = open_dataset("digits")
    with pytest.raises(TypeError, match="DataSource"):
        BatchLoader(load_dataset("digits"), lambda step: torch.arange(4))
    with pytest.raises(ValueError, match="num_workers"):
        BatchLoader(source, lambda step: torch.arange(4), num_workers=-1)
    with pytest.raises(ValueError, match="stop_step"):
        BatchLoader(source, lambda step: torch.arange(4), start_step=3, stop_step=2)


# The trainer's rank split


def test_the_trainers_ranks_take_whole_groups_and_disjoint_rows_per_epoch():
    config = TrainConfig(data="digits", batch=32, group_size=4, width=16, depth=1, seed=5, device="cpu")
    trainers = [Trainer(config, None, process=ProcessInfo(rank, 2, 0), progress=False) for rank in range(2)]
    size = len(trainers[0].train_x)  # 1438: an epoch is 44.9 steps, so these steps cross two epochs' ends
    check_rank_split(
        lambda rank, step: trainers[rank].batch_indices(step),
        steps=range(3, 100),
        world_size=2,
        group_size=4,
        dataset_size=size,
    )
    # The check fails when both ranks take rank 0's rows, or a rank's batch splits a group.
    with pytest.raises(ValueError, match=r"taken twice in epoch 0: at step 3, rank 0 and step 3, rank 1"):
        check_rank_split(
            lambda rank, step: trainers[0].batch_indices(step),
            steps=range(3, 5),
            world_size=2,
            group_size=4,
            dataset_size=size,
        )
    with pytest.raises(ValueError, match="rank 0 takes 16 rows at step 0, not a multiple of group_size=32"):
        check_rank_split(
            lambda rank, step: trainers[rank].batch_indices(step),
            steps=range(2),
            world_size=2,
            group_size=32,
            dataset_size=size,
        )


def test_rank_split_check_on_a_small_epoch():
    # 10 rows, 2 ranks of 2: step 2 crosses the first epoch's end, where row order restarts.
    orders = [torch.tensor([3, 1, 4, 0, 9, 2, 6, 5, 8, 7]), torch.tensor([3, 0, 1, 2, 4, 5, 6, 7, 8, 9])]

    def epoch_stream(rank, step):
        positions = torch.arange(step * 4 + rank * 2, step * 4 + rank * 2 + 2)
        return torch.stack([orders[int(p) // 10][int(p) % 10] for p in positions])

    check_rank_split(epoch_stream, steps=range(5), world_size=2, group_size=2, dataset_size=10)
    with pytest.raises(ValueError, match=r"row 3 is taken twice in epoch 1: at step 2, rank 1 and step 4, rank 0"):
        check_rank_split(
            lambda rank, step: torch.tensor([3, 3]) if (step, rank) == (4, 0) else epoch_stream(rank, step),
            steps=range(5),
            world_size=2,
            group_size=2,
            dataset_size=10,
        )
    with pytest.raises(ValueError, match="rank 1 takes 4 rows at step 0, but rank 0 took 2 at step 0"):
        check_rank_split(
            lambda rank, step: torch.arange(2 + 2 * rank), steps=range(1), world_size=2, group_size=2, dataset_size=10
        )
    with pytest.raises(ValueError, match=r"rows outside \[0, 10\)"):
        check_rank_split(
            lambda rank, step: torch.tensor([0, 10]), steps=range(1), world_size=1, group_size=2, dataset_size=10
        )


# sigma_data


def test_data_std_is_the_in_memory_std_and_a_sample_estimates_it(latent_shards):
    for name in ("digits", "8gaussians"):
        expected = load_dataset(name).x.std().item()
        assert data_std(open_dataset(name), chunk_rows=100) == pytest.approx(expected, rel=1e-6)
    source = open_dataset(latent_shards, split="all")
    exact = data_std(source)
    assert exact == pytest.approx(all_rows(source)[0].double().std().item(), rel=1e-12)
    assert data_std(source, max_rows=30, seed=1) == pytest.approx(data_std(source, max_rows=30, seed=1, chunk_rows=7))
    assert data_std(source, max_rows=30, seed=1) == pytest.approx(exact, rel=0.1)
