"""The trainer: it learns digits, resumes bit for bit, checkpoints to safetensors, rejects bad configs."""

import dataclasses
import importlib.machinery
import json
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from imm_kernels.train import DigitsEvaluator
from imm_kernels.train.data import load_dataset
from imm_kernels.train.evaluation import digits_metric_rows, format_metric_table, load_ema_net, untrained_net
from imm_kernels.train.sampling_helpers import prior_noise, pushforward_sample
from imm_kernels.train.trainer import TrainConfig, Trainer, find_checkpoint, load_run_config

TINY = dict(batch=32, width=16, depth=1, log_every=5)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_short_digits_run_lowers_the_fd():
    config = TrainConfig(steps=200, batch=64, width=32, depth=2, lr=2e-3, warmup=50, ema_decay=0.99, seed=0)
    trainer = Trainer(config, None, progress=False)
    trainer.train()
    rows = digits_metric_rows(
        {"trained": trainer.ema},
        DigitsEvaluator(seed=0),
        untrained=untrained_net(trainer.config, trainer.data_info),
        steps=(1, 2),
        num_samples=500,
    )
    # Lower by far more than the FDs' sampling spreads (the std over the table's draws).
    by_name = {row.name: row for row in rows}
    untrained = by_name["untrained model, 1 step"]
    for trained in (by_name["trained, 1 step"], by_name["trained, 2 steps"]):
        assert trained.fd + 4 * (trained.fd_std + untrained.fd_std) < untrained.fd, format_metric_table(rows)


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    optimizer = {f"opt.{i}.{k}": v for i, s in trainer.optimizer.state_dict()["state"].items() for k, v in s.items()}
    return {
        **{f"net.{k}": v for k, v in trainer.net.state_dict().items()},
        **{f"ema.{k}": v for k, v in trainer.ema.state_dict().items()},
        **optimizer,
    }


def test_checkpoint_then_resume_continues_bit_for_bit(tmp_path, monkeypatch):
    # cuDNN may otherwise pick convolution gradients that sum with atomics (a GPU's only source of drift here).
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    # Dropout, label dropout and an epoch boundary (1085 digits / 64 per step) all depend on the RNG and data order.
    config = TrainConfig(steps=24, conditional=True, dropout=0.2, label_dropout=0.3, seed=3, **{**TINY, "batch": 64})
    straight = Trainer(config, tmp_path / "straight", progress=False)
    straight.train()

    first_half = Trainer(dataclasses.replace(config, steps=12), tmp_path / "halves", progress=False)
    first_half.train()
    resumed = Trainer.resume(tmp_path / "halves", steps=24, progress=False)
    assert resumed.step == 12
    resumed.train()

    expected, actual = _state(straight), _state(resumed)
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        assert torch.equal(actual[name], value), name
    assert not torch.equal(actual["net.backbone.out.weight"], actual["ema.backbone.out.weight"])
    # Also the checkpoints on disk.
    for file in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        saved, resaved = (load_file(find_checkpoint(tmp_path / run) / file) for run in ("straight", "halves"))
        assert all(torch.equal(saved[k], resaved[k]) for k in saved) and saved.keys() == resaved.keys(), file


def test_checkpoint_files_and_config_round_trip(tmp_path):
    config = TrainConfig(data="8gaussians", steps=6, ckpt_every=3, sample_every=3, **TINY)
    trainer = Trainer(config, tmp_path, progress=False)
    trainer.train()
    checkpoint = find_checkpoint(tmp_path)
    assert checkpoint == tmp_path / "checkpoints" / "step_0000006"
    assert (tmp_path / "latest").read_text() == "checkpoints/step_0000006\n"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000003", "step_0000006"]  # keep 2
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "config.json",
        "ema.safetensors",
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
    ]
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 6
    saved_config, data_info = load_run_config(tmp_path)
    assert saved_config == trainer.config and saved_config.sigma_data == pytest.approx(1.0, abs=0.02)
    assert data_info.shape == (2,) and data_info.kind == "vector"
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [5, 6]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_000003.png", "step_000006.png"]

    net, _, _ = load_ema_net(tmp_path)  # on the CPU, wherever it was trained
    for name, value in trainer.ema.state_dict().items():
        assert torch.equal(net.state_dict()[name], value.cpu()), name
    with pytest.raises(ValueError, match="already holds a run"):
        Trainer(config, tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="is not a checkpoint"):
        find_checkpoint(tmp_path / "samples")
    with pytest.raises(
        ValueError,
        match=r"only \['checkpoint_activations', 'ckpt_every', 'compile', 'fused_optimizer', 'keep', 'log_every', "
        r"'on_nan', 'sample_every', 'steps', 'tf32', 'workers'\] can change on resume, got \['lr'\]",
    ):
        Trainer.resume(tmp_path, lr=1.0)


def test_sigma_data_defaults_to_the_data_std_and_an_explicit_value_is_kept():
    digits = load_dataset("digits", split="train").x.double()  # the 1,085 training digits, in [-1, 1]
    expected = round(digits.std().item(), 4)
    assert 0.7 < expected < 0.8
    assert Trainer(TrainConfig(**TINY), None, progress=False).config.sigma_data == expected
    assert Trainer(TrainConfig(sigma_data=0.5, **TINY), None, progress=False).net.sigma_data == 0.5


def test_learning_rate_warms_up_then_stays_constant():
    trainer = Trainer(TrainConfig(lr=1e-3, warmup=4, **TINY), None, progress=False)
    assert [trainer.learning_rate(step) for step in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_ema_warms_up_then_averages_at_its_decay():
    trainer = Trainer(TrainConfig(ema_decay=0.5, lr=1e-2, **TINY), None, progress=False)
    params = lambda module: torch.cat([p.detach().flatten() for p in module.parameters()])  # noqa: E731
    before = params(trainer.ema)
    trainer.train_step()  # step 0: decay min(0.5, 1/10): the EMA moves 90% of the way
    torch.testing.assert_close(params(trainer.ema), 0.1 * before + 0.9 * params(trainer.net))
    trainer.step = 100
    before = params(trainer.ema)
    trainer.train_step()
    torch.testing.assert_close(params(trainer.ema), 0.5 * before + 0.5 * params(trainer.net))


def test_pushforward_visits_the_uniform_grid_from_T_to_eps():
    calls = []

    class RecordingNet(torch.nn.Module):
        T, eps, sigma_data = 0.9, 0.1, 0.5

        def forward(self, x, t, s, labels):
            calls.append((t, s))
            return x + 1

    noise = torch.zeros(3, 2)
    assert torch.equal(pushforward_sample(RecordingNet(), noise, 4), torch.full((3, 2), 4.0))
    assert [time for call in calls for time in call] == pytest.approx([0.9, 0.7, 0.7, 0.5, 0.5, 0.3, 0.3, 0.1])
    with pytest.raises(ValueError, match="num_steps must be an int >= 1"):
        pushforward_sample(RecordingNet(), noise, 0)


def test_untrained_euler_fm_samples_are_the_prior_noise():
    trainer = Trainer(TrainConfig(**TINY), None, progress=False)
    noise = prior_noise(trainer.net, 5, (1, 8, 8), seed=0)
    assert noise.std() == pytest.approx(trainer.net.sigma_data, rel=0.2)
    assert torch.equal(pushforward_sample(trainer.net, noise, 2), noise)  # G = 0 at init, c_skip = 1


def test_nvtx_ranges_around_the_step_phases(monkeypatch):
    ranges = []
    fake = types.ModuleType("nvtx")
    fake.__spec__ = importlib.machinery.ModuleSpec("nvtx", None)

    class annotate:
        def __init__(self, name, domain):
            ranges.append((name, domain))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    fake.annotate = annotate
    monkeypatch.setitem(sys.modules, "nvtx", fake)
    monkeypatch.setenv("IMM_KERNELS_NVTX", "1")
    Trainer(TrainConfig(**TINY), None, progress=False).train_step()
    assert ranges == [(name, "imm_kernels") for name in ("data", "forward", "loss", "backward", "optimizer", "ema")]
    monkeypatch.setenv("IMM_KERNELS_NVTX", "0")
    ranges.clear()
    Trainer(TrainConfig(**TINY), None, progress=False).train_step()
    assert ranges == []


def test_bf16_autocast_on_request_and_by_default_on_cuda():
    trainer = Trainer(TrainConfig(mixed_precision="bf16", **TINY), None, progress=False)
    assert trainer.net.mixed_precision == "bf16"
    assert torch.isfinite(trainer.train_step())
    auto = Trainer(TrainConfig(**TINY), None, progress=False)
    assert auto.net.mixed_precision == ("bf16" if auto.device.type == "cuda" else None)
    assert Trainer(TrainConfig(device="cpu", **TINY), None, progress=False).net.mixed_precision is None


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(batch=10, group_size=4), "batch=10 is not divisible by group_size=4"),
        (dict(T=0.2, eps=0.2), "0 <= eps < T < 1"),
        (dict(T=1.0), "0 <= eps < T < 1"),
        (dict(schedule="cosine"), "schedule must be one of"),
        (dict(param="edm"), "param must be one of"),
        (dict(schedule="vp_cosine", param="euler_fm"), "param='euler_fm' needs schedule='fm'"),
        (dict(group_size=0), "group_size must be an int >= 1"),
        (dict(lr=0.0), "lr must be positive"),
        (dict(ema_decay=1.0), r"ema_decay must be in \[0, 1\)"),
        (dict(backend="cuda-fast"), "backend must be one of"),
        (dict(label_dropout=1.5), "label_dropout must be a probability"),
    ],
)
def test_bad_configs_raise_errors_naming_the_argument(options, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**options)


def test_bad_data_for_the_config():
    with pytest.raises(ValueError, match="conditional=True but the data toy2d:checkerboard has no class labels"):
        Trainer(TrainConfig(data="toy2d", conditional=True, **TINY), None, progress=False)
    with pytest.raises(FileNotFoundError, match="no_such_file.npy"):
        Trainer(TrainConfig(data="no_such_file.npy", **TINY), None, progress=False)
