"""Data sets: built-ins, user folders and arrays, the fixed split, bad-data errors, PNG writers."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imm_kernels.train.data import DataFileError, digits_split_indices, load_dataset, save_image_grid, save_scatter_plot


def test_digits_shapes_range_and_labels():
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    assert len(train) == 1085 and len(test) == 355  # and 357 for the digits metric's classifier
    for ds in (train, test):
        assert ds.x.dtype == torch.float32 and ds.x.shape[1:] == (1, 8, 8) and ds.shape == (1, 8, 8)
        assert ds.kind == "image" and ds.num_classes == 10
        assert ds.x.min() == -1.0 and ds.x.max() == 1.0
        assert ds.labels.dtype == torch.int64 and ds.labels.shape == (len(ds),)
        assert set(ds.labels.tolist()) == set(range(10))


def test_digits_split_is_per_class_disjoint_and_seed_independent():
    everything = load_dataset("digits", split="all")
    test = load_dataset("digits", split="test")
    train = load_dataset("digits", split="train", seed=3)
    position = torch.empty(len(everything), dtype=torch.long)  # each digit's number within its class, mod 5
    for digit in range(10):
        rows = (everything.labels == digit).nonzero().squeeze(1)
        position[rows] = torch.arange(len(rows)) % 5
    expected = {"test": position == 4, "classifier": position == 3, "train": position <= 2}
    for split, keep in expected.items():
        assert torch.equal(digits_split_indices(split), keep.nonzero().squeeze(1)), split
    assert torch.equal(test.x, everything.x[expected["test"]]) and torch.equal(
        test.labels, everything.labels[expected["test"]]
    )
    assert torch.equal(train.x, everything.x[expected["train"]])
    assert torch.equal(train.x, load_dataset("digits", split="train", seed=0).x)
    # Stratified: each class is within two digits of a fifth (three fifths for train) of its digits.
    class_sizes = torch.bincount(everything.labels)
    for split, share in (("test", 1 / 5), ("classifier", 1 / 5), ("train", 3 / 5)):
        counts = torch.bincount(everything.labels[digits_split_indices(split)], minlength=10)
        assert ((counts - share * class_sizes).abs() < 2).all(), (split, counts)
    with pytest.raises(ValueError, match="split"):
        digits_split_indices("val")


@pytest.mark.parametrize("toy", ["checkerboard", "8gaussians"])
def test_toy2d_unit_std_split_and_seeding(toy):
    train = load_dataset(toy, split="train", seed=1)
    test = load_dataset("toy2d", split="test", seed=1, toy=toy)
    assert train.x.shape == (8000, 2) and test.x.shape == (2000, 2) and train.x.dtype == torch.float32
    assert train.kind == "vector" and train.labels is None and train.num_classes == 0 and train.shape == (2,)
    assert torch.allclose(train.x.std(0), torch.ones(2), atol=0.05)
    assert torch.allclose(train.x.mean(0), torch.zeros(2), atol=0.05)
    assert torch.equal(train.x, load_dataset(toy, seed=1).x)
    assert not torch.equal(train.x, load_dataset(toy, seed=2).x)
    assert len(load_dataset(toy, split="all", num_samples=100)) == 100


def test_checkerboard_points_lie_on_the_dark_squares():
    x = load_dataset("checkerboard", split="all").x.double() * (4 / math.sqrt(12))
    assert x.abs().max() <= 2.0
    assert ((x.floor().sum(1) % 2) == 0).all()


def test_eight_gaussians_has_eight_balanced_modes():
    x = load_dataset("8gaussians", split="all", num_samples=16000).x.double()
    mode = torch.round(torch.atan2(x[:, 1], x[:, 0]) / (2 * math.pi / 8)).long() % 8
    counts = torch.bincount(mode, minlength=8)
    assert counts.min() > 1700 and counts.max() < 2300
    radius = 1 / math.sqrt(0.5 + 0.125**2)
    assert abs(x.norm(dim=1).mean().item() - radius) < 0.05 * radius


def test_bad_names_splits_and_options():
    with pytest.raises(FileNotFoundError, match="no_such_data"):
        load_dataset("no_such_data")
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", split="val")
    with pytest.raises(ValueError, match="toy"):
        load_dataset("toy2d", toy="spirals")
    with pytest.raises(ValueError, match="num_samples"):
        load_dataset("checkerboard", num_samples=0)
    with pytest.raises(TypeError, match="digits takes no options"):
        load_dataset("digits", toy="checkerboard")


def write_png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode).save(path)


def test_image_folder_labelled_by_subfolder_round_trip(tmp_path):
    # Height 4, width 6; pixel values encode (image, row, col) so the order is checked too.
    for i in range(10):
        pixels = (np.arange(24).reshape(4, 6) * 10 + i) % 256
        write_png(tmp_path / ("cats" if i < 6 else "ants") / f"{i:02d}.png", pixels)
    ds = load_dataset(tmp_path, split="all")
    assert ds.x.shape == (10, 1, 4, 6) and ds.kind == "image" and ds.num_classes == 2
    # Files sorted by path: ants/06..09, then cats/00..05; classes sorted: ants=0, cats=1.
    order = [6, 7, 8, 9, 0, 1, 2, 3, 4, 5]
    expected = torch.tensor(np.stack([(np.arange(24).reshape(4, 6) * 10 + i) % 256 for i in order]))
    assert torch.equal(ds.x[:, 0], expected.float() / 127.5 - 1)
    assert ds.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert len(load_dataset(tmp_path, split="train")) == 8


def test_image_folder_rgb_unlabelled_and_jpeg(tmp_path):
    write_png(tmp_path / "a.png", np.full((5, 5, 3), (255, 0, 128)))
    write_png(tmp_path / "b.png", np.full((5, 5), 0))  # grayscale mixed with RGB becomes RGB
    Image.fromarray(np.full((5, 5), 255, np.uint8)).save(tmp_path / "c.JPG", quality=95)
    ds = load_dataset(tmp_path, split="all")
    assert ds.x.shape == (3, 3, 5, 5) and ds.labels is None and ds.num_classes == 0
    assert torch.equal(ds.x[0, :, 0, 0], torch.tensor([255.0, 0.0, 128.0]) / 127.5 - 1)
    assert torch.equal(ds.x[1], torch.full((3, 5, 5), -1.0))
    assert torch.allclose(ds.x[2], torch.ones(3, 5, 5), atol=2 / 127.5)


def test_local_folder_named_like_a_builtin(tmp_path, monkeypatch):
    write_png(tmp_path / "digits" / "a.png", np.zeros((3, 3)))
    monkeypatch.chdir(tmp_path)
    assert load_dataset(Path("digits"), split="all").shape == (1, 3, 3)
    assert load_dataset("./digits", split="all").shape == (1, 3, 3)
    assert load_dataset("digits", split="all").shape == (1, 8, 8)


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no .png"):
        load_dataset(tmp_path)

    write_png(tmp_path / "mixed" / "a.png", np.zeros((4, 4)))
    write_png(tmp_path / "mixed" / "b.png", np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"differ in size.*a.png is 4×4.*b.png is 5×4"):
        load_dataset(tmp_path / "mixed")

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"x.png: unreadable image"):
        load_dataset(tmp_path / "broken")

    write_png(tmp_path / "half" / "top.png", np.zeros((4, 4)))
    write_png(tmp_path / "half" / "cls" / "inner.png", np.zeros((4, 4)))
    with pytest.raises(ValueError, match="both at the top level"):
        load_dataset(tmp_path / "half")

    (tmp_path / "deep").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(tmp_path / "deep" / "d.png")
    with pytest.raises(ValueError, match="16-bit"):
        load_dataset(tmp_path / "deep")

    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="unsupported data file"):
        load_dataset(tmp_path / "notes.txt")
    with pytest.raises(TypeError, match="no options"):
        load_dataset(tmp_path / "mixed", toy="checkerboard")


def test_array_files_round_trip(tmp_path):
    latents = np.random.default_rng(0).normal(size=(12, 4, 2, 2)).astype(np.float32) * 3
    np.save(tmp_path / "latents.npy", latents)
    ds = load_dataset(tmp_path / "latents.npy", split="all")
    assert ds.kind == "image" and ds.labels is None and torch.equal(ds.x, torch.from_numpy(latents))
    assert torch.equal(load_dataset(tmp_path / "latents.npy", split="test").x, torch.from_numpy(latents[4::5]))

    vectors = np.arange(30, dtype=np.float64).reshape(10, 3)
    labels = np.array([0, 2, 1, 2, 0, 1, 1, 2, 0, 0], dtype=np.int32)
    np.savez(tmp_path / "vec.npz", x=vectors, y=labels, extra=np.zeros(3))
    ds = load_dataset(tmp_path / "vec.npz", split="all")
    assert ds.kind == "vector" and ds.shape == (3,) and ds.x.dtype == torch.float32
    assert torch.equal(ds.x, torch.from_numpy(vectors).float())
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == labels.tolist() and ds.num_classes == 3

    np.savez(tmp_path / "only.npz", images=np.full((5, 1, 2, 2), 255, np.uint8))
    assert torch.equal(load_dataset(tmp_path / "only.npz", split="all").x, torch.ones(5, 1, 2, 2))


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"x": np.zeros(10)}, r"shape \(10,\); expected \(N, D\)"),
        ({"x": np.zeros((10, 8, 8))}, "add a channel axis"),
        ({"x": np.array([["a", "b"]] * 5)}, "dtype <U1; expected real numbers"),
        ({"x": np.zeros((5, 2), bool)}, "dtype bool"),
        ({"x": np.zeros((5, 2), np.complex64)}, "dtype complex64"),
        ({"x": np.zeros((0, 2))}, "empty"),
        ({"x": np.array([[0.0, np.nan]] * 5)}, "NaN"),
        ({"x": np.zeros((5, 2)), "y": np.zeros(4, int)}, "labels 'y' has 4 entries but the data has 5"),
        ({"x": np.zeros((5, 2)), "y": np.zeros(5)}, "1-D integer"),
        ({"x": np.zeros((5, 2)), "y": -np.ones(5, int)}, ">= 0"),
        ({"a": np.zeros((5, 2)), "b": np.zeros((5, 2))}, r"key 'x' or exactly one array.*\['a', 'b'\]"),
    ],
)
def test_array_file_errors(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=match):
        load_dataset(path, split="all")


def test_unreadable_and_too_small_array_files(tmp_path):
    (tmp_path / "junk.npy").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.npy: unreadable, truncated or corrupt"):
        load_dataset(tmp_path / "junk.npy")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(ValueError, match="objects.npy: unreadable"):
        load_dataset(tmp_path / "objects.npy")
    np.save(tmp_path / "three.npy", np.zeros((3, 2)))
    assert len(load_dataset(tmp_path / "three.npy", split="train")) == 3
    with pytest.raises(ValueError, match="too few for a 'test' split"):
        load_dataset(tmp_path / "three.npy", split="test")


def test_image_grid_png_layout_and_values(tmp_path):
    images = torch.linspace(-1, 1, 10).view(10, 1, 1, 1).expand(10, 1, 3, 3).clone()
    images[9] = 5.0  # clipped to white
    path = save_image_grid(images, tmp_path / "grid.png", nrow=4, upscale=2)
    with Image.open(path) as png:
        assert png.mode == "L" and png.size == (4 * (6 + 2) + 2, 3 * (6 + 2) + 2)
        array = np.asarray(png)
    # Image i sits at row i // 4, column i % 4, each cell 6×6 after the 2-pixel padding.
    for i in range(10):
        top, left = 2 + (i // 4) * 8, 2 + (i % 4) * 8
        cell = array[top : top + 6, left : left + 6]
        expected = round((min(images[i, 0, 0, 0].item(), 1.0) + 1) * 127.5)
        assert (cell == expected).all(), i

    rgb = save_image_grid(torch.zeros(3, 3, 8, 8), tmp_path / "rgb.png")
    with Image.open(rgb) as png:
        assert png.mode == "RGB" and png.size == (3 * (64 + 2) + 2, 64 + 4)  # 8×8 shown 64 pixels across
    with pytest.raises(ValueError, match="C = 1 or 3"):
        save_image_grid(torch.zeros(2, 4, 8, 8), tmp_path / "latents.png")
    with pytest.raises(ValueError, match="nrow"):
        save_image_grid(torch.zeros(2, 1, 8, 8), tmp_path / "x.png", nrow=0)


def test_scatter_plot_puts_points_where_they_are(tmp_path):
    jitter = 0.01 * torch.randn(20, 2, generator=torch.Generator().manual_seed(0))
    points = torch.tensor([[0.5, 0.5]]) + jitter
    path = save_scatter_plot(points, tmp_path / "scatter.png", extent=1.0, size=128)
    with Image.open(path) as png:
        assert png.size == (128, 128)
        dark = np.asarray(png) < 100
    rows, cols = np.nonzero(dark)
    # (0.5, 0.5) is the centre of the upper-right quadrant: pixel (row 32, col 95) or so.
    assert len(rows) > 0 and (abs(rows - 32) <= 3).all() and (abs(cols - 95) <= 3).all()
    with pytest.raises(ValueError, match=r"points must be an \(N, 2\)"):
        save_scatter_plot(torch.zeros(5, 3), tmp_path / "bad.png")


def flip_bytes(path, start, stop):
    data = bytearray(path.read_bytes())
    for i in range(start, stop):
        data[i] ^= 0x55
    path.write_bytes(bytes(data))


def npy_header_only(file, shape):
    """A .npy header declaring `shape` of float32, followed by 64 bytes instead of its data."""
    np.lib.format.write_array_header_1_0(file, {"descr": "<f4", "fortran_order": False, "shape": shape})
    file.write(b"\0" * 64)


def truncated_npz(path):
    np.savez(path, x=np.zeros((50, 3)))
    path.write_bytes(path.read_bytes()[:300])


def corrupt_compressed_npz(path):
    np.savez_compressed(path, x=np.random.default_rng(0).random((200, 3)))
    flip_bytes(path, 100, 300)


def corrupt_stored_npz(path):
    np.savez(path, x=np.random.default_rng(0).random((200, 3)))
    flip_bytes(path, 300, 400)


def huge_header_npz(path):
    import io
    import zipfile

    member = io.BytesIO()
    npy_header_only(member, (10**12, 2))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", member.getvalue())


def huge_header_npy(path):
    with open(path, "wb") as file:
        npy_header_only(file, (10**12, 2))


def short_npy(path):
    np.save(path, np.zeros((100, 3)))
    path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize(
    "name, make, match",
    [
        ("t.npz", truncated_npz, r"t.npz: unreadable array file, truncated or corrupt \(File is not a zip file\)"),
        ("c.npz", corrupt_compressed_npz, r"c.npz: array 'x': unreadable, truncated or corrupt \(Error -3"),
        ("s.npz", corrupt_stored_npz, r"s.npz: array 'x': unreadable, truncated or corrupt \(Bad CRC-32"),
        ("h.npz", huge_header_npz, r"h.npz: array 'x': truncated: its header declares shape \(1000000000000, 2\)"),
        ("h.npy", huge_header_npy, r"h.npy: truncated: its header declares shape \(1000000000000, 2\) of float32"),
        ("short.npy", short_npy, r"short.npy: truncated: .* \(2528 bytes with the header\) but it holds 2428 bytes"),
        ("empty.npy", lambda path: path.write_bytes(b""), r"empty.npy: unreadable, .*EOF: reading magic string"),
    ],
)
def test_truncated_and_corrupt_array_files_name_the_file(tmp_path, name, make, match):
    make(tmp_path / name)
    with pytest.raises(DataFileError, match=match):
        load_dataset(tmp_path / name, split="all")


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"x": np.array([[1, "a", None]] * 3, dtype=object)}, r"array 'x': unreadable.*allow_pickle=False"),
        ({"x": np.zeros((3, 2)), "y": np.array([0, 1, None], dtype=object)}, r"array 'y': unreadable.*allow_pickle"),
        ({"x": np.zeros((4, 2)), "y": np.array([0, 1, 2, 2**45])}, "go up to 35184372088832, but class indices must"),
        ({"x": np.zeros((4, 2)), "y": np.array([0, 1, 2, 2**63 + 5], np.uint64)}, "go up to 9223372036854775813"),
        ({"x": np.zeros((4, 2)), "y": np.array([0, 1, 2, 100_000])}, "must be below 100000"),
    ],
)
def test_object_arrays_and_labels_beyond_the_class_bound(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataFileError, match=match):
        load_dataset(tmp_path / "bad.npz", split="all")


def test_labels_up_to_the_class_bound_load(tmp_path):
    np.savez(tmp_path / "many.npz", x=np.zeros((4, 2)), y=np.array([0, 1, 2, 99_999]))
    assert load_dataset(tmp_path / "many.npz", split="all").num_classes == 100_000


def write_image(folder, name, image, **save_options):
    folder.mkdir(exist_ok=True)
    image.save(folder / name, **save_options)
    return folder


def transparent_rgba():
    pixels = np.full((4, 4, 4), 255, np.uint8)
    pixels[0, 0, 3] = 0  # one transparent pixel
    return Image.fromarray(pixels, "RGBA")


def truncated_png(folder):
    write_image(folder, "a.png", Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)))
    (folder / "a.png").write_bytes((folder / "a.png").read_bytes()[:300])
    return folder


def truncated_jpeg(folder):
    write_image(folder, "a.jpg", Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))
    (folder / "a.jpg").write_bytes((folder / "a.jpg").read_bytes()[:1000])
    return folder


def corrupt_png_data(folder):
    write_image(folder, "a.png", Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)))
    flip_bytes(folder / "a.png", 200, 260)
    return folder


def animated_png(folder):
    frames = [Image.new("L", (4, 4), 0), Image.new("L", (4, 4), 255)]
    return write_image(folder, "a.png", frames[0], save_all=True, append_images=frames[1:])


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda f: write_image(f, "wide.png", Image.new("L", (1025, 1))),
            r"wide.png: image is 1025×1; .* at most 1024",
        ),
        (lambda f: write_image(f, "a.png", transparent_rgba()), r"a.png: has transparent pixels"),
        (animated_png, r"a.png: an animation of 2 frames"),
        (truncated_png, r"a.png: unreadable image \(image file is truncated"),
        (truncated_jpeg, r"a.jpg: unreadable image \(image file is truncated"),
        (corrupt_png_data, r"a.png: unreadable image"),
    ],
)
def test_unusable_images_name_the_file(tmp_path, make, match):
    folder = make(tmp_path / "images")
    with pytest.raises(DataFileError, match=match):
        load_dataset(folder, split="all")


@pytest.mark.parametrize("side", [12, 16])  # 144 pixels: PIL warns; 256 (over twice the limit): PIL refuses
def test_decompression_bombs_are_errors(tmp_path, monkeypatch, side):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    write_image(tmp_path, "bomb.png", Image.new("L", (side, side)))
    with pytest.raises(
        DataFileError, match=rf"bomb.png: too many pixels to decode safely \(Image size \({side**2} pixels"
    ):
        load_dataset(tmp_path, split="all")


def test_opaque_alpha_and_palettes_load(tmp_path):
    opaque = np.full((4, 4, 4), 255, np.uint8)
    write_image(tmp_path, "a.png", Image.fromarray(opaque, "RGBA"))
    write_image(tmp_path, "b.png", Image.new("P", (4, 4)))
    ds = load_dataset(tmp_path, split="all")
    assert ds.x.shape == (2, 3, 4, 4) and torch.equal(ds.x[0], torch.ones(3, 4, 4))


def test_camera_jpegs_with_extra_mpo_frames_load(tmp_path):
    # Multi-picture JPEGs (a photo plus previews or depth) are not animations: the photo, frame 0, is read.
    photo, preview = Image.new("RGB", (4, 4), (255, 255, 255)), Image.new("RGB", (4, 4))
    photo.save(tmp_path / "camera.jpg", format="MPO", save_all=True, append_images=[preview])
    ds = load_dataset(tmp_path, split="all")
    assert ds.x.shape == (1, 3, 4, 4) and torch.allclose(ds.x, torch.ones(1, 3, 4, 4), atol=2 / 127.5)
