"""imm_kernels.load_official: official IMM checkpoints read without executing them, rebuilt strictly.

The checkpoints are written by tests/official_format.py in the official persistence layout
from this project's own modules, so "the loaded model equals the source model" checks the
whole path: unpickling, the records, the constructor arguments, the strict weight load and
the preconditioner settings.
"""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from imm_kernels import Preconditioner, load_official
from imm_kernels.models import DiT, SongUNet
from imm_kernels.official import OfficialCheckpointError, read_official

from helpers import randomise_parameters
from official_format import (
    load_with_plain_pickle,
    official_checkpoint_bytes,
    official_precond_kwargs,
    write_official_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# The official DiT class with explicit sizes (model_type "DiT"), small enough for the CPU.
TINY_DIT = dict(hidden_size=24, depth=2, num_heads=2, num_classes=5)


def tiny_dit(**options) -> DiT:
    torch.manual_seed(0)
    return randomise_parameters(DiT(img_resolution=8, in_channels=3, backend="torch", **TINY_DIT, **options))


def dit_kwargs(**overrides) -> dict:
    return official_precond_kwargs(**{"model_type": "DiT", "label_dim": 5, **TINY_DIT, **overrides})


def sample_inputs(batch=3, channels=3, label_dim=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, 8, 8, generator=generator)
    t = 0.2 + 0.7 * torch.rand(batch, generator=generator, dtype=torch.float64)
    s = t * torch.rand(batch, generator=generator, dtype=torch.float64)
    labels = torch.arange(batch) % label_dim
    return x, t, s, labels


def source_preconditioner(backbone, **settings) -> Preconditioner:
    """What the official IMMPrecond with these settings computes, built directly around the source backbone."""
    return Preconditioner(backbone, **{"label_dim": 5, **settings}).eval()


# ---------------------------------------------------------------------------
# Nothing from the file runs
# ---------------------------------------------------------------------------


def test_code_planted_in_module_src_runs_under_pickle_but_never_under_load_official(tmp_path):
    marker = tmp_path / "planted-code-ran"
    planted = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    path = write_official_checkpoint(tmp_path / "net.pkl", tiny_dit(), dit_kwargs(), module_src=planted)

    load_official(path)
    read_official(path)
    assert not marker.exists()

    load_with_plain_pickle(path)  # the positive control: the official way to open the file runs it
    assert marker.read_text() == "ran"


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvaluatesCode:
    def __reduce__(self):
        return (eval, ("1 + 1",))


@pytest.mark.parametrize("payload, global_name", [("system", r"(posix|os|nt)\.system"), ("eval", r"builtins\.eval")])
def test_any_other_global_is_refused_by_name_and_never_called(tmp_path, payload, global_name):
    marker = tmp_path / "command-ran"
    evil = _RunsACommand(marker) if payload == "system" else _EvaluatesCode()
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": evil, "other": 1}))
    with pytest.raises(OfficialCheckpointError, match=rf"refusing to load the global {global_name}"):
        load_official(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------
# The loaded model is the source model
# ---------------------------------------------------------------------------


DIT_OPTIONS = {
    "qk_norm": dict(qk_norm=True),
    "no-s-embed": dict(s_embed=False),
    "temb_mult-2": dict(temb_mult=2),
    "fourier-no-mlp": dict(embedding_kwargs=dict(embedding_type="fourier", use_mlp=False, frequency_embedding_size=24)),
    "label-dropout-row": dict(class_dropout_prob=0.1, dropout=0.1),
}


@pytest.mark.parametrize("torch_save", [False, True], ids=["pickle", "torch.save"])
@pytest.mark.parametrize("options", list(DIT_OPTIONS.values()), ids=list(DIT_OPTIONS))
def test_loaded_dit_equals_the_source_model(tmp_path, torch_save, options):
    backbone = tiny_dit(**options)
    path = tmp_path / "net.pkl"
    path.write_bytes(official_checkpoint_bytes(backbone, dit_kwargs(**options), torch_save=torch_save))
    net = load_official(path)
    net.backbone.backend = "torch"
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    reference = source_preconditioner(backbone)
    x, t, s, labels = sample_inputs()
    with torch.no_grad():
        assert torch.equal(net(x, t, s, labels), reference(x, t, s, labels))
        assert torch.equal(net.guided(x, t, s, labels, 1.5), reference.guided(x, t, s, labels, 1.5))


# The official SongUNet arguments, scaled down (CIFAR-10's config with fewer channels, blocks and levels).
TINY_UNET = dict(
    model_channels=8,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[4],
    embedding_type="positional",
    encoder_type="standard",
    decoder_type="standard",
    channel_mult_noise=1,
    resample_filter=[1, 1],
    s_embed=True,
    dropout=0.2,
)


@pytest.mark.parametrize("omegaconf_values", [False, True], ids=["plain", "omegaconf"])
def test_loaded_songunet_equals_the_source_model(tmp_path, omegaconf_values):
    torch.manual_seed(0)
    backbone = randomise_parameters(SongUNet(img_resolution=8, in_channels=3, backend="torch", **TINY_UNET))
    recorded = official_precond_kwargs(model_type="SongUNet", f_type="simple_edm", eps=0.006, **TINY_UNET)
    if omegaconf_values:  # construct_class_by_name(**config.network) records ListConfigs for the lists
        omegaconf = pytest.importorskip("omegaconf")
        recorded = dict(**omegaconf.OmegaConf.create(recorded))
        assert type(recorded["channel_mult"]).__name__ == "ListConfig"
    path = write_official_checkpoint(tmp_path / "cifar.pt", backbone, recorded)
    official = read_official(path)
    assert official.backbone_class == "SongUNet" and official.backbone_kwargs["channel_mult"] == [1, 2]
    net = official.build()
    net.backbone.backend = "torch"
    assert (net.param, net.eps, net.label_dim, net.sample_shape) == ("simple_edm", 0.006, 0, (3, 8, 8))
    reference = Preconditioner(backbone, param="simple_edm", eps=0.006).eval()
    x, t, s, _ = sample_inputs()
    with torch.no_grad():
        assert torch.equal(net(x, t, s), reference(x, t, s))


def test_settings_come_from_the_file(tmp_path):
    settings = dict(
        noise_schedule="vp_cosine",
        f_type="simple_edm",
        temb_type="stride",
        sigma_data=0.7,
        T=0.9,
        eps=0.01,
        time_scale=500.0,
        mixed_precision="bf16",
    )
    path = write_official_checkpoint(tmp_path / "net.pkl", tiny_dit(), dit_kwargs(**settings))
    net = load_official(path)
    assert (net.schedule.name, net.param, net.time_embed) == ("vp_cosine", "simple_edm", "stride")
    assert (net.sigma_data, net.T, net.eps, net.time_scale) == (0.7, 0.9, 0.01, 500.0)
    # float32 as the official sampler runs it, whatever the file recorded for training
    assert (net.mixed_precision, net.label_dim, net.sample_shape) == (None, 5, (3, 8, 8))
    assert read_official(path).official_kwargs["mixed_precision"] == "bf16"
    assert load_official(path, overrides={"mixed_precision": "bf16"}).mixed_precision == "bf16"
    official = read_official(path)
    assert official.backbone_class == "DiT" and official.backbone_kwargs["num_classes"] == 5
    assert official.source["file"] == "net.pkl" and len(official.source["sha256"]) == 64

    overridden = load_official(path, overrides={"temb_type": "identity", "time_scale": 1000})
    assert (overridden.time_embed, overridden.time_scale) == ("identity", 1000.0)


def test_official_dit_class_count_ignores_label_dim(tmp_path):
    """IMMPrecond passes label_dim to the DiT, which ignores it: 1000 classes unless num_classes is given."""
    kwargs = dict(TINY_DIT, num_classes=1000)
    torch.manual_seed(0)
    backbone = DiT(img_resolution=8, in_channels=3, **kwargs)
    precond = official_precond_kwargs(model_type="DiT", label_dim=1000, **{k: v for k, v in kwargs.items()})
    del precond["num_classes"]
    path = write_official_checkpoint(tmp_path / "net.pkl", backbone, precond)
    net = load_official(path)
    assert net.backbone.num_classes == 1000 and net.label_dim == 1000


def test_named_dit_configs_take_their_sizes_from_the_class_name(tmp_path):
    torch.manual_seed(0)
    backbone = DiT(img_resolution=8, patch_size=8, in_channels=3, hidden_size=384, depth=12, num_heads=6, num_classes=5)
    path = write_official_checkpoint(
        tmp_path / "s8.pkl", backbone, official_precond_kwargs(model_type="DiT_S_8", num_classes=5, label_dim=5)
    )
    official = read_official(path)
    sizes = {key: official.backbone_kwargs[key] for key in ("depth", "hidden_size", "num_heads", "patch_size")}
    assert sizes == {"depth": 12, "hidden_size": 384, "num_heads": 6, "patch_size": 8}
    net = official.build()
    assert all(torch.equal(net.backbone.state_dict()[k], v) for k, v in backbone.state_dict().items())


def test_omegaconf_containers_in_the_recorded_arguments(tmp_path):
    omegaconf = pytest.importorskip("omegaconf")
    options = {"embedding_kwargs": {"embedding_type": "fourier", "scale": 2.0, "frequency_embedding_size": 16}}
    backbone = tiny_dit(**options)
    # what construct_class_by_name(**config.network) records: OmegaConf containers for nested values
    recorded = dict(**omegaconf.OmegaConf.create(dit_kwargs(**options)))
    assert type(recorded["embedding_kwargs"]).__name__ == "DictConfig"
    path = write_official_checkpoint(tmp_path / "net.pkl", backbone, recorded)
    official = read_official(path)
    assert official.backbone_kwargs["embedding_kwargs"] == options["embedding_kwargs"]
    x, t, s, labels = sample_inputs()
    net = official.build()
    net.backbone.backend = "torch"  # as the source model's
    with torch.no_grad():
        assert torch.equal(net(x, t, s, labels), source_preconditioner(backbone)(x, t, s, labels))


def test_arguments_the_official_class_ignores_are_dropped_with_a_warning(tmp_path):
    path = write_official_checkpoint(tmp_path / "net.pkl", tiny_dit(), dit_kwargs(encoder_type="standard"))
    with pytest.warns(UserWarning, match=r"DiT ignores the arguments \['encoder_type'\]"):
        official = read_official(path)
    assert official.ignored_kwargs == {"encoder_type": "standard"}


# ---------------------------------------------------------------------------
# Bad files: one clear error each
# ---------------------------------------------------------------------------


def test_corrupt_and_truncated_files(tmp_path):
    data = official_checkpoint_bytes(tiny_dit(), dit_kwargs())
    zipped = official_checkpoint_bytes(tiny_dit(), dit_kwargs(), torch_save=True)
    for name, content in [
        ("truncated.pkl", data[: len(data) // 2]),
        ("garbage.pkl", os.urandom(4096)),
        ("empty.pkl", b""),
        ("truncated-zip.pt", zipped[: len(zipped) - 200]),
    ]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(OfficialCheckpointError, match=rf"{name}: not a readable checkpoint \(truncated or corrupt"):
            load_official(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_official(tmp_path / "missing.pkl")


def test_missing_or_unsupported_content(tmp_path):
    path = write_official_checkpoint(tmp_path / "net.pkl", tiny_dit(), dit_kwargs())
    with pytest.raises(OfficialCheckpointError, match=r"no 'nope' entry; the file holds \['ema'\]"):
        load_official(path, key="nope")

    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"ema": {"weights": [1, 2]}}))
    with pytest.raises(OfficialCheckpointError, match="the 'ema' entry is a dict, not an IMM network"):
        load_official(plain)

    mismatched = write_official_checkpoint(tmp_path / "mismatch.pkl", tiny_dit(), dit_kwargs())
    with pytest.raises(OfficialCheckpointError, match="model_type is 'SongUNet' but the stored network is a 'DiT'"):
        load_official(mismatched, overrides={"model_type": "SongUNet"})

    dhariwal = write_official_checkpoint(tmp_path / "adm.pkl", tiny_dit(), dit_kwargs(model_type="DhariwalUNet"))
    with pytest.raises(OfficialCheckpointError, match="backbone 'DhariwalUNet' is not supported"):
        read_official(dhariwal)

    with pytest.raises(OfficialCheckpointError, match="unknown DiT configuration 'DiT_XXL_2'"):
        read_official(write_official_checkpoint(tmp_path / "xxl.pkl", tiny_dit(), dit_kwargs(model_type="DiT_XXL_2")))


def test_weights_that_do_not_fit_the_recorded_architecture(tmp_path):
    path = write_official_checkpoint(tmp_path / "net.pkl", tiny_dit(qk_norm=True), dit_kwargs())  # kwargs lack qk_norm
    with pytest.raises(OfficialCheckpointError, match=r"net.pkl: its DiT weights do not match .*q_norm"):
        load_official(path)
    with pytest.raises(TypeError, match="map_location must be a device string"):
        read_official(path, map_location={"cuda": "cpu"})


def test_a_network_without_recorded_arguments(tmp_path):
    path = write_official_checkpoint(tmp_path / "net.pkl", tiny_dit(), dit_kwargs(), record_init_kwargs=False)
    with pytest.raises(OfficialCheckpointError, match=r"IMMPrecond object does not record its constructor arguments"):
        load_official(path)
