"""imm_kernels.fid: FID and KID through torchmetrics on a tiny stand-in for Inception, checked against
independent float64 formulas; references from folders and .npz files; the errors that say what to fix."""

import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("torchmetrics", reason="the fid extra (torchmetrics) is not installed")

from imm_kernels import fid  # noqa: E402
from imm_kernels.train.metrics import frechet_distance  # noqa: E402

from helpers import TinyInception  # noqa: E402


def random_images(count: int, seed: int, size: int = 8, channels: int = 3) -> np.ndarray:
    """uint8 (count, size, size, channels) images."""
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, channels), dtype=np.uint8)


def nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def save_folder(folder, images: np.ndarray):
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{index:03d}.png")
    return folder


def direct_features(images: np.ndarray) -> np.ndarray:
    """The stand-in's features of (N, H, W, 3) images in one call, float64."""
    with torch.no_grad():
        return TinyInception()(nchw(images)).double().numpy()


def unbiased_poly_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """The KID paper's unbiased MMD² with the kernel (x·y / D + 1)³, float64."""
    kernel = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3
    m = len(x)
    off_diagonal = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))
    return off_diagonal(kernel(x, x)) + off_diagonal(kernel(y, y)) - 2 * kernel(x, y).mean()


# Scores.


def test_fid_and_kid_equal_independent_float64_formulas(tmp_path):
    network = TinyInception()
    reference_images, sample_images = random_images(40, seed=1), random_images(40, seed=2) // 2
    reference = fid.load_reference(save_folder(tmp_path / "ref", reference_images), network, batch_size=7)
    features = fid.image_features(nchw(sample_images), network, batch_size=6)
    # KID subsets of all 40 images: every subset is the whole set, so its mean is the full sets' MMD².
    scores = fid.FidScorer(reference, kid_subsets=3, kid_subset_size=40).score(features)

    # The features are the network's (up to float32 rounding: other batches, another memory layout) ...
    ref_features, sample_features = reference.features.numpy(), features.numpy()
    np.testing.assert_allclose(ref_features, direct_features(reference_images), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sample_features, direct_features(sample_images), rtol=1e-6, atol=1e-7)
    # ... and the scores those of the same features by independent float64 formulas.
    expected_fid = frechet_distance(
        sample_features.mean(0), np.cov(sample_features, rowvar=False),
        ref_features.mean(0), np.cov(ref_features, rowvar=False),
    )  # fmt: skip
    assert scores.fid == pytest.approx(expected_fid, rel=1e-9)
    assert scores.fid > 0.1  # the two sets differ: a value that is not about zero
    assert scores.kid_mean == pytest.approx(unbiased_poly_mmd2(ref_features, sample_features), rel=1e-9)
    assert scores.kid_std == pytest.approx(0, abs=1e-12)
    assert (scores.num_samples, scores.kid_subset_size) == (40, 40)

    same = fid.FidScorer(reference).score(reference.features)
    assert same.fid == pytest.approx(0, abs=1e-9)


def test_kid_subsets_come_from_the_seed_and_leave_the_global_generator_alone(tmp_path):
    network = TinyInception()
    reference = fid.load_reference(save_folder(tmp_path / "ref", random_images(30, seed=1)), network)
    features = fid.image_features(nchw(random_images(25, seed=2)), network)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = fid.FidScorer(reference, kid_subset_size=10, seed=4).score(features)
    assert torch.equal(torch.get_rng_state(), before)
    assert fid.FidScorer(reference, kid_subset_size=10, seed=4).score(features) == first
    other_seed = fid.FidScorer(reference, kid_subset_size=10, seed=5).score(features)
    assert other_seed.fid == first.fid and other_seed.kid_mean != first.kid_mean
    assert first.kid_std > 0 and first.kid_subset_size == 10
    # Fewer samples than the subset size: subsets of all of them.
    assert fid.FidScorer(reference).score(features[:12]).kid_subset_size == 12


def test_one_scorer_scores_several_sample_sets_against_one_reference(tmp_path):
    network = TinyInception()
    reference = fid.load_reference(save_folder(tmp_path / "ref", random_images(30, seed=1)), network)
    scorer = fid.FidScorer(reference)
    sets = [
        fid.image_features(nchw(random_images(20, seed=seed) // divisor), network) for seed, divisor in ((2, 1), (3, 3))
    ]
    scores = [scorer.score(features) for features in sets]
    assert scores == [fid.FidScorer(reference).score(features) for features in sets]
    assert scores[0].fid != scores[1].fid


def test_features_come_from_full_float32_convolutions():
    seen = []

    class RecordsTf32(TinyInception):
        def forward(self, images):
            seen.append(torch.backends.cudnn.allow_tf32)
            return super().forward(images)

    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default
    fid.image_features(nchw(random_images(4, seed=1)), RecordsTf32(), batch_size=2)
    assert seen == [False, False] and torch.backends.cudnn.allow_tf32


# References.


def test_reference_from_a_folder_an_images_npz_and_a_statistics_npz_agree(tmp_path):
    network = TinyInception()
    images = random_images(20, seed=1, size=9)
    from_folder = fid.load_reference(save_folder(tmp_path / "ref", images), network, batch_size=6)
    np.savez(tmp_path / "images.npz", arr_0=images)
    from_images = fid.load_reference(tmp_path / "images.npz", network)
    assert torch.equal(from_folder.features, from_images.features)
    assert from_folder.image_size == from_images.image_size == (9, 9)
    np.testing.assert_allclose(from_folder.mean, from_folder.features.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(from_folder.cov, np.cov(from_folder.features.numpy(), rowvar=False), rtol=1e-12)

    stats_path = fid.save_reference(tmp_path / "stats.npz", from_folder)
    with np.load(stats_path) as saved:
        assert sorted(saved.files) == ["mu", "sigma"] and saved["sigma"].dtype == np.float64
    from_stats = fid.load_reference(stats_path)  # statistics alone need no network
    assert from_stats.features is None and from_stats.image_size is None
    samples = fid.image_features(nchw(random_images(15, seed=2, size=9)), network)
    by_images, by_stats = (fid.FidScorer(ref).score(samples) for ref in (from_folder, from_stats))
    assert by_stats.fid == pytest.approx(by_images.fid, rel=1e-9)
    assert math.isnan(by_stats.kid_mean) and by_stats.kid_subset_size == 0 and not math.isnan(by_images.kid_mean)
    assert "no images, so no KID" in fid.format_fid_table({"1 step": by_stats}, from_stats)

    # Statistics and images in one file (the ADM suite's reference batches): mu/sigma give the FID, arr_0 the KID.
    np.savez(tmp_path / "both.npz", arr_0=images, mu=from_folder.mean + 1, sigma=from_folder.cov)
    both = fid.load_reference(tmp_path / "both.npz", network)
    np.testing.assert_array_equal(both.mean, from_folder.mean + 1)
    assert torch.equal(both.features, from_folder.features)


def test_grey_images_are_scored_as_grey_rgb(tmp_path):
    network = TinyInception()
    grey = random_images(6, seed=1, channels=1)
    as_rgb = fid.image_features(nchw(np.repeat(grey, 3, axis=3)), network)
    assert torch.equal(fid.image_features(nchw(grey), network), as_rgb)
    np.savez(tmp_path / "grey.npz", arr_0=grey[..., 0])  # (N, H, W)
    assert torch.equal(fid.load_reference(tmp_path / "grey.npz", network).features, as_rgb)


def test_to_uint8_images_is_the_sample_pngs_rule(tmp_path):
    from imm_kernels.train.data import save_image_grid

    samples = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.003, 0.5, 0.9999, 1.0, 2.0]).reshape(1, 1, 3, 3)
    pixels = fid.to_uint8_images(samples)
    assert pixels.dtype == torch.uint8
    assert pixels.flatten().tolist() == [0, 0, 64, 128, 128, 191, 255, 255, 255]  # round-half-even at 127.5
    png = np.asarray(Image.open(save_image_grid(samples, tmp_path / "grid.png", upscale=1)))
    np.testing.assert_array_equal(png[2:5, 2:5], pixels[0, 0].numpy())


# The network's weights: a local file, never a download.


def test_missing_weights_say_which_file_to_fetch_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / fid.INCEPTION_WEIGHTS_FILE
    assert fid.default_inception_weights() == cached
    url = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
    with pytest.raises(FileNotFoundError, match=f"Download {url} .* --inception-weights PATH .*{cached}"):
        fid.load_inception()
    with pytest.raises(FileNotFoundError, match=r"weights='.*nowhere.pth' \(--inception-weights\) no file at"):
        fid.load_inception(tmp_path / "nowhere.pth")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert fid.inception_weights_path() == cached


def test_weights_that_are_not_the_inception_state_dict_are_named(tmp_path):
    (tmp_path / "notes.pth").write_text("not weights")
    with pytest.raises(ValueError, match="notes.pth: not a readable PyTorch weights file"):
        fid.load_inception(tmp_path / "notes.pth")
    torch.save({"fc.weight": torch.zeros(10, 2048)}, tmp_path / "other.pth")
    with pytest.raises(
        ValueError, match=r"other.pth: not the FID Inception weights .*fc.weight of shape \(1008, 2048\)"
    ):
        fid.load_inception(tmp_path / "other.pth")


def test_without_torch_fidelity_the_error_says_what_to_install(tmp_path, monkeypatch):
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, tmp_path / "weights.pth")
    for module in ("torch_fidelity", "torch_fidelity.feature_extractor_inceptionv3"):  # importing them fails
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=r"comes from torch-fidelity.*pip install torch-fidelity==0.4.0"):
        fid.load_inception(tmp_path / "weights.pth")


def _torch_fidelity_or_skip():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except (ImportError, RuntimeError) as err:  # RuntimeError: a torchvision built for another torch
        pytest.skip(f"torch-fidelity cannot be imported here ({type(err).__name__})")
    return FeatureExtractorInceptionV3


def test_the_real_network_loads_from_a_local_file_without_downloading(tmp_path, monkeypatch):
    extractor_class = _torch_fidelity_or_skip()
    import torch_fidelity.feature_extractor_inceptionv3 as inception_module

    # Random weights in the real layout: one construction with loading switched off.
    with monkeypatch.context() as patch:
        patch.setattr(inception_module.torch, "load", lambda *args, **kwargs: {})
        patch.setattr(extractor_class, "load_state_dict", lambda self, state: None)
        state = extractor_class("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused").state_dict()
    torch.save(state, tmp_path / fid.INCEPTION_WEIGHTS_FILE)

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(inception_module, "load_state_dict_from_url", no_download)
    network = fid.load_inception(tmp_path / fid.INCEPTION_WEIGHTS_FILE)
    features = fid.image_features(nchw(random_images(3, seed=1, size=16, channels=1)), network, batch_size=2)
    assert features.shape == (3, fid.INCEPTION_FEATURES) and torch.isfinite(features).all()

    torch.save({"fc.weight": state["fc.weight"]}, tmp_path / "fc_only.pth")
    message = r"fc_only.pth: not the FID Inception weights .* do not fit the network"
    with pytest.raises(ValueError, match=message) as err:
        fid.load_inception(tmp_path / "fc_only.pth")
    assert len(str(err.value)) < 500  # one readable line, not the list of every missing tensor


# Bad input names the argument.


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda net: fid.image_features(torch.zeros(2, 3, 8, 8), net), TypeError, "images must be uint8 pixels"),
        (
            lambda net: fid.image_features(torch.zeros(2, 2, 8, 8, dtype=torch.uint8), net),
            ValueError,
            r"images must be \(N, C, H, W\) images with C = 1 or 3, got shape \(2, 2, 8, 8\)",
        ),
        (
            lambda net: fid.image_features(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), net, batch_size=0),
            ValueError,
            "batch_size must be an int >= 1, got 0",
        ),
        (lambda net: fid.to_uint8_images(torch.zeros(1, 1, 2, 2, dtype=torch.uint8)), TypeError, "samples must be"),
        (
            lambda net: fid.image_features(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), lambda x: x),
            AttributeError,
            "parameters",
        ),
    ],
)
def test_bad_images_name_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call(TinyInception())


def test_bad_references_name_the_file_and_what_it_should_hold(tmp_path):
    network = TinyInception()
    with pytest.raises(ValueError, match=r"reference '.*refs.txt' must be a folder of images or a .npz file"):
        fid.load_reference(tmp_path / "refs.txt", network)
    with pytest.raises(FileNotFoundError, match=r"reference '.*absent.npz': no such file or folder"):
        fid.load_reference(tmp_path / "absent.npz", network)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"needs at least 2 .png/.jpg/.jpeg images, found 0"):
        fid.load_reference(tmp_path / "empty", network)
    folder = save_folder(tmp_path / "mixed", random_images(3, seed=1))
    Image.fromarray(random_images(1, seed=2, size=9)[0]).save(folder / "wide.png")
    with pytest.raises(ValueError, match=r"images differ in size: 000.png is 8×8, wide.png is 9×9"):
        fid.load_reference(folder, network)
    (folder / "wide.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"wide.png: unreadable image"):
        fid.load_reference(folder, network)
    with pytest.raises(ValueError, match="holds images: give network"):
        fid.load_reference(save_folder(tmp_path / "ok", random_images(2, seed=1)))

    cases = [
        ({"images": random_images(2, seed=1)}, r"holds \['images'\]: expected 'mu' and 'sigma' .* or 'arr_0'"),
        ({"arr_0": random_images(2, seed=1).astype(np.float32)}, "arr_0 must be uint8 pixels"),
        ({"arr_0": random_images(2, seed=1).transpose(0, 3, 1, 2)}, r"arr_0 must be \(N, H, W, C\) images"),
        ({"arr_0": random_images(1, seed=1)}, "arr_0 needs at least 2 images, got 1"),
        ({"mu": np.zeros(3), "sigma": np.eye(4)}, r"mu must be \(D,\) and sigma \(D, D\), got \(3,\) and \(4, 4\)"),
        ({"mu": np.full(2, np.nan), "sigma": np.eye(2)}, "mu and sigma must be finite"),
    ]
    for index, (arrays, message) in enumerate(cases):
        np.savez(tmp_path / f"bad{index}.npz", **arrays)
        with pytest.raises((ValueError, TypeError), match=message):
            fid.load_reference(tmp_path / f"bad{index}.npz", network)
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="not a readable .npz"):
        fid.load_reference(tmp_path / "broken.npz", network)
    with pytest.raises(ValueError, match="path must end in .npz"):
        fid.save_reference(tmp_path / "stats.npy", fid.load_reference(folder.parent / "ok", network))


def test_bad_scorer_arguments_name_the_argument(tmp_path):
    network = TinyInception()
    reference = fid.load_reference(save_folder(tmp_path / "ref", random_images(4, seed=1)), network)
    with pytest.raises(ValueError, match="kid_subset_size must be >= 2, got 1"):
        fid.FidScorer(reference, kid_subset_size=1)
    with pytest.raises(ValueError, match="kid_subsets must be an int >= 1, got 0"):
        fid.FidScorer(reference, kid_subsets=0)
    scorer = fid.FidScorer(reference)
    with pytest.raises(ValueError, match=r"features must be \(N, 6\) to match the reference"):
        scorer.score(torch.zeros(4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="features must hold at least 2 samples, got 1"):
        scorer.score(torch.zeros(1, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="features must be finite"):
        scorer.score(torch.full((3, 6), math.inf, dtype=torch.float64))
