"""This library's model folders: a model's weights (safetensors) and its description (JSON), nothing executable.

A model folder holds two files:

- `model.safetensors`: the backbone's state dict;
- `model.json`: {"format": "imm_kernels.model", "version": 1, "backbone": {"class", "kwargs"},
  "preconditioner": {Preconditioner keyword arguments}, "sample_shape": [C, R, R],
  "weights_sha256": the SHA-256 of model.safetensors, "source": where it came from}.

`imm-kernels convert` writes one from an official IMM checkpoint; `load_model` reads it (and
checks the weights' checksum); `load_sampling_model` opens whatever `imm-kernels sample` is given.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .precond import Preconditioner

__all__ = ["save_model", "load_model", "convert_official", "is_model_folder", "MODEL_CONFIG_FILE", "MODEL_WEIGHTS_FILE"]

MODEL_CONFIG_FILE = "model.json"
MODEL_WEIGHTS_FILE = "model.safetensors"
MODEL_FORMAT, MODEL_FORMAT_VERSION = "imm_kernels.model", 1
OFFICIAL_SUFFIXES = (".pkl", ".pt", ".pth")


class ModelFileError(ValueError):
    """A model folder whose description or weights are missing, corrupt or inconsistent."""


def is_model_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / MODEL_CONFIG_FILE).is_file()


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def replace_folder(new: Path, target: Path) -> Path:
    """Renames the complete folder `new` to `target`, replacing any target. The old target is moved aside,
    not deleted, until the new one is in place: a failure between the two renames leaves it whole in
    <target>.replaced."""
    if not target.exists():
        new.rename(target)
        return target
    replaced = target.with_name(target.name + ".replaced")
    shutil.rmtree(replaced, ignore_errors=True)
    target.rename(replaced)
    new.rename(target)
    shutil.rmtree(replaced)
    return target


def save_model(
    directory: str | os.PathLike,
    *,
    backbone_class: str,
    backbone_kwargs: Mapping[str, Any],
    preconditioner: Mapping[str, Any],
    sample_shape: tuple[int, ...],
    state_dict: Mapping[str, Tensor],
    source: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes a model folder (see the module docstring); the folder appears complete or not at all."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} already exists (pass overwrite=True, or --force, to replace it)")
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    weights = partial / MODEL_WEIGHTS_FILE
    save_file({name: tensor.detach().contiguous().cpu() for name, tensor in state_dict.items()}, weights)
    description = {
        "format": MODEL_FORMAT,
        "version": MODEL_FORMAT_VERSION,
        "backbone": {"class": backbone_class, "kwargs": dict(backbone_kwargs)},
        "preconditioner": dict(preconditioner),
        "sample_shape": list(sample_shape),
        "weights_sha256": file_sha256(weights),
        "source": dict(source or {}),
    }
    (partial / MODEL_CONFIG_FILE).write_text(json.dumps(description, indent=2) + "\n")
    return replace_folder(partial, directory)


def _read_description(directory: Path) -> dict:
    path = directory / MODEL_CONFIG_FILE
    try:
        description = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(f"{path}: not a readable model description ({err})") from None
    if not isinstance(description, dict) or description.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{path}: not an imm_kernels model description (format {MODEL_FORMAT!r} expected)")
    if description.get("version") != MODEL_FORMAT_VERSION:
        raise ModelFileError(f"{path}: model format version {description.get('version')!r} is not supported")
    for key, kind in (("backbone", dict), ("preconditioner", dict), ("sample_shape", list), ("weights_sha256", str)):
        if not isinstance(description.get(key), kind):
            raise ModelFileError(f"{path}: {key!r} is missing or not a {kind.__name__}")
    backbone = description["backbone"]
    if not isinstance(backbone.get("class"), str) or not isinstance(backbone.get("kwargs"), dict):
        raise ModelFileError(f"{path}: 'backbone' needs a 'class' name and a 'kwargs' object")
    return description


def load_model(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> Preconditioner:
    """The Preconditioner saved in a model folder, eval mode, no gradients; the weights' checksum is verified."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .models import BACKBONES

    directory = Path(directory)
    if not is_model_folder(directory):
        raise FileNotFoundError(f"{directory} is not a model folder (no {MODEL_CONFIG_FILE} in it)")
    description = _read_description(directory)
    weights = directory / MODEL_WEIGHTS_FILE
    if not weights.is_file():
        raise ModelFileError(f"{directory}: {MODEL_WEIGHTS_FILE} is missing")
    if file_sha256(weights) != description["weights_sha256"]:
        raise ModelFileError(f"{weights}: checksum mismatch, the weights file is corrupt or was replaced")
    backbone_class = description["backbone"]["class"]
    if backbone_class not in BACKBONES:
        raise ModelFileError(f"{directory}: unknown backbone class {backbone_class!r} (known: {sorted(BACKBONES)})")
    try:
        backbone = BACKBONES[backbone_class](**description["backbone"]["kwargs"])
        net = Preconditioner(backbone, sample_shape=tuple(description["sample_shape"]), **description["preconditioner"])
    except (TypeError, ValueError) as err:
        raise ModelFileError(f"{directory / MODEL_CONFIG_FILE}: invalid model description: {err}") from None
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as err:
        raise ModelFileError(f"{weights}: not a readable safetensors file ({err})") from None
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelFileError(f"{weights}: the weights do not match the described {backbone_class}: {err}") from None
    return net.eval().requires_grad_(False).to(map_location)


def convert_official(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    key: str = "ema",
    overrides: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """An official IMM checkpoint written as a model folder (weights checked by building the model first)."""
    from .official import read_official

    official = read_official(path, key=key, overrides=overrides)
    net = official.build()  # strict load: a folder is only written for weights that fit the architecture
    return save_model(
        out_dir,
        backbone_class=official.backbone_class,
        backbone_kwargs=official.backbone_kwargs,
        preconditioner=official.preconditioner,
        sample_shape=official.sample_shape,
        state_dict=net.backbone.state_dict(),
        source={
            **official.source,
            "format": "lumalabs/imm persistence pickle",
            "official_kwargs": _jsonable(official.official_kwargs),
        },
        overwrite=overwrite,
    )


def _jsonable(value):
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def is_official_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_file() and path.suffix in OFFICIAL_SUFFIXES
