"""LatentDecoder and LatentEncoder: the released ImageNet-256 latent scaling, VAE decoding and encoding as the
IMM release does them, the ADM center crop, and loading from a local folder only, with clear errors.

The VAE here is a tiny random AutoencoderKL (4 blocks of 8 channels) saved to a temporary folder: it keeps
the 8x upsampling of the Stable Diffusion VAEs, so 4x4 latents decode to 32x32 images.
"""

import json
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from imm_kernels.vae import (  # noqa: E402
    FINAL_MEAN,
    FINAL_STD,
    IMAGENET256_RAW_MEAN,
    IMAGENET256_RAW_STD,
    LatentDecoder,
    LatentEncoder,
    center_crop,
    latent_scale_and_bias,
)

from helpers import save_tiny_vae  # noqa: E402

SCALE_FACTOR = 8  # 2 ** (number of blocks - 1) of save_tiny_vae's VAE
LATENT_SIZE = 4
# The released configs/im256_generate_images.yaml values, pinned here on their own.
RELEASED_RAW_MEAN = [0.86488, -0.27787343, 0.21616915, 0.3738409]
RELEASED_RAW_STD = [4.85503674, 5.31922414, 3.93725398, 3.9870003]


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae"), LATENT_SIZE * SCALE_FACTOR)


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection attempt is recorded and refused."""
    attempts = []

    def refuse(sock, address):
        attempts.append(address)
        raise OSError(f"test forbids network access, tried {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def final_latents(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 4, LATENT_SIZE, LATENT_SIZE, generator=generator) * FINAL_STD


def official_unscale(latents):
    """Final latents -> raw VAE latents as the IMM release computes them: numpy float32 scale and bias."""
    scale = np.float32(0.5) / np.float32(RELEASED_RAW_STD)
    bias = np.float32(0) - np.float32(RELEASED_RAW_MEAN) * scale
    x = latents.to(torch.float32)
    x = x - torch.tensor(bias, device=x.device).reshape(1, -1, 1, 1)
    return x / torch.tensor(scale, device=x.device).reshape(1, -1, 1, 1)


def official_decode(vae, latents, batch_size, dtype):
    """The IMM release's decoding, written out independently: unscaling, VAE in batches, truncation to uint8."""
    x = official_unscale(latents)
    with torch.no_grad():
        images = torch.cat([vae.decode(batch.to(dtype)).sample.to(torch.float32) for batch in x.split(batch_size)])
    return (images * 0.5 + 0.5).clamp(0, 1).mul(255).to(torch.uint8)


def load_reference_vae(folder, device, dtype):
    vae = diffusers.AutoencoderKL.from_pretrained(folder, local_files_only=True, torch_dtype=dtype).to(device)
    # Frozen like the release's VAE: the CPU convolutions take another path, bitwise, for weights needing grad.
    return vae.eval().requires_grad_(False)


def test_constants_are_the_released_imagenet256_values():
    assert list(IMAGENET256_RAW_MEAN) == RELEASED_RAW_MEAN
    assert list(IMAGENET256_RAW_STD) == RELEASED_RAW_STD
    assert (FINAL_MEAN, FINAL_STD) == (0, 0.5)


def test_scale_and_bias_match_the_official_float32_formula(vae_folder):
    expected_scale = np.float32(0.5) / np.float32(RELEASED_RAW_STD)
    expected_bias = np.float32(0) - np.float32(RELEASED_RAW_MEAN) * expected_scale
    decoder = LatentDecoder.from_pretrained(vae_folder, device="cpu")
    for scale, bias in [latent_scale_and_bias(), (decoder.scale, decoder.bias)]:
        assert scale.dtype == bias.dtype == np.float32
        assert np.array_equal(scale, expected_scale) and np.array_equal(bias, expected_bias)


def test_defaults_are_fp16_on_cuda_and_fp32_elsewhere(vae_folder):
    decoder = LatentDecoder.from_pretrained(vae_folder)
    on_cuda = torch.cuda.is_available()
    assert decoder.device.type == ("cuda" if on_cuda else "cpu")
    assert decoder.dtype == (torch.float16 if on_cuda else torch.float32)
    assert decoder.batch_size == 8
    assert LatentDecoder.from_pretrained(vae_folder, device="cpu").dtype == torch.float32


DECODE_CASES = [("cpu", torch.float32), ("cpu", torch.float16)]
if torch.cuda.is_available():
    DECODE_CASES += [("cuda", torch.float32), ("cuda", torch.float16)]


@pytest.mark.parametrize("device,dtype", DECODE_CASES)
def test_decode_equals_the_official_computation_bit_for_bit(vae_folder, no_network, device, dtype):
    decoder = LatentDecoder.from_pretrained(vae_folder, device=device, dtype=dtype)
    latents = final_latents(10)  # two VAE batches: 8 + 2
    pixels = decoder.decode(latents)
    expected = official_decode(load_reference_vae(vae_folder, device, dtype), latents.to(device), 8, dtype)

    assert pixels.dtype == torch.uint8 and pixels.device == latents.device
    assert pixels.shape == (10, 3, LATENT_SIZE * SCALE_FACTOR, LATENT_SIZE * SCALE_FACTOR)
    assert len(pixels.unique()) > 100  # the images span many levels, so scaling or rounding slips would show
    assert torch.equal(pixels, expected.cpu())
    assert not no_network


def test_decode_runs_the_vae_in_batches_of_batch_size(vae_folder, monkeypatch):
    decoder = LatentDecoder.from_pretrained(vae_folder, device="cpu", batch_size=2)
    vae_inputs = []
    vae_decode = decoder.vae.decode
    monkeypatch.setattr(decoder.vae, "decode", lambda x: vae_inputs.append(x) or vae_decode(x))
    latents = final_latents(5, seed=1)
    pixels = decoder.decode(latents)

    assert [len(batch) for batch in vae_inputs] == [2, 2, 1]
    # The VAE sees exactly the release's raw latents (the uint8 output alone would hide last-bit differences).
    assert torch.equal(torch.cat(vae_inputs), official_unscale(latents))
    reference_vae = load_reference_vae(vae_folder, "cpu", torch.float32)
    assert torch.equal(pixels, official_decode(reference_vae, latents, 2, torch.float32))
    # The VAE's convolutions are not batch-invariant on the CPU (float32 differences ~1e-6), which can move a
    # value across an integer and change its truncation by one level; beyond that, batching changes nothing.
    one_batch = LatentDecoder.from_pretrained(vae_folder, device="cpu", batch_size=8).decode(latents)
    assert (pixels.int() - one_batch.int()).abs().max() <= 1
    assert (pixels != one_batch).float().mean() < 0.01


# ----------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------


def random_pixels(count, seed=0, side=LATENT_SIZE * SCALE_FACTOR):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, side, side), generator=generator, dtype=torch.uint8)


def standard_normal(count, seed=1):
    return torch.randn(count, 4, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(seed))


def official_encode(vae, pixels, noise, batch_size, dtype):
    """The IMM release's encoding, written out independently: pixels to [-1, 1], the VAE's posterior
    (mean, std) in batches, mean + noise * std, then numpy float32 scale and bias."""
    x = pixels.to(torch.float32) / 127.5 - 1
    with torch.no_grad():
        posteriors = [vae.encode(batch.to(dtype)).latent_dist for batch in x.split(batch_size)]
    mean = torch.cat([p.mean for p in posteriors]).to(torch.float32)
    std = torch.cat([p.std for p in posteriors]).to(torch.float32)
    x = mean + noise.to(mean.device) * std
    scale = np.float32(0.5) / np.float32(RELEASED_RAW_STD)
    bias = np.float32(0) - np.float32(RELEASED_RAW_MEAN) * scale
    x = x * torch.tensor(scale, device=x.device).reshape(1, -1, 1, 1)
    return x + torch.tensor(bias, device=x.device).reshape(1, -1, 1, 1)


@pytest.mark.parametrize("device,dtype", DECODE_CASES)
def test_encode_equals_the_official_computation_bit_for_bit(vae_folder, no_network, device, dtype):
    encoder = LatentEncoder.from_pretrained(vae_folder, device=device, dtype=dtype)
    pixels, noise = random_pixels(10), standard_normal(10)  # two VAE batches: 8 + 2
    latents = encoder.encode(pixels, noise)
    expected = official_encode(load_reference_vae(vae_folder, device, dtype), pixels.to(device), noise, 8, dtype)

    assert latents.dtype == torch.float32 and latents.device == pixels.device
    assert latents.shape == (10, 4, LATENT_SIZE, LATENT_SIZE)
    assert torch.equal(latents, expected.cpu())
    assert not no_network


def test_encode_runs_the_vae_in_batches_and_noise_moves_the_posterior_mean_by_std(vae_folder, monkeypatch):
    encoder = LatentEncoder.from_pretrained(vae_folder, device="cpu", batch_size=2)
    vae_inputs = []
    vae_encode = encoder.vae.encode
    monkeypatch.setattr(encoder.vae, "encode", lambda x: vae_inputs.append(x) or vae_encode(x))
    pixels, noise = random_pixels(5, seed=2), standard_normal(5)
    at_mean = encoder.encode(pixels)
    assert [len(batch) for batch in vae_inputs] == [2, 2, 1]
    assert torch.equal(torch.cat(vae_inputs), pixels.float() / 127.5 - 1)

    with torch.no_grad():
        std = encoder.vae.encode(pixels.float() / 127.5 - 1).latent_dist.std
    scale = torch.from_numpy(encoder.scale).reshape(1, -1, 1, 1)
    assert std.min() > 0
    torch.testing.assert_close(encoder.encode(pixels, noise) - at_mean, noise * std * scale, rtol=1e-4, atol=1e-6)


def test_decoder_inverts_the_encoders_whitening(vae_folder):
    """decode(encode(pixels)) is the VAE's reconstruction of its own posterior mean: the decoder undoes
    exactly the scaling the encoder applies (a random VAE reconstructs nothing, so the pixels themselves
    cannot be compared)."""
    encoder = LatentEncoder.from_pretrained(vae_folder, device="cpu")
    decoder = LatentDecoder.from_pretrained(vae_folder, device="cpu")
    pixels = random_pixels(6, seed=3)
    latents = encoder.encode(pixels)
    with torch.no_grad():
        raw_mean = encoder.vae.encode(pixels.float() / 127.5 - 1).latent_dist.mean
        reconstruction = decoder._to_uint8(decoder.vae.decode(raw_mean).sample)
    # The final latents are whitened: the raw latents' released mean and std map to 0 and 0.5 per channel.
    raw_from_final = (latents - torch.from_numpy(decoder.bias).reshape(1, -1, 1, 1)) / torch.from_numpy(
        decoder.scale
    ).reshape(1, -1, 1, 1)
    torch.testing.assert_close(raw_from_final, raw_mean, rtol=1e-5, atol=1e-5)
    decoded = decoder.decode(latents)
    assert len(reconstruction.unique()) > 100
    # float32 rounding of scale-then-unscale can move a value across an integer: one level at most.
    assert (decoded.int() - reconstruction.int()).abs().max() <= 1
    assert (decoded != reconstruction).float().mean() < 0.01


def test_latent_shape_and_defaults(vae_folder):
    encoder = LatentEncoder.from_pretrained(vae_folder)
    on_cuda = torch.cuda.is_available()
    assert encoder.dtype == (torch.float16 if on_cuda else torch.float32) and encoder.batch_size == 8
    assert encoder.downsampling == SCALE_FACTOR
    assert encoder.latent_shape(256) == (4, 32, 32)
    with pytest.raises(ValueError, match=r"resolution must be a multiple of the VAE's downsampling factor 8, got 60"):
        encoder.latent_shape(60)


@pytest.mark.parametrize(
    "pixels,noise,error,match",
    [
        (np.zeros((1, 3, 32, 32), np.uint8), None, TypeError, r"pixels must be a uint8 torch\.Tensor.*got ndarray"),
        (torch.zeros(1, 3, 32, 32), None, TypeError, r"pixels must be a uint8 .*got torch\.float32 tensor"),
        (torch.zeros(1, 32, 32, 3, dtype=torch.uint8), None, ValueError, r"\(batch >= 1, 3, height, width\)"),
        (torch.zeros(0, 3, 32, 32, dtype=torch.uint8), None, ValueError, r"got shape \(0, 3, 32, 32\)"),
        (torch.zeros(1, 3, 32, 36, dtype=torch.uint8), None, ValueError, r"multiples of .* factor 8, got \(32, 36\)"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(1, 4, 4, 4), ValueError, r"noise must have"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.zeros(1, 4, 4, 4, dtype=torch.int64), TypeError, "noise"),
    ],
    ids=["numpy", "float", "channels-last", "empty", "not-multiple-of-8", "noise-shape", "integer-noise"],
)
def test_bad_pixels_or_noise(vae_folder, pixels, noise, error, match):
    encoder = LatentEncoder.from_pretrained(vae_folder, device="cpu")
    with pytest.raises(error, match=match):
        encoder.encode(pixels, noise)


# ----------------------------------------------------------------------------
# The ADM center crop
# ----------------------------------------------------------------------------


def pattern(height, width, seed=0):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_center_crop_keeps_an_image_of_the_resolution():
    image = pattern(32, 32)
    assert np.array_equal(np.asarray(center_crop(image, 32)), np.asarray(image))


def test_center_crop_halves_with_a_box_filter_first():
    """A 2x nearest-neighbour enlargement comes back exactly: box halving averages each 2x2 block of equal
    pixels (a direct bicubic downscale would not give the original back)."""
    image = pattern(32, 32, seed=1)
    enlarged = np.asarray(image).repeat(2, 0).repeat(2, 1)
    from PIL import Image

    assert np.array_equal(np.asarray(center_crop(Image.fromarray(enlarged), 32)), np.asarray(image))


@pytest.mark.parametrize("width,left", [(96, 32), (97, 32), (33, 0)])
def test_center_crop_keeps_the_centre_the_odd_pixel_to_the_right(width, left):
    image = pattern(32, width, seed=2)  # short side 32: no halving, no resize, only the crop
    assert np.array_equal(np.asarray(center_crop(image, 32)), np.asarray(image)[:, left : left + 32])
    tall = pattern(width, 32, seed=3)
    assert np.array_equal(np.asarray(center_crop(tall, 32)), np.asarray(tall)[left : left + 32])


def test_center_crop_halves_while_the_short_side_is_at_least_twice_the_resolution():
    from PIL import Image

    image = pattern(130, 260, seed=4)  # 260x130 (width x height) -> 130x65 -> 65x32 (65 >= 64 halves too)
    halved = image.resize((130, 65), Image.BOX).resize((65, 32), Image.BOX)
    assert np.array_equal(np.asarray(center_crop(image, 32)), np.asarray(halved)[:, 16:48])


def test_center_crop_resizes_the_short_side_to_the_resolution_bicubic():
    from PIL import Image

    image = pattern(50, 70, seed=5)  # short side 50 < 64: no halving; 70 * 32 / 50 = 44.8 rounds to 45
    resized = image.resize((45, 32), Image.BICUBIC)
    assert np.array_equal(np.asarray(center_crop(image, 32)), np.asarray(resized)[:, 6:38])


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------


def test_missing_diffusers_names_the_extra(vae_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "imm-kernels\[vae\]"'):
        LatentDecoder.from_pretrained(vae_folder)


@pytest.mark.parametrize("name", ["stabilityai/sd-vae-ft-ema", "no-such-vae-folder"])
def test_missing_folder_or_hub_repo_id_never_touches_the_network(tmp_path, monkeypatch, no_network, name):
    monkeypatch.chdir(tmp_path)  # so the repo id cannot name a folder by chance
    with pytest.raises(FileNotFoundError, match=rf"{name}.*does not exist.*huggingface-cli download"):
        LatentDecoder.from_pretrained(name)
    assert not no_network


def test_file_instead_of_folder(vae_folder):
    with pytest.raises(NotADirectoryError, match=r"config\.json.*is a file; pass the folder"):
        LatentDecoder.from_pretrained(vae_folder / "config.json")


def broken_copy(vae_folder, tmp_path, edit):
    folder = tmp_path / "vae"
    shutil.copytree(vae_folder, folder)
    edit(folder)
    return folder


def set_class_name(folder):
    config = json.loads((folder / "config.json").read_text())
    config["_class_name"] = "UNet2DModel"
    (folder / "config.json").write_text(json.dumps(config))


def grow_channels(folder):
    config = json.loads((folder / "config.json").read_text())
    config["block_out_channels"] = [16, 16, 16, 16]
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda folder: (folder / "config.json").unlink(), r"has no config\.json"),
        (lambda folder: (folder / "config.json").write_text("{not json"), r"config\.json.*is not readable JSON"),
        (set_class_name, r"config\.json.*describes 'UNet2DModel', not an AutoencoderKL"),
        (lambda folder: (folder / "diffusion_pytorch_model.safetensors").unlink(), r"could not load the AutoencoderKL"),
        (
            lambda folder: (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors" * 8),
            r"could not load the AutoencoderKL",
        ),
        (grow_channels, r"could not load the AutoencoderKL.*size mismatch"),
    ],
    ids=["no-config", "bad-json", "wrong-class", "no-weights", "corrupt-weights", "mismatched-weights"],
)
def test_folder_that_is_not_an_autoencoderkl(vae_folder, tmp_path, no_network, edit, match):
    folder = broken_copy(vae_folder, tmp_path, edit)
    with pytest.raises(ValueError, match=match) as raised:
        LatentDecoder.from_pretrained(folder)
    assert str(folder) in str(raised.value)
    assert not no_network


@pytest.mark.parametrize(
    "latents,error,match",
    [
        (np.zeros((1, 4, 4, 4), np.float32), TypeError, r"latents must be a torch\.Tensor, got ndarray"),
        (torch.zeros(1, 4, 4, 4, dtype=torch.int64), TypeError, r"latents must be floating point, got torch\.int64"),
        (torch.zeros(4, 4, 4), ValueError, r"latents must be \(batch >= 1, channels, height, width\), got shape"),
        (torch.zeros(0, 4, 4, 4), ValueError, r"got shape \(0, 4, 4, 4\)"),
        (torch.zeros(1, 3, 4, 4), ValueError, r"latents must have 4 channels, got 3"),
        (torch.zeros(1, 8, 4, 4), ValueError, r"8 channels, the \(mean, std\) form"),
    ],
    ids=["numpy", "integer", "3-d", "empty", "3-channels", "mean-std"],
)
def test_bad_latents(vae_folder, latents, error, match):
    decoder = LatentDecoder.from_pretrained(vae_folder, device="cpu")
    with pytest.raises(error, match=match):
        decoder.decode(latents)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"raw_mean": [0.0, 0.0, 0.0]}, r"raw_mean and raw_std must have one value per channel each, got 3 and 4"),
        (
            {"raw_mean": [0.0] * 3, "raw_std": [1.0] * 3},
            r"raw_mean and raw_std must have 4 values, one per VAE latent channel, got 3",
        ),
        ({"raw_std": [1.0, 0.0, 1.0, 1.0]}, r"raw_std\[1\] must be positive"),
        ({"raw_std": [1.0, 1.0, -2.0, 1.0]}, r"raw_std\[2\] must be positive"),
        ({"raw_mean": [0.0, float("nan"), 0.0, 0.0]}, r"raw_mean\[1\] must be a finite number"),
        ({"raw_std": 4.0}, r"raw_std must be a non-empty sequence"),
        ({"final_std": 0.0}, r"final_std must be positive"),
        ({"batch_size": 0}, r"batch_size must be an int >= 1"),
        ({"dtype": torch.int8}, r"dtype must be a floating-point torch\.dtype"),
    ],
)
def test_bad_scaling_arguments(vae_folder, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LatentDecoder.from_pretrained(vae_folder, **kwargs)


def test_importing_the_package_does_not_import_diffusers():
    code = "import sys, imm_kernels, imm_kernels.vae; sys.exit('diffusers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
