"""Model folders (imm_kernels.model_files): official checkpoint → convert → load_model, checksums, bad folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from imm_kernels import convert_official, load_model, load_official
from imm_kernels.model_files import MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE, ModelFileError
from imm_kernels.models import DiT
from imm_kernels.sampling import pushforward, time_grid

from helpers import randomise_parameters
from official_format import official_precond_kwargs, write_official_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_DIT = dict(hidden_size=24, depth=2, num_heads=2, num_classes=5)


@pytest.fixture
def official_file(tmp_path):
    torch.manual_seed(0)
    backbone = randomise_parameters(DiT(img_resolution=8, in_channels=3, qk_norm=True, **TINY_DIT))
    kwargs = official_precond_kwargs(model_type="DiT", label_dim=5, qk_norm=True, f_type="simple_edm", **TINY_DIT)
    return write_official_checkpoint(tmp_path / "official.pkl", backbone, kwargs)


def test_converted_folder_samples_exactly_as_the_official_file(official_file, tmp_path):
    folder = convert_official(official_file, tmp_path / "converted")
    description = json.loads((folder / MODEL_CONFIG_FILE).read_text())
    assert description["backbone"]["class"] == "DiT" and description["backbone"]["kwargs"]["qk_norm"] is True
    assert description["preconditioner"]["param"] == "simple_edm" and description["sample_shape"] == [3, 8, 8]
    assert description["source"]["file"] == "official.pkl" and description["source"]["key"] == "ema"

    loaded, converted = load_official(official_file), load_model(folder)
    assert converted.sample_shape == loaded.sample_shape == (3, 8, 8)
    for name, value in loaded.state_dict().items():
        assert torch.equal(converted.state_dict()[name], value), name
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5
    grid, labels = time_grid("uniform", 2, loaded.T, loaded.eps), torch.tensor([0, 1, 2, 3])
    assert torch.equal(pushforward(converted, noise, grid, labels, 1.5), pushforward(loaded, noise, grid, labels, 1.5))


def test_an_existing_folder_is_kept_unless_overwrite(official_file, tmp_path):
    folder = convert_official(official_file, tmp_path / "converted")
    with pytest.raises(FileExistsError, match="already exists"):
        convert_official(official_file, folder)
    assert convert_official(official_file, folder, overwrite=True) == folder
    assert sorted(path.name for path in tmp_path.iterdir()) == ["converted", "official.pkl"]


def test_an_overwrite_that_fails_before_the_new_folder_is_in_place_keeps_the_old_one(
    official_file, tmp_path, monkeypatch
):
    folder = convert_official(official_file, tmp_path / "converted")
    weights = (folder / MODEL_WEIGHTS_FILE).read_bytes()
    rename = Path.rename

    def fail_for_the_new_folder(self, target):
        if self.name.endswith(".partial"):
            raise OSError("disk gone")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", fail_for_the_new_folder)
    with pytest.raises(OSError, match="disk gone"):
        convert_official(official_file, folder, overwrite=True)
    assert (tmp_path / "converted.replaced" / MODEL_WEIGHTS_FILE).read_bytes() == weights


def test_corrupt_or_inconsistent_folders_give_one_clear_error(official_file, tmp_path):
    folder = convert_official(official_file, tmp_path / "converted")
    weights, config = folder / MODEL_WEIGHTS_FILE, folder / MODEL_CONFIG_FILE
    description = json.loads(config.read_text())

    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    with pytest.raises(ModelFileError, match="checksum mismatch"):
        load_model(folder)
    weights.write_bytes(original)

    config.write_text("{not json")
    with pytest.raises(ModelFileError, match="not a readable model description"):
        load_model(folder)

    for edit, message in [
        ({"format": "other"}, "not an imm_kernels model description"),
        ({"version": 9}, "version 9 is not supported"),
        ({"sample_shape": None}, "'sample_shape' is missing"),
        ({"backbone": {"class": "Nope", "kwargs": {}}}, "unknown backbone class 'Nope'"),
        ({"backbone": {"class": "DiT", "kwargs": {"depth": -1}}}, "invalid model description"),
    ]:
        config.write_text(json.dumps({**description, **edit}))
        with pytest.raises(ModelFileError, match=message):
            load_model(folder)

    config.write_text(json.dumps(description))
    weights.unlink()
    with pytest.raises(ModelFileError, match="model.safetensors is missing"):
        load_model(folder)
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        load_model(tmp_path)


def test_weights_of_another_architecture_are_refused(official_file, tmp_path):
    folder = convert_official(official_file, tmp_path / "converted")
    config = folder / MODEL_CONFIG_FILE
    description = json.loads(config.read_text())
    description["backbone"]["kwargs"]["qk_norm"] = False
    config.write_text(json.dumps(description))
    with pytest.raises(ModelFileError, match="do not match the described DiT"):
        load_model(folder)
