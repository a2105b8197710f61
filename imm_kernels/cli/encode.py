"""`imm-kernels encode`: images as Stable Diffusion VAE latents that `imm-kernels train --data OUT` reads.

Each image (from a folder, labelled by class subfolder as `train --data FOLDER` labels it, or from a
uint8 array) is made RGB, center-cropped to --resolution by ADM's ImageNet rule (`vae.center_crop`) and
encoded by the VAE in a local folder into final latents: one draw of the VAE's posterior, whitened with
the released ImageNet-256 statistics (`vae.LatentEncoder`), which `sample --vae` decodes.

OUT is a folder of .npz shards (`x`: (n, C, R/8, R/8) latents, `y`: int64 labels when the images have
classes) with encode.json (the settings and the class names), or one .npz archive when OUT ends in .npz.
The folder is filled as OUT.partial and renamed to OUT once every shard is in it, the archive written as
OUT.partial and renamed, so the trainer never reads an unfinished encode. Running the same command again
after an interruption continues from the shards already in OUT.partial (folders only). Each posterior
draw comes from (--seed, the image's index) alone, so the latents do not depend on --batch, --workers,
--shard-size or a resumption.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..model_files import file_sha256, replace_folder
from ..train.data import (
    ARRAY_SUFFIXES,
    DataFileError,
    check_array_layout,
    checked_labels,
    folder_labels,
    image_folder_files,
    read_array_file,
    read_image,
)
from ..train.streaming import is_compressed_archive, map_array_file
from ..train.trainer import DEVICE_CHOICES
from .common import (
    SETUP_ERRORS,
    check_count,
    check_output_file,
    check_output_folder,
    device_of_choice,
    fail,
    seed,
)

MANIFEST = "encode.json"
MANIFEST_FORMAT = "imm-kernels-latents"
SHARD_NAME = "shard_{:06d}.npz"  # zero-padded: the trainer reads a folder's shards in sorted name order
STORED_DTYPES = {"float32": np.float32, "float16": np.float16}
DEFAULT_SHARD_SIZE = 10_000  # 164 MB of float32 4x32x32 latents, held in memory while a shard fills
DEFAULT_BATCH = 32
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "encode",
        help="images (a folder or a uint8 array) as VAE latents for `train --data`",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument(
        "source",
        metavar="IMAGES",
        help="a folder of .png/.jpg images (class subfolders give labels), or a uint8 .npy/.npz array of images "
        "(N, H, W, 3) or (N, 3, H, W) with optional labels 'y'",
    )
    parser.add_argument("out", metavar="OUT", help="the folder of .npz shards to write, or one archive ending in .npz")
    parser.add_argument(
        "--vae",
        required=True,
        metavar="DIR",
        help="local folder of a diffusers AutoencoderKL (config.json and diffusion_pytorch_model.safetensors), "
        "e.g. stabilityai/sd-vae-ft-ema fetched with `huggingface-cli download`; nothing is downloaded",
    )
    parser.add_argument("--resolution", type=int, default=256, help="side of the cropped images (default: 256)")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="images per VAE call (default: %(default)s)")
    parser.add_argument(
        "--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="images per .npz shard (default: %(default)s)"
    )
    parser.add_argument(
        "--posterior",
        choices=("sample", "mean"),
        default="sample",
        help="store one posterior draw, mean + std * noise, as the models are trained on, or the mean "
        "(default: %(default)s)",
    )
    parser.add_argument("--seed", type=seed, default=0, help="seed of the posterior draws (default: 0)")
    parser.add_argument(
        "--dtype", choices=tuple(STORED_DTYPES), default="float32", help="of the stored latents (default: %(default)s)"
    )
    parser.add_argument(
        "--device",
        choices=DEVICE_CHOICES,
        default="auto",
        help="auto: CUDA when available, where the VAE runs in float16 (default: %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        help="processes that decode and crop the images, 0: this one (default: %(default)s)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace OUT if it holds an earlier encode, and start over if OUT.partial holds one with other settings",
    )
    parser.set_defaults(run=run)


@dataclass
class _Job:
    """What `_prepare` checked and opened."""

    out: Path
    images: torch.utils.data.Dataset
    labels: np.ndarray | None
    encoder: object  # a vae.LatentEncoder
    latent_shape: tuple[int, int, int]
    writer: _ShardFolderWriter | _ArchiveWriter


def run(args) -> None:
    writer = None
    try:
        job = _prepare(args)
        writer = job.writer
        _encode(job, args)
    except BaseException as err:
        if writer is not None:
            writer.abort()
        if isinstance(err, SETUP_ERRORS):
            fail("encode", err)
        raise
    num_images = len(job.images)
    x_shape = (num_images, *job.latent_shape)
    classes = "unlabelled" if job.labels is None else f"labels 'y' of {int(job.labels.max()) + 1} classes"
    print(f"encoded {num_images} images -> {job.out}: x {x_shape} {args.dtype}, {classes}")


def _prepare(args) -> _Job:
    for flag, value in (("--resolution", args.resolution), ("--batch", args.batch), ("--shard-size", args.shard_size)):
        check_count(flag, value, maximum=2**31 - 1)
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    source, out = Path(args.source), Path(args.out)
    if not source.exists():
        raise FileNotFoundError(f"IMAGES {str(source)!r} does not exist")
    if out.suffix.lower() == ".npy":
        raise ValueError(f"OUT {str(out)!r}: a .npy file holds no labels; give a name ending in .npz, or a folder")
    single_archive = out.suffix.lower() == ".npz"
    if single_archive:
        check_output_file("OUT", out, (".npz",), force=args.force)
    else:
        _check_out_folder(out, force=args.force)

    from ..vae import LatentEncoder

    vae_folder = Path(args.vae).expanduser()
    encoder = LatentEncoder.from_pretrained(vae_folder, device=device_of_choice(args.device), batch_size=args.batch)
    latent_shape = encoder.latent_shape(args.resolution)
    images, labels, class_names, listing_sha256 = _open_images(source, args.resolution)
    dtype = STORED_DTYPES[args.dtype]
    if single_archive:
        writer = _ArchiveWriter(out, len(images), latent_shape, dtype, labels)
    else:
        # Everything the stored numbers depend on: a resumed encode must match it.
        settings = {
            "source": str(source.absolute()),
            "source_listing_sha256": listing_sha256,
            "resolution": args.resolution,
            "shard_size": args.shard_size,
            "posterior": args.posterior,
            "seed": args.seed,
            "dtype": args.dtype,
            "vae": str(vae_folder.absolute()),
            "vae_config_sha256": file_sha256(vae_folder / "config.json"),
            "vae_dtype": str(encoder.dtype).removeprefix("torch."),
            "scale": encoder.scale.tolist(),
            "bias": encoder.bias.tolist(),
        }
        manifest = {
            "format": MANIFEST_FORMAT,
            "settings": settings,
            "num_images": len(images),
            "latent_shape": list(latent_shape),
            "classes": class_names,
        }
        writer = _ShardFolderWriter(out, manifest, args.shard_size, latent_shape, dtype, labels, force=args.force)
    return _Job(out, images, labels, encoder, latent_shape, writer)


def _check_out_folder(out: Path, *, force: bool) -> None:
    """OUT is absent, empty, or (with force) an earlier encode's folder; never another folder, which --force
    would otherwise delete."""
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise FileExistsError(
                f"OUT {str(out)!r} is a folder that holds other files than an encode's (no {MANIFEST}); "
                "give a new or empty folder"
            )
        if not force:
            raise FileExistsError(f"OUT {str(out)!r} holds encoded latents; pass --force to replace them")
    check_output_folder("OUT", out, force=True)
    check_output_folder("OUT", _partial(out), force=True)


def _partial(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


# The images.


def _open_images(source: Path, resolution: int):
    """(images: a Dataset of (3, R, R) uint8 tensors, labels: int64 array or None, class names or None,
    a digest of the listing that tells whether it changed since an interrupted encode)."""
    if source.is_dir():
        files, class_of_file = image_folder_files(source)
        labels, _ = folder_labels(class_of_file)
        class_names = None if labels is None else sorted(set(class_of_file))
        listing = hashlib.sha256("\n".join(str(path.relative_to(source)) for path in files).encode())
        return (
            _ImageFiles(files, resolution),
            None if labels is None else labels.numpy(),
            class_names,
            listing.hexdigest(),
        )
    if source.suffix.lower() not in ARRAY_SUFFIXES:
        raise ValueError(
            f"IMAGES {str(source)!r}: expected a folder of images or a uint8 {' / '.join(ARRAY_SUFFIXES)} array"
        )
    # A compressed archive is read into memory; other arrays are memory-mapped (MappedArray), as the trainer reads them.
    array, labels = read_array_file(source) if is_compressed_archive(source) else map_array_file(source)
    check_array_layout(source, array.dtype, array.shape)
    if array.dtype != np.uint8:
        raise DataFileError(
            f"{source}: array has dtype {array.dtype}; encode takes uint8 pixels (0..255). Latents or other "
            "numbers are trained on as they are: pass the file to `train --data`"
        )
    channels_last = _channels_last(source, array.shape)
    if labels is not None:
        labels = checked_labels(source, labels, array.shape[0])[0].numpy()
    stat = source.stat()
    listing = hashlib.sha256(f"{stat.st_size} {stat.st_mtime_ns}".encode())
    return _ArrayImages(array, channels_last, resolution), labels, None, listing.hexdigest()


def _channels_last(path: Path, shape: tuple[int, ...]) -> bool:
    """Whether (N, H, W, 3) rather than (N, 3, H, W) images; DataFileError for anything else."""
    if len(shape) != 4 or 3 not in (shape[1], shape[3]):
        raise DataFileError(f"{path}: array has shape {shape}; expected RGB images (N, H, W, 3) or (N, 3, H, W)")
    if shape[1] == shape[3]:
        raise DataFileError(f"{path}: array of shape {shape} could be (N, H, W, 3) or (N, 3, H, W) images")
    return shape[3] == 3


def _read_rgb(path: Path):
    """An image file as an RGB PIL image, or a DataFileError naming it; as `train --data FOLDER` reads images
    (16-bit, float and transparent images refused), but of any size: ImageNet's photos are cropped here."""
    return read_image(path, limit_side=False).convert("RGB")


def _pixels(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


class _ImageFiles(torch.utils.data.Dataset):
    """Image files, each read and cropped when asked for: (3, R, R) uint8, or the DataFileError of a bad file
    (returned, not raised, so that a worker's error reaches the command as its one-line message)."""

    def __init__(self, files: list[Path], resolution: int) -> None:
        self.files, self.resolution = files, resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, row: int):
        from ..vae import center_crop

        try:
            return _pixels(center_crop(_read_rgb(self.files[row]), self.resolution))
        except DataFileError as err:
            return err


class _ArrayImages(torch.utils.data.Dataset):
    """Rows of a uint8 image array (in memory or memory-mapped), each cropped when asked for: (3, R, R) uint8."""

    def __init__(self, array, channels_last: bool, resolution: int) -> None:
        self.array, self.channels_last, self.resolution = array, channels_last, resolution

    def __len__(self) -> int:
        return self.array.shape[0]

    def __getitem__(self, row: int) -> torch.Tensor:
        from PIL import Image

        from ..vae import center_crop

        array = self.array if isinstance(self.array, np.ndarray) else self.array.array()
        image = np.asarray(array[row])
        if not self.channels_last:
            image = image.transpose(1, 2, 0)
        if image.shape[:2] != (self.resolution, self.resolution):
            image = center_crop(Image.fromarray(np.ascontiguousarray(image)), self.resolution)
        return _pixels(image)


def _stack_or_error(items: list):
    """A batch of images as one tensor, or the first DataFileError among them."""
    error = next((item for item in items if isinstance(item, Exception)), None)
    return torch.stack(items) if error is None else error


def _posterior_noise(rows, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal draws of `shape` for each row, each drawn from (seed, row) alone."""
    draws = []
    for row in rows:
        key = np.random.SeedSequence(seed, spawn_key=(int(row),)).generate_state(1, np.uint64)[0]
        draws.append(torch.randn(shape, generator=torch.Generator().manual_seed(int(key >> np.uint64(1)))))
    return torch.stack(draws)


# Encoding and writing.


def _encode(job: _Job, args) -> None:
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    pending = job.writer.start()
    # Batches never cross a shard's end, so each batch fills part of one shard.
    batches = [list(rows[i : i + args.batch]) for rows in pending for i in range(0, len(rows), args.batch)]
    loader = DataLoader(
        job.images,
        batch_sampler=batches,
        num_workers=args.workers,
        collate_fn=_stack_or_error,
        pin_memory=job.encoder.device.type == "cuda",
    )
    done = len(job.images) - sum(len(rows) for rows in pending)
    with tqdm(total=len(job.images), initial=done, unit="img", desc="encode", dynamic_ncols=True) as bar:
        for rows, pixels in zip(batches, loader):
            if isinstance(pixels, Exception):
                raise pixels
            noise = None if args.posterior == "mean" else _posterior_noise(rows, job.latent_shape, args.seed)
            latents = job.encoder.encode(pixels.to(job.encoder.device, non_blocking=True), noise)
            job.writer.write(rows, latents.cpu().numpy())
            bar.update(len(rows))
    job.writer.finish()


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An uncompressed .npz (the trainer memory-maps its members) written to path.partial, synced and renamed."""
    partial = _partial(path)
    with open(partial, "wb") as file:
        np.savez(file, **arrays)
        file.flush()
        os.fsync(file.fileno())
    partial.replace(path)


class _ShardFolderWriter:
    """OUT as a folder of shards: filled as OUT.partial (resumed when its encode.json has these settings),
    renamed to OUT when complete."""

    def __init__(self, out: Path, manifest: dict, shard_size: int, latent_shape, dtype, labels, *, force: bool):
        self.out, self.partial, self.manifest, self.force = out, _partial(out), manifest, force
        self.shard_size, self.latent_shape, self.dtype, self.labels = shard_size, latent_shape, dtype, labels
        self.num_images = manifest["num_images"]
        self.buffer, self.filled = None, 0
        self.started = False

    def start(self) -> list[range]:
        """Prepares OUT.partial; returns the rows of each shard still to encode."""
        if self.partial.is_dir() and any(self.partial.iterdir()):
            earlier = self._read_partial_manifest()
            if earlier == self.manifest:
                done = [i for i in range(self._num_shards()) if (self.partial / SHARD_NAME.format(i)).is_file()]
                print(f"resuming the encode in {self.partial}: {len(done)} of {self._num_shards()} shards done")
            elif self.force:
                shutil.rmtree(self.partial)
            else:
                changed = sorted(
                    key
                    for key in {**self.manifest["settings"], **earlier.get("settings", {})}
                    if earlier.get("settings", {}).get(key) != self.manifest["settings"].get(key)
                ) or ["the listing of the images"]
                raise FileExistsError(
                    f"{self.partial} holds an unfinished encode with other settings ({', '.join(changed)}); "
                    "run it with its settings to finish it, or pass --force to start over"
                )
        self.partial.mkdir(parents=True, exist_ok=True)
        self.started = True
        (self.partial / MANIFEST).write_text(json.dumps(self.manifest, indent=2) + "\n")
        return [self._rows(i) for i in range(self._num_shards()) if not (self.partial / SHARD_NAME.format(i)).is_file()]

    def _read_partial_manifest(self) -> dict:
        path = self.partial / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            manifest = None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            # Not an encode's folder: never resumed into, never deleted.
            raise FileExistsError(f"{self.partial} exists and is not an unfinished encode; move or remove it")
        return manifest

    def _num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def _rows(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_images))

    def write(self, rows: list[int], latents: np.ndarray) -> None:
        shard = rows[0] // self.shard_size
        shard_rows = self._rows(shard)
        if self.buffer is None:
            self.buffer = np.empty((len(shard_rows), *self.latent_shape), dtype=self.dtype)
        start = rows[0] - shard_rows.start
        self.buffer[start : start + len(rows)] = latents
        self.filled += len(rows)
        if self.filled == len(shard_rows):
            arrays = {"x": self.buffer}
            if self.labels is not None:
                arrays["y"] = self.labels[shard_rows.start : shard_rows.stop]
            _write_npz(self.partial / SHARD_NAME.format(shard), arrays)
            self.buffer, self.filled = None, 0

    def finish(self) -> None:
        # OUT is absent, empty, or an earlier encode that --force replaces (checked before encoding).
        replace_folder(self.partial, self.out)

    def abort(self) -> None:
        """The shards written so far stay in OUT.partial for a rerun to continue from; without any, it goes."""
        if self.started and not any(self.partial.glob("shard_*.npz")):
            shutil.rmtree(self.partial, ignore_errors=True)


class _ArchiveWriter:
    """OUT as one .npz archive ('y' then 'x', stored uncompressed so the trainer can memory-map 'x'), the
    latents streamed into it batch by batch as OUT.partial, renamed to OUT when complete."""

    def __init__(self, out: Path, num_images: int, latent_shape, dtype, labels) -> None:
        self.out, self.partial = out, _partial(out)
        self.shape, self.dtype, self.labels = (num_images, *latent_shape), np.dtype(dtype), labels
        self.archive = self.member = None

    def start(self) -> list[range]:
        self.archive = zipfile.ZipFile(self.partial, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        if self.labels is not None:
            with self.archive.open("y.npy", "w") as member:
                np.lib.format.write_array(member, self.labels, allow_pickle=False)
        self.member = self.archive.open("x.npy", "w", force_zip64=True)  # zip64: may pass 4 GiB
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_1_0(self.member, header)
        return [range(self.shape[0])]

    def write(self, rows: list[int], latents: np.ndarray) -> None:
        self.member.write(np.ascontiguousarray(latents, dtype=self.dtype).tobytes())

    def finish(self) -> None:
        self.member.close()
        self.archive.close()
        with open(self.partial, "rb+") as file:
            os.fsync(file.fileno())
        self.partial.replace(self.out)
        self.archive = self.member = None

    def abort(self) -> None:
        """An unfinished archive cannot be continued: removed."""
        if self.member is not None:
            self.member.close()
        if self.archive is not None:
            self.archive.close()
        self.partial.unlink(missing_ok=True)
