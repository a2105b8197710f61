"""Stable Diffusion VAE latents for the ImageNet-256 IMM models, both ways (the optional `vae` extra).

The ImageNet-256 IMM models work on whitened VAE latents: each channel of the raw VAE latent
is mapped to `raw * scale + bias`, with `scale = final_std / raw_std` and
`bias = final_mean - raw_mean * scale` computed in float32.

`LatentEncoder` turns uint8 images into those final latents: the VAE encoder's posterior (mean,
std) in batches, one draw `mean + std * noise` (or the mean alone), then the whitening, as the
official encoder does for each training batch. `LatentDecoder` undoes the whitening per channel,
runs the VAE decoder in batches, and turns its [-1, 1] output into uint8 by truncation, as the
official IMM release does; it decodes what `LatentEncoder` encodes. `center_crop` is the ADM
ImageNet crop that images get before encoding.

The VAE comes from a local folder only; nothing is downloaded. Fetch stabilityai/sd-vae-ft-ema
once (`huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir DIR`) and pass DIR.
diffusers is imported only when a VAE is loaded, so `import imm_kernels` never needs it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .validation import check_finite, check_positive_int

__all__ = [
    "IMAGENET256_RAW_MEAN",
    "IMAGENET256_RAW_STD",
    "FINAL_MEAN",
    "FINAL_STD",
    "IMAGENET256_VAE",
    "DEFAULT_BATCH_SIZE",
    "latent_scale_and_bias",
    "center_crop",
    "LatentEncoder",
    "LatentDecoder",
]

# Per-channel statistics of the raw sd-vae-ft-ema latents of ImageNet 256x256, as released with IMM.
IMAGENET256_RAW_MEAN = (0.86488, -0.27787343, 0.21616915, 0.3738409)
IMAGENET256_RAW_STD = (4.85503674, 5.31922414, 3.93725398, 3.9870003)
# The mean and standard deviation the model's latents are whitened to.
FINAL_MEAN = 0.0
FINAL_STD = 0.5
# The Hugging Face repository of the VAE those statistics belong to.
IMAGENET256_VAE = "stabilityai/sd-vae-ft-ema"
DEFAULT_BATCH_SIZE = 8

_INSTALL_HINT = 'pip install "imm-kernels[vae]"'
_DOWNLOAD_HINT = (
    f"download the weights once with `huggingface-cli download {IMAGENET256_VAE} --local-dir DIR` and pass DIR"
)


def latent_scale_and_bias(
    raw_mean: Sequence[float] = IMAGENET256_RAW_MEAN,
    raw_std: Sequence[float] = IMAGENET256_RAW_STD,
    final_mean: float = FINAL_MEAN,
    final_std: float = FINAL_STD,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel float32 (scale, bias) with final latents = raw latents * scale + bias."""
    raw_mean = _check_channel_values("raw_mean", raw_mean)
    raw_std = _check_channel_values("raw_std", raw_std, positive=True)
    if len(raw_mean) != len(raw_std):
        raise ValueError(
            f"raw_mean and raw_std must have one value per channel each, got {len(raw_mean)} and {len(raw_std)}"
        )
    final_mean = check_finite("final_mean", final_mean)
    final_std = check_finite("final_std", final_std, positive=True)
    # float32 throughout, like the released models' encoder, so the scaling is bit-identical.
    scale = np.float32(final_std) / np.asarray(raw_std, dtype=np.float32)
    bias = np.float32(final_mean) - np.asarray(raw_mean, dtype=np.float32) * scale
    return scale, bias


def _check_channel_values(name: str, values, *, positive: bool = False) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of numbers, one per latent channel, got {values!r}")
    return tuple(check_finite(f"{name}[{i}]", value, positive=positive) for i, value in enumerate(values))


def _import_diffusers():
    try:
        import diffusers
    except ImportError as err:
        raise ImportError(f"encoding or decoding latents with a VAE needs diffusers: {_INSTALL_HINT}") from err
    return diffusers


def _check_vae_folder(path: Path) -> None:
    """Raises if `path` is not a folder holding a diffusers AutoencoderKL config (weights are checked by loading)."""
    if not path.exists():
        raise FileNotFoundError(f"VAE folder {str(path)!r} does not exist; nothing is downloaded: {_DOWNLOAD_HINT}")
    if not path.is_dir():
        raise NotADirectoryError(f"VAE folder {str(path)!r} is a file; pass the folder that holds config.json")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"VAE folder {str(path)!r} has no config.json; it is not a diffusers AutoencoderKL folder")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"VAE config {str(config_file)!r} is not readable JSON: {err}") from err
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    if class_name != "AutoencoderKL":
        raise ValueError(f"VAE config {str(config_file)!r} describes {class_name!r}, not an AutoencoderKL")


def center_crop(image, resolution: int):
    """A PIL image cropped to resolution x resolution by ADM's ImageNet rule (EDM2's center-crop-dhariwal).

    While the short side is at least twice the resolution, the image is halved with a box filter; then it is
    resized (bicubic) so the short side equals the resolution, the long side rounded, and the centre square
    kept (the extra pixel of an odd margin goes to the right and bottom).
    """
    from PIL import Image

    resolution = check_positive_int("resolution", resolution)
    while min(image.size) >= 2 * resolution:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    factor = resolution / min(image.size)
    image = image.resize((round(image.width * factor), round(image.height * factor)), resample=Image.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


class _WhitenedVAE:
    """A diffusers AutoencoderKL (already on its device and dtype) with the per-channel whitening of its latents.

    `from_pretrained` loads one from a local folder. The defaults are the released ImageNet-256 scaling of
    sd-vae-ft-ema.
    """

    def __init__(
        self,
        vae,
        *,
        raw_mean: Sequence[float] = IMAGENET256_RAW_MEAN,
        raw_std: Sequence[float] = IMAGENET256_RAW_STD,
        final_mean: float = FINAL_MEAN,
        final_std: float = FINAL_STD,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ):
        self.scale, self.bias = latent_scale_and_bias(raw_mean, raw_std, final_mean, final_std)
        self.latent_channels = int(vae.config.latent_channels)
        if len(self.scale) != self.latent_channels:
            raise ValueError(
                f"raw_mean and raw_std must have {self.latent_channels} values, one per VAE latent channel,"
                f" got {len(self.scale)}"
            )
        # Every encoder block but the last halves the image (8 for Stable Diffusion VAEs).
        self.downsampling = 2 ** (len(vae.config.block_out_channels) - 1)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.vae = vae.eval().requires_grad_(False)
        parameter = next(vae.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self._scale = torch.from_numpy(self.scale).to(self.device).reshape(1, -1, 1, 1)
        self._bias = torch.from_numpy(self.bias).to(self.device).reshape(1, -1, 1, 1)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        raw_mean: Sequence[float] = IMAGENET256_RAW_MEAN,
        raw_std: Sequence[float] = IMAGENET256_RAW_STD,
        final_mean: float = FINAL_MEAN,
        final_std: float = FINAL_STD,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ):
        """Loads the AutoencoderKL saved in the local folder `path` (never from the network).

        device: CUDA when available by default. dtype: float16 on CUDA (as released), float32
        elsewhere, where half-precision convolutions are slow.
        """
        diffusers = _import_diffusers()
        path = Path(path).expanduser()
        _check_vae_folder(path)
        device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None:
            dtype = torch.float16 if device.type == "cuda" else torch.float32
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        try:
            vae = diffusers.AutoencoderKL.from_pretrained(
                path,
                local_files_only=True,
                torch_dtype=dtype,
                # low-memory loading needs accelerate; asking for it without accelerate only logs a warning
                low_cpu_mem_usage=diffusers.utils.is_accelerate_available(),
            )
        except Exception as err:
            reason = " ".join(str(err).split()) or type(err).__name__  # one line, however long diffusers' message
            if len(reason) > 300:
                reason = reason[:300] + " ..."
            raise ValueError(f"could not load the AutoencoderKL in {str(path)!r}: {reason}") from err
        return cls(
            vae.to(device),
            raw_mean=raw_mean,
            raw_std=raw_std,
            final_mean=final_mean,
            final_std=final_std,
            batch_size=batch_size,
        )


class LatentEncoder(_WhitenedVAE):
    """uint8 images -> final (whitened) latents through a diffusers AutoencoderKL, as the IMM release encodes.

    The output is what the ImageNet-256 models train on and what `LatentDecoder` (with the same scaling)
    decodes: `(mean + std * noise) * scale + bias` per channel, with (mean, std) the VAE encoder's
    posterior of the pixels scaled to [-1, 1]. The official pipeline stores (mean, std) and draws the
    noise afresh each time an image is used; a data set of latents for `imm-kernels train` holds one draw.
    """

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(channels, height, width) of the latents of resolution x resolution images."""
        resolution = check_positive_int("resolution", resolution)
        if resolution % self.downsampling:
            raise ValueError(
                f"resolution must be a multiple of the VAE's downsampling factor {self.downsampling}, got {resolution}"
            )
        side = resolution // self.downsampling
        return (self.latent_channels, side, side)

    def encode(self, pixels: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) uint8 pixels -> (B, C, H/f, W/f) float32 final latents on the pixels' device.

        noise: (B, C, H/f, W/f) standard normal draws for the posterior sample `mean + std * noise`, as the
        official encoder takes it (its randn_like); None encodes the posterior mean. f: `downsampling`.
        """
        self._check_pixels(pixels)
        shape = (pixels.shape[0], self.latent_channels, *(side // self.downsampling for side in pixels.shape[2:]))
        if noise is not None:
            if not isinstance(noise, torch.Tensor) or not noise.dtype.is_floating_point:
                raise TypeError(f"noise must be a floating-point torch.Tensor, got {_describe(noise)}")
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise must have the latents' shape {shape}, got {tuple(noise.shape)}")
        x = pixels.to(device=self.device, dtype=torch.float32) / 127.5 - 1
        means, stds = [], []
        with torch.no_grad():
            for batch in x.split(self.batch_size):
                posterior = self.vae.encode(batch.to(self.dtype)).latent_dist
                means.append(posterior.mean.to(torch.float32))
                stds.append(posterior.std.to(torch.float32))
        latents = torch.cat(means)
        if noise is not None:
            latents = latents + noise.to(device=self.device, dtype=torch.float32) * torch.cat(stds)
        latents = latents * self._scale + self._bias
        return latents.to(pixels.device)

    def _check_pixels(self, pixels) -> None:
        if not isinstance(pixels, torch.Tensor) or pixels.dtype != torch.uint8:
            raise TypeError(f"pixels must be a uint8 torch.Tensor (values 0..255), got {_describe(pixels)}")
        if pixels.dim() != 4 or pixels.shape[0] == 0 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be (batch >= 1, 3, height, width), got shape {tuple(pixels.shape)}")
        if any(side % self.downsampling for side in pixels.shape[2:]):
            raise ValueError(
                f"pixels' height and width must be multiples of the VAE's downsampling factor {self.downsampling},"
                f" got {tuple(pixels.shape[2:])}"
            )


def _describe(value) -> str:
    return f"{value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__


class LatentDecoder(_WhitenedVAE):
    """Final (whitened) latents -> uint8 pixels through a diffusers AutoencoderKL, as the IMM release decodes.

    `vae` is an AutoencoderKL already on its device and dtype; `LatentDecoder.from_pretrained` loads
    one from a local folder. The defaults are the released ImageNet-256 scaling of sd-vae-ft-ema.
    """

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) floating-point final latents -> (B, 3, H*f, W*f) uint8 pixels on the latents' device.

        f is the VAE's downsampling factor (8 for Stable Diffusion VAEs).
        """
        self._check_latents(latents)
        x = latents.to(device=self.device, dtype=torch.float32)
        x = (x - self._bias) / self._scale
        with torch.no_grad():
            # Elementwise after the VAE, so converting batch by batch equals converting the whole output.
            batches = x.split(self.batch_size)
            pixels = [self._to_uint8(self.vae.decode(batch.to(self.dtype)).sample) for batch in batches]
        return torch.cat(pixels).to(latents.device)

    @staticmethod
    def _to_uint8(images: torch.Tensor) -> torch.Tensor:
        # [-1, 1] -> [0, 255] in float32, truncated (not rounded) like the released evaluation images.
        return (images.to(torch.float32) * 0.5 + 0.5).clamp(0, 1).mul(255).to(torch.uint8)

    def _check_latents(self, latents) -> None:
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
        if not latents.dtype.is_floating_point:
            raise TypeError(f"latents must be floating point, got {latents.dtype}")
        if latents.dim() != 4 or latents.shape[0] == 0:
            raise ValueError(f"latents must be (batch >= 1, channels, height, width), got shape {tuple(latents.shape)}")
        channels = latents.shape[1]
        if channels == 2 * self.latent_channels:
            raise ValueError(
                f"latents have {channels} channels, the (mean, std) form of encoded latents; draw a sample"
                f" mean + std * randn first to get the {self.latent_channels} channels the VAE decodes"
            )
        if channels != self.latent_channels:
            raise ValueError(f"latents must have {self.latent_channels} channels, got {channels}")
