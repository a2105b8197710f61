"""`imm-kernels convert` and `imm-kernels sample --checkpoint` on official IMM checkpoints and model folders."""

import numpy as np
import pytest
import torch
from PIL import Image

from imm_kernels.models import DiT

from helpers import cli_fails, randomise_parameters, run_cli, save_tiny_vae
from official_format import official_precond_kwargs, write_official_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_DIT = dict(hidden_size=24, depth=2, num_heads=2, num_classes=5)


def official_file(tmp_path, channels=3, name="official.pkl"):
    torch.manual_seed(0)
    backbone = randomise_parameters(DiT(img_resolution=8, in_channels=channels, **TINY_DIT))
    kwargs = official_precond_kwargs(model_type="DiT", img_channels=channels, label_dim=5, **TINY_DIT)
    return write_official_checkpoint(tmp_path / name, backbone, kwargs)


def test_convert_then_sample_equals_sampling_the_official_file(tmp_path, capsys):
    official = official_file(tmp_path)
    printed = run_cli(capsys, "convert", str(official), str(tmp_path / "model"))
    assert "converted" in printed.out and (tmp_path / "model" / "model.json").is_file()

    common = ["--steps", "1,2", "--batch", "3", "--cfg-scale", "1.5", "--labels", "4,0"]
    run_cli(capsys, "sample", "--checkpoint", str(official), *common, "--out", str(tmp_path / "from_pkl.npy"))
    run_cli(capsys, "sample", "--checkpoint", str(tmp_path / "model"), *common, "--out", str(tmp_path / "dir.npy"))
    from_pkl, from_dir = np.load(tmp_path / "from_pkl.npy"), np.load(tmp_path / "dir.npy")
    assert from_pkl.shape == (2, 3, 3, 8, 8) and np.array_equal(from_pkl, from_dir)

    printed = run_cli(
        capsys, "sample", "--checkpoint", str(official), "--steps", "1,2", "--out", str(tmp_path / "s.png")
    )
    assert "one row per step count" in printed.out
    assert Image.open(tmp_path / "s.png").mode == "RGB"

    err = cli_fails(capsys, "convert", str(official), str(tmp_path / "model"))
    assert "already exists" in err


def test_latent_models_need_a_vae_for_pictures(tmp_path, capsys):
    official = official_file(tmp_path, channels=4)
    err = cli_fails(capsys, "sample", "--checkpoint", str(official), "--out", str(tmp_path / "s.png"))
    assert "are latents: give --vae DIR" in err
    run_cli(capsys, "sample", "--checkpoint", str(official), "--steps", "1", "--out", str(tmp_path / "z.npy"))
    assert np.load(tmp_path / "z.npy").shape == (1, 16, 4, 8, 8)

    err = cli_fails(
        capsys, "sample", "--checkpoint", str(official), "--vae", str(tmp_path / "no-vae"), "--out", "s.png"
    )
    assert "no-vae" in err

    pytest.importorskip("diffusers")
    vae = save_tiny_vae(tmp_path / "vae", sample_size=64)
    out = tmp_path / "pixels.png"
    run_cli(
        capsys,
        "sample",
        "--checkpoint",
        str(official),
        "--steps",
        "1",
        "--batch",
        "2",
        "--vae",
        str(vae),
        "--out",
        str(out),
    )
    assert Image.open(out).size[1] >= 64  # 8x8 latents decode to 64x64 pixels


def test_bad_official_sampling_options(tmp_path, capsys):
    official = official_file(tmp_path)
    err = cli_fails(capsys, "sample", "--checkpoint", str(official), "--labels", "5", "--out", str(tmp_path / "x.png"))
    assert "--labels must be class indices in [0, 4], got 5" in err
    err = cli_fails(capsys, "sample", "--checkpoint", str(official), "--set", "nonsense", "--out", "x.png")
    assert "expected NAME=VALUE" in err
    err = cli_fails(capsys, "sample", "--checkpoint", str(tmp_path), "--key", "model", "--out", "x.png")
    assert "--key and --set apply to official IMM checkpoint files" in err
    broken = tmp_path / "broken.pkl"
    broken.write_bytes(official.read_bytes()[:1000])
    err = cli_fails(capsys, "sample", "--checkpoint", str(broken), "--out", str(tmp_path / "x.png"))
    assert "broken.pkl: not a readable checkpoint (truncated or corrupt" in err
    err = cli_fails(capsys, "convert", str(broken), str(tmp_path / "out"))
    assert "truncated or corrupt" in err and not (tmp_path / "out").exists()
    printed = run_cli(
        capsys,
        "sample",
        "--checkpoint",
        str(official),
        "--set",
        "temb_type=stride",
        "--steps",
        "1",
        "--out",
        str(tmp_path / "stride.npy"),
    )
    assert "stride.npy" in printed.out
