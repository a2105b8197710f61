"""imm-kernels encode: image folders and uint8 arrays as VAE latents in the layout `train --data` reads,
the ADM crop of each image, interrupted encodes that the trainer never reads and that a rerun finishes,
and bad input as one-line errors. The VAE is the tiny random AutoencoderKL of tests/test_vae.py."""

import json
import zipfile

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from imm_kernels.vae import LatentDecoder, LatentEncoder, center_crop  # noqa: E402

from helpers import cli_fails, run_cli, save_tiny_vae  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

RESOLUTION = 32
LATENT_SHAPE = (4, 4, 4)
# Width x height of each class's images: mixed sizes and aspect ratios, as ImageNet's photos are.
IMAGE_SIZES = {"cat": [(40, 48), (64, 40), (32, 32)], "dog": [(50, 50), (33, 70), (100, 60)]}
NUM_IMAGES = sum(len(sizes) for sizes in IMAGE_SIZES.values())
FAST = ["--resolution", str(RESOLUTION), "--device", "cpu", "--workers", "0"]


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae"), RESOLUTION)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two class folders of RGB PNGs of several sizes, in sorted order cat/0..2, dog/0..2."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, sizes in IMAGE_SIZES.items():
        (root / name).mkdir()
        for i, (width, height) in enumerate(sizes):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def encode(capsys, source, out, vae, *options):
    return run_cli(capsys, "encode", str(source), str(out), "--vae", str(vae), *FAST, *options)


def encode_fails(capsys, source, out, vae, *options):
    return cli_fails(capsys, "encode", str(source), str(out), "--vae", str(vae), *FAST, *options)


def read_shards(folder):
    shards = sorted(folder.glob("*.npz"))
    x = np.concatenate([np.load(shard)["x"] for shard in shards])
    y = np.concatenate([np.load(shard)["y"] for shard in shards])
    return shards, x, y


def test_folder_of_shards_that_train_reads(tmp_path, capsys, images, vae):
    out = tmp_path / "latents"
    printed = encode(capsys, images, out, vae, "--shard-size", "4")
    assert f"encoded 6 images -> {out}: x (6, 4, 4, 4) float32, labels 'y' of 2 classes" in printed.out

    assert sorted(p.name for p in out.iterdir()) == ["encode.json", "shard_000000.npz", "shard_000001.npz"]
    assert not (tmp_path / "latents.partial").exists()
    shards, x, y = read_shards(out)
    for shard, rows in zip(shards, (4, 2)):
        with np.load(shard) as arrays:
            assert arrays["x"].shape == (rows, *LATENT_SHAPE) and arrays["x"].dtype == np.float32
            assert arrays["y"].shape == (rows,) and arrays["y"].dtype == np.int64
        with zipfile.ZipFile(shard) as archive:  # stored, so the trainer memory-maps it
            assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    manifest = json.loads((out / "encode.json").read_text())
    assert manifest["classes"] == ["cat", "dog"] and manifest["num_images"] == NUM_IMAGES
    assert manifest["latent_shape"] == list(LATENT_SHAPE)

    run = tmp_path / "run"
    train = [*"--steps 2 --batch 4 --group-size 2 --width 16 --depth 1 --conditional --device cpu".split()]
    run_cli(capsys, "train", "--data", str(out), "--out", str(run), *train)
    data_info = json.loads((run / "config.json").read_text())["data_info"]
    assert data_info == {"name": str(out), "kind": "image", "shape": list(LATENT_SHAPE), "num_classes": 2}


def test_latents_are_the_encoders_of_the_adm_crops_and_decode_with_latent_decoder(tmp_path, capsys, images, vae):
    from PIL import Image

    out = tmp_path / "latents"
    encode(capsys, images, out, vae, "--posterior", "mean", "--batch", "4")
    _, x, _ = read_shards(out)
    files = sorted(images.rglob("*.png"))
    crops = [np.asarray(center_crop(Image.open(path).convert("RGB"), RESOLUTION)) for path in files]
    pixels = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
    encoder = LatentEncoder.from_pretrained(vae, device="cpu")
    assert np.array_equal(x, encoder.encode(pixels).numpy())

    # What LatentDecoder (sample --vae) gives back is the VAE's reconstruction of its posterior mean.
    with torch.no_grad():
        raw_mean = encoder.vae.encode(pixels.float() / 127.5 - 1).latent_dist.mean
        reconstruction = LatentDecoder._to_uint8(encoder.vae.decode(raw_mean).sample)
    decoded = LatentDecoder.from_pretrained(vae, device="cpu").decode(torch.from_numpy(x))
    assert (decoded.int() - reconstruction.int()).abs().max() <= 1


def test_one_archive_equals_the_shards_whatever_the_batch_shards_and_workers(tmp_path, capsys, images, vae):
    encode(capsys, images, tmp_path / "shards", vae, "--shard-size", "4", "--batch", "3")
    archive = tmp_path / "latents.npz"
    printed = encode(capsys, images, archive, vae, "--batch", "2", "--workers", "2", "--dtype", "float16")
    assert f"-> {archive}: x (6, 4, 4, 4) float16" in printed.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latents.npz", "shards"]

    _, x, y = read_shards(tmp_path / "shards")
    with np.load(archive) as arrays:
        assert sorted(arrays.files) == ["x", "y"]
        assert arrays["x"].dtype == np.float16 and np.array_equal(arrays["x"], x.astype(np.float16))
        assert np.array_equal(arrays["y"], y)
    # The posterior draws differ from the mean, and with the seed.
    encode(capsys, images, tmp_path / "mean", vae, "--posterior", "mean")
    encode(capsys, images, tmp_path / "seed1", vae, "--seed", "1")
    assert not np.array_equal(read_shards(tmp_path / "mean")[1], x)
    assert not np.array_equal(read_shards(tmp_path / "seed1")[1], x)

    from imm_kernels.train.streaming import ArraySource, open_dataset

    source = open_dataset(archive, split="all")
    assert isinstance(source, ArraySource)  # memory-mapped, not loaded
    assert torch.equal(source.rows(torch.arange(NUM_IMAGES))[0], torch.from_numpy(x.astype(np.float16)).float())


def test_uint8_arrays_either_layout_encode_as_the_image_folder_does(tmp_path, capsys, vae):
    from PIL import Image

    rng = np.random.default_rng(1)
    nhwc = rng.integers(0, 256, (5, 40, 48, 3), dtype=np.uint8)
    labels = np.array([2, 0, 1, 2, 0])
    np.savez(tmp_path / "nhwc.npz", x=nhwc, y=labels)
    np.save(tmp_path / "nchw.npy", nhwc.transpose(0, 3, 1, 2))
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(nhwc):
        Image.fromarray(image).save(folder / f"{i}.png")

    for name in ("nhwc.npz", "nchw.npy", "pngs"):
        encode(capsys, tmp_path / name, tmp_path / f"{name}.out.npz", vae)
    with np.load(tmp_path / "nhwc.npz.out.npz") as from_npz, np.load(tmp_path / "nchw.npy.out.npz") as from_npy:
        assert np.array_equal(from_npz["y"], labels) and "y" not in from_npy.files
        assert np.array_equal(from_npz["x"], from_npy["x"])
        assert np.array_equal(from_npz["x"], np.load(tmp_path / "pngs.out.npz")["x"])


def test_an_interrupted_encode_is_never_read_and_a_rerun_finishes_it(tmp_path, capsys, images, vae, monkeypatch):
    out = tmp_path / "latents"
    options = ["--shard-size", "2", "--batch", "2"]
    calls = []
    encode_batch = LatentEncoder.encode

    def interrupted(self, pixels, noise=None):
        calls.append(len(pixels))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return encode_batch(self, pixels, noise)

    monkeypatch.setattr(LatentEncoder, "encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        encode(capsys, images, out, vae, *options)
    partial = tmp_path / "latents.partial"
    assert not out.exists()
    assert sorted(p.name for p in partial.iterdir()) == ["encode.json", "shard_000000.npz", "shard_000001.npz"]
    err = cli_fails(capsys, "train", "--data", str(out), "--out", str(tmp_path / "run"))
    assert "is neither a built-in data set" in err and "nor an existing path" in err

    # Other settings do not resume into it.
    err = encode_fails(capsys, images, out, vae, *options, "--seed", "7")
    assert f"{partial} holds an unfinished encode with other settings (seed)" in err

    calls.clear()

    def counted(self, pixels, noise=None):
        calls.append(len(pixels))
        return encode_batch(self, pixels, noise)

    monkeypatch.setattr(LatentEncoder, "encode", counted)
    printed = encode(capsys, images, out, vae, *options)
    assert f"resuming the encode in {partial}: 2 of 3 shards done" in printed.out
    assert calls == [2]  # only the last shard's images
    assert not partial.exists()
    monkeypatch.undo()
    encode(capsys, images, tmp_path / "uninterrupted", vae, *options)
    assert np.array_equal(read_shards(out)[1], read_shards(tmp_path / "uninterrupted")[1])


def test_an_interrupted_archive_leaves_nothing(tmp_path, capsys, images, vae, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(LatentEncoder, "encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        encode(capsys, images, tmp_path / "latents.npz", vae)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force_and_other_folders_are_never_replaced(tmp_path, capsys, images, vae):
    out = tmp_path / "latents"
    encode(capsys, images, out, vae, "--shard-size", "4")
    err = encode_fails(capsys, images, out, vae)
    assert f"OUT {str(out)!r} holds encoded latents; pass --force to replace them" in err
    encode(capsys, images, out, vae, "--force")  # one shard of 10000 replaces the two of 4
    assert sorted(p.name for p in out.iterdir()) == ["encode.json", "shard_000000.npz"]

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    err = encode_fails(capsys, images, other, vae, "--force")
    assert "holds other files than an encode's (no encode.json); give a new or empty folder" in err
    assert (other / "notes.txt").read_text() == "keep me"

    archive = tmp_path / "latents.npz"
    archive.write_bytes(b"old")
    err = encode_fails(capsys, images, archive, vae)
    assert "exists; pass --force to replace it" in err
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    err = encode_fails(capsys, images, a_file, vae, "--force")
    assert f"OUT {str(a_file)!r} is a file, not a folder" in err


@pytest.mark.parametrize("vae_name", ["stabilityai/sd-vae-ft-mse", "no-such-folder"])
def test_a_hub_id_or_missing_vae_folder_is_refused_offline(tmp_path, capsys, images, monkeypatch, vae_name):
    monkeypatch.chdir(tmp_path)
    err = encode_fails(capsys, images, "out", vae_name)
    assert f"imm-kernels encode: error: VAE folder {vae_name!r} does not exist; nothing is downloaded" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_bad_images_are_one_line_errors_naming_the_file(tmp_path, capsys, images, vae):
    from PIL import Image

    broken = tmp_path / "broken"
    (broken / "cat").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(broken / "cat" / "0.png")
    (broken / "cat" / "1.png").write_bytes(b"not an image at all")
    for workers in ("0", "1"):  # an error in a DataLoader worker reaches the command as its message
        err = encode_fails(capsys, broken, tmp_path / "out", vae, "--workers", workers)
        last_line = err.splitlines()[-1]
        assert last_line.startswith(f"imm-kernels encode: error: {broken / 'cat' / '1.png'}: unreadable image")
        assert "Traceback" not in err and "DataLoader worker" not in err
        assert not (tmp_path / "out.partial").exists()  # no shard was finished: nothing to resume
    transparent = tmp_path / "transparent"
    transparent.mkdir()
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(transparent / "0.png")
    err = encode_fails(capsys, transparent, tmp_path / "out", vae)
    assert "0.png: has transparent pixels" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images")
    err = encode_fails(capsys, empty, tmp_path / "out", vae)
    assert "no .png/.jpg/.jpeg images found" in err

    np.save(tmp_path / "latents.npy", np.zeros((4, 4, 4, 4), np.float32))
    err = encode_fails(capsys, tmp_path / "latents.npy", tmp_path / "out", vae)
    assert "array has dtype float32; encode takes uint8 pixels" in err
    np.save(tmp_path / "gray.npy", np.zeros((4, 32, 32), np.uint8))
    err = encode_fails(capsys, tmp_path / "gray.npy", tmp_path / "out", vae)
    assert "array has shape (4, 32, 32)" in err
    (tmp_path / "list.txt").write_text("a.png")
    err = encode_fails(capsys, tmp_path / "list.txt", tmp_path / "out", vae)
    assert "expected a folder of images or a uint8 .npy / .npz array" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "options,message",
    [
        (["--resolution", "36"], "resolution must be a multiple of the VAE's downsampling factor 8, got 36"),
        (["--batch", "0"], "--batch must be >= 1, got 0"),
        (["--shard-size", "0"], "--shard-size must be >= 1, got 0"),
        (["--workers", "-1"], "--workers must be >= 0, got -1"),
    ],
)
def test_bad_options(tmp_path, capsys, images, vae, options, message):
    err = encode_fails(capsys, images, tmp_path / "out", vae, *options)
    assert message in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_npy_output_is_refused_for_it_holds_no_labels(tmp_path, capsys, images, vae):
    err = encode_fails(capsys, images, tmp_path / "x.npy", vae)
    assert "a .npy file holds no labels; give a name ending in .npz, or a folder" in err


def test_each_posterior_draw_comes_from_the_seed_and_its_row_alone():
    from imm_kernels.cli.encode import _posterior_noise

    draws = _posterior_noise([4, 5, 6], LATENT_SHAPE, seed=0)
    assert torch.equal(_posterior_noise([5], LATENT_SHAPE, seed=0)[0], draws[1])
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    assert not torch.equal(_posterior_noise([5], LATENT_SHAPE, seed=1)[0], draws[1])
    many = _posterior_noise(range(200), LATENT_SHAPE, seed=0)
    assert abs(many.mean()) < 0.02 and abs(many.std() - 1) < 0.02  # 12800 draws: standard errors 0.009, 0.006
