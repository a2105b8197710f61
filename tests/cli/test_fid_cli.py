"""`imm-kernels sample --out X.npz` (the evaluation suites' arr_0 / arr_1 layout) and `imm-kernels eval --fid`,
on tiny training runs with a tiny stand-in for the Inception network."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TinyInception, cli_fails, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--batch", "32", "--width", "16", "--depth", "1"]
# The scores need the fid extra; the checks before them, and sample --out X.npz, do not.
needs_torchmetrics = pytest.mark.skipif(
    importlib.util.find_spec("torchmetrics") is None, reason="the fid extra (torchmetrics) is not installed"
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny training runs: conditional 8×8 digits (grey), unconditional 8×8 RGB images, 6-D vectors; and the
    RGB run's training images as a folder."""
    from imm_kernels.cli import main

    root = tmp_path_factory.mktemp("runs")
    rgb_images = root / "rgb_images"
    rgb_images.mkdir()
    for index, image in enumerate(np.random.default_rng(0).integers(0, 256, (24, 8, 8, 3), dtype=np.uint8)):
        Image.fromarray(image).save(rgb_images / f"{index:02d}.png")
    vectors = root / "vectors.npy"
    np.save(vectors, np.random.default_rng(0).normal(size=(64, 6)).astype(np.float32))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, data in (
            ("digits", ["digits", "--conditional"]),
            ("rgb", [str(rgb_images)]),
            ("vectors", [str(vectors)]),
        ):
            main(["train", "--data", *data, "--steps", "1", "--out", str(root / name), *TINY])
    finally:
        torch.set_num_threads(threads)
    return {name: root / name for name in ("digits", "rgb", "vectors", "rgb_images")}


def one_line_error(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"imm-kernels {command}: error: "), err
    return lines[0]


def png_cells(path: Path, count: int, side: int = 8) -> np.ndarray:
    """The `count` images of a one-row sample grid (save_image_grid's layout: 2-pixel gaps, pixels repeated
    grid_upscale times, the row labels in a margin on the left), as uint8 (count, side, side, C)."""
    from imm_kernels.train.data import grid_upscale

    grid = np.asarray(Image.open(path))
    grid = grid[..., None] if grid.ndim == 2 else grid
    upscale, pad = grid_upscale(side, side), 2
    cell = side * upscale + pad
    left = grid.shape[1] - (count * cell + pad)  # the label margin
    return np.stack(
        [grid[pad : pad + side * upscale : upscale, left + pad + i * cell :: upscale][:, :side] for i in range(count)]
    )


# sample --out X.npz


@pytest.mark.parametrize("run, channels, labelled", [("digits", 1, True), ("rgb", 3, False)])
def test_sample_npz_holds_the_png_pixels_as_nhwc_uint8_and_the_labels(runs, tmp_path, capsys, run, channels, labelled):
    common = ["sample", "--checkpoint", str(runs[run]), "--steps", "2", "--batch", "6", "--seed", "3", "--out"]
    run_cli(capsys, *common, str(tmp_path / "grid.png"))
    printed = run_cli(capsys, *common, str(tmp_path / "samples.npz"))
    labels_note = ", arr_1: class labels" if labelled else ""
    assert f"samples: {tmp_path / 'samples.npz'} (arr_0: uint8 images (batch, H, W, C){labels_note})" in printed.out
    with np.load(tmp_path / "samples.npz") as npz:
        assert sorted(npz.files) == (["arr_0", "arr_1"] if labelled else ["arr_0"])
        images = npz["arr_0"]
        assert images.dtype == np.uint8 and images.shape == (6, 8, 8, channels)
        np.testing.assert_array_equal(images, png_cells(tmp_path / "grid.png", 6))
        assert len(np.unique(images)) > 10  # real samples, not a blank image
        if labelled:
            np.testing.assert_array_equal(npz["arr_1"], np.arange(6))  # the default labels 0, 1, 2, ...


def test_sample_npz_of_vectors_holds_the_float_samples(runs, tmp_path, capsys):
    common = ["sample", "--checkpoint", str(runs["vectors"]), "--steps", "1", "--batch", "5", "--out"]
    run_cli(capsys, *common, str(tmp_path / "samples.npy"))
    printed = run_cli(capsys, *common, str(tmp_path / "samples.npz"))
    assert "(arr_0: float32 (batch, *shape))" in printed.out
    with np.load(tmp_path / "samples.npz") as npz:
        assert npz.files == ["arr_0"] and npz["arr_0"].dtype == np.float32
        np.testing.assert_array_equal(npz["arr_0"], np.load(tmp_path / "samples.npy")[0])


def test_sample_npz_of_latents_holds_the_floats_or_with_vae_the_decoded_png_pixels(tmp_path, capsys):
    from imm_kernels.models import DiT

    from helpers import randomise_parameters, save_tiny_vae
    from official_format import official_precond_kwargs, write_official_checkpoint

    torch.manual_seed(0)
    tiny_dit = dict(hidden_size=24, depth=2, num_heads=2, num_classes=5)
    backbone = randomise_parameters(DiT(img_resolution=8, in_channels=4, **tiny_dit))
    kwargs = official_precond_kwargs(model_type="DiT", img_channels=4, label_dim=5, **tiny_dit)
    official = write_official_checkpoint(tmp_path / "latent.pkl", backbone, kwargs)
    common = ["sample", "--checkpoint", str(official), "--steps", "1", "--batch", "2", "--labels", "4,0", "--out"]
    run_cli(capsys, *common, str(tmp_path / "z.npy"))
    run_cli(capsys, *common, str(tmp_path / "z.npz"))
    with np.load(tmp_path / "z.npz") as npz:
        assert npz["arr_0"].dtype == np.float32 and npz["arr_0"].shape == (2, 4, 8, 8)
        np.testing.assert_array_equal(npz["arr_0"], np.load(tmp_path / "z.npy")[0])
        np.testing.assert_array_equal(npz["arr_1"], [4, 0])

    pytest.importorskip("diffusers")
    vae = ["--vae", str(save_tiny_vae(tmp_path / "vae", sample_size=64))]
    run_cli(capsys, *common[:-1], *vae, "--out", str(tmp_path / "pixels.png"))
    printed = run_cli(capsys, *common[:-1], *vae, "--out", str(tmp_path / "pixels.npz"))
    assert "(arr_0: uint8 images (batch, H, W, C), arr_1: class labels)" in printed.out
    with np.load(tmp_path / "pixels.npz") as npz:
        assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (2, 64, 64, 3)
        np.testing.assert_array_equal(npz["arr_0"], png_cells(tmp_path / "pixels.png", 2, side=64))


def test_sample_npz_needs_one_step_count(runs, tmp_path, capsys):
    out = tmp_path / "samples.npz"
    err = cli_fails(capsys, "sample", "--checkpoint", str(runs["rgb"]), "--steps", "1,2", "--out", str(out))
    assert "--out samples.npz holds one set of samples (arr_0, as evaluation suites read it): give one step " in err
    assert "e.g. --steps 1, got --steps 1,2" in one_line_error(err, "sample") and not out.exists()
    err = cli_fails(capsys, "sample", "--checkpoint", str(runs["rgb"]), "--out", str(tmp_path / "x.txt"))
    assert "--out must end in .png or .npy or .npz" in one_line_error(err, "sample")


# eval --fid


@pytest.fixture
def tiny_inception(monkeypatch, tmp_path):
    """imm_kernels.fid.load_inception gives TinyInception for the weights file it returns the path of."""
    import imm_kernels.fid

    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"")

    def load_inception(given, device):
        assert Path(given) == weights
        return TinyInception().to(device)

    monkeypatch.setattr(imm_kernels.fid, "load_inception", load_inception)
    return weights


@needs_torchmetrics
def test_eval_fid_scores_each_step_count_as_the_sampled_npz_scores(runs, tmp_path, capsys, tiny_inception):
    import json

    from imm_kernels import fid

    reference = runs["rgb_images"]
    printed = run_cli(
        capsys,
        *["eval", "--checkpoint", str(runs["rgb"]), "--fid", "--reference", str(reference)],
        *["--inception-weights", str(tiny_inception), "--steps", "1,2", "--num-samples", "12", "--fid-batch", "5"],
        *["--out", str(tmp_path / "eval")],
    )
    record = json.loads((tmp_path / "eval" / "fid.json").read_text())
    assert [row["steps"] for row in record["rows"]] == [1, 2] and record["num_samples"] == 12
    assert "FID and KID in Inception-v3 pool3 features (6), against 24 reference images" in printed.out
    assert "KID: mean ± std over subsets of 12" in printed.out
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["fid.json", "samples.png"]

    # Each row is the FID and KID of what `imm-kernels sample` draws with the same seed and batch (features
    # on the device eval picks, in the same batches: the same bits).
    network = TinyInception().to("cuda" if torch.cuda.is_available() else "cpu")
    scorer = fid.FidScorer(fid.load_reference(reference, network, batch_size=5))
    for row in record["rows"]:
        out = tmp_path / f"samples_{row['steps']}.npz"
        run_cli(
            capsys,
            "sample",
            "--checkpoint",
            str(runs["rgb"]),
            "--steps",
            str(row["steps"]),
            "--batch",
            "12",
            "--out",
            str(out),
        )
        with np.load(out) as npz:
            images = torch.from_numpy(npz["arr_0"]).permute(0, 3, 1, 2)
        expected = scorer.score(fid.image_features(images, network, batch_size=5))
        assert (row["fid"], row["kid_mean"], row["kid_std"]) == (expected.fid, expected.kid_mean, expected.kid_std)
        assert f"trained (EMA), {row['steps']} step" in printed.out and f"{row['fid']:9.3f}" in printed.out
    assert record["rows"][0]["fid"] != record["rows"][1]["fid"]


@needs_torchmetrics
def test_eval_fid_against_statistics_alone_has_no_kid(runs, tmp_path, capsys, tiny_inception):
    import json

    from imm_kernels import fid

    stats = fid.save_reference(tmp_path / "stats.npz", fid.load_reference(runs["rgb_images"], TinyInception()))
    printed = run_cli(
        capsys,
        *["eval", "--checkpoint", str(runs["rgb"]), "--fid", "--reference", str(stats), "--steps", "1,1"],
        *["--inception-weights", str(tiny_inception), "--num-samples", "8", "--out", str(tmp_path / "eval")],
    )
    assert f"against the statistics in {stats} (no images, so no KID)" in printed.out
    (row,) = [line for line in printed.out.splitlines() if line.startswith("trained (EMA)")]  # 1 step, once
    assert row.startswith("trained (EMA), 1 step") and "—" in row
    text = (tmp_path / "eval" / "fid.json").read_text()
    (record,) = json.loads(text)["rows"]
    assert record["kid_mean"] is None and record["kid_subset_size"] == 0 and "NaN" not in text


def test_eval_fid_missing_weights_is_one_line_saying_where_to_get_them(runs, tmp_path, capsys):
    err = cli_fails(
        capsys,
        *["eval", "--checkpoint", str(runs["rgb"]), "--fid", "--reference", str(runs["rgb_images"])],
        *["--inception-weights", str(tmp_path / "absent.pth"), "--out", str(tmp_path / "eval")],
    )
    line = one_line_error(err, "eval")
    assert "Inception weights not found" in line and "--inception-weights PATH" in line
    assert "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" in line


@pytest.mark.parametrize(
    "run, options, message",
    [
        ("rgb", ["--fid"], "--fid needs --reference PATH (a folder of images or a .npz)"),
        ("rgb", ["--reference", "x.npz"], "--reference, --inception-weights, --fid-batch, --device apply with --fid"),
        ("rgb", ["--fid", "--reference", "R", "--fid-batch", "0"], "--fid-batch must be >= 1, got 0"),
        ("vectors", ["--fid", "--reference", "R"], "--fid scores images; this checkpoint samples (6,) vectors"),
        ("rgb", ["--fid", "--reference", "WIDE"], "--reference images are 9×9 but the samples 8×8 (width×height)"),
        ("rgb", ["--fid", "--reference", "STATS5"], "holds statistics of 5 features; the Inception network gives 6"),
    ],
)
def test_eval_fid_bad_input_is_one_line_before_sampling(runs, tmp_path, capsys, tiny_inception, run, options, message):
    wide = tmp_path / "wide"
    wide.mkdir()
    for index in range(2):
        Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(wide / f"{index}.png")
    np.savez(tmp_path / "stats5.npz", mu=np.zeros(5), sigma=np.eye(5))
    paths = {"R": str(runs["rgb_images"]), "WIDE": str(wide), "STATS5": str(tmp_path / "stats5.npz")}
    options = [paths.get(option, option) for option in options]
    out = tmp_path / "eval"
    weights = ["--inception-weights", str(tiny_inception)] if "--fid" in options else []
    err = cli_fails(capsys, "eval", "--checkpoint", str(runs[run]), *options, *weights, "--out", str(out))
    assert message in one_line_error(err, "eval")
    assert not out.exists()  # nothing sampled, nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_eval_fid_device_cuda_without_cuda_is_refused(runs, tmp_path, capsys, tiny_inception):
    err = cli_fails(
        capsys,
        *["eval", "--checkpoint", str(runs["rgb"]), "--fid", "--reference", str(runs["rgb_images"])],
        *["--inception-weights", str(tiny_inception), "--device", "cuda", "--out", str(tmp_path / "eval")],
    )
    assert "--device cuda: CUDA is not available here" in one_line_error(err, "eval")
