"""The imm-kernels command: train, resume, eval and demo end to end; bad input as clear errors."""

import json

import numpy as np
import pytest

from helpers import cli_fails, run_cli

TINY = [*"--batch 32 --width 16 --depth 1".split()]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_toy2d_writes_checkpoint_and_scatter_then_resumes_and_evaluates(tmp_path, capsys):
    out = tmp_path / "toy"
    printed = run_cli(capsys, *"train --data toy2d --steps 6 --sample-every 3 --out".split(), str(out), *TINY)
    assert "done: step 6" in printed.out
    assert (out / "checkpoints" / "step_0000006" / "model.safetensors").is_file()
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_000003.png", "step_000006.png"]
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["data"] == "toy2d" and config["width"] == 16 and config["steps"] == 6

    printed = run_cli(capsys, "train", "--resume", str(out), "--steps", "8")
    assert "done: step 8" in printed.out
    assert json.loads((out / "checkpoints" / "step_0000008" / "state.json").read_text())["step"] == 8

    printed = run_cli(capsys, "eval", "--checkpoint", str(out), "--steps", "1,2", "--num-samples", "300")
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["samples_1step.png", "samples_2step.png"]
    assert "FD" not in printed.out  # the digits table is for digits only

    err = cli_fails(capsys, "train", "--resume", str(out), "--lr", "0.1")
    assert "only steps, sample_every, ckpt_every, log_every, on_nan, keep, compile, checkpoint_activations, " in err
    assert "tf32, fused_optimizer, workers can change, got lr" in err
    err = cli_fails(capsys, *"train --data toy2d --steps 2 --out".split(), str(out), *TINY)
    assert "already holds a run" in err


def test_latent_arrays_train_and_eval_to_npy(tmp_path, capsys):
    latents = tmp_path / "latents.npy"
    np.save(latents, np.random.default_rng(0).normal(size=(64, 6)).astype(np.float32))
    out = tmp_path / "run"
    run_cli(capsys, "train", "--data", str(latents), "--steps", "2", "--out", str(out), *TINY)
    run_cli(
        capsys,
        "eval",
        "--checkpoint",
        str(out / "checkpoints" / "step_0000002"),
        "--steps",
        "2",
        "--num-samples",
        "10",
        "--out",
        str(tmp_path / "eval"),
    )
    assert np.load(tmp_path / "eval" / "samples_2step.npy").shape == (10, 6)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--batch", "10", "--group-size", "4"], "batch=10 is not divisible by group_size=4"),
        (["--T", "0.1", "--eps", "0.1"], "0 <= eps < T < 1"),
        (["--schedule", "vp_cosine"], "param='euler_fm' needs schedule='fm'"),
        (["--data", "missing_digits.npz"], "'missing_digits.npz' is neither a built-in data set"),
    ],
)
def test_train_bad_configs_exit_with_a_message(tmp_path, capsys, options, message):
    err = cli_fails(capsys, "train", "--out", str(tmp_path / "run"), *options)
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_train_rejects_unknown_choices_and_bad_data_files(tmp_path, capsys):
    assert "invalid choice: 'cosine'" in cli_fails(capsys, "train", "--out", str(tmp_path), "--schedule", "cosine")
    assert "invalid choice: 'edm'" in cli_fails(capsys, "train", "--out", str(tmp_path), "--param", "edm")
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((4, 3, 5)))
    assert f"{bad}: array has shape (4, 3, 5)" in cli_fails(capsys, "train", "--data", str(bad), "--out", str(tmp_path))
    assert "--out is required" in cli_fails(capsys, "train")
    err = cli_fails(capsys, "eval", "--checkpoint", str(tmp_path / "nothing"))
    assert f"checkpoint '{tmp_path / 'nothing'}' is not a checkpoint" in err
    assert "expected step counts" in cli_fails(capsys, "eval", "--checkpoint", str(tmp_path), "--steps", "1,x")
    err = cli_fails(capsys, "demo", "--num-samples", "3", "--out", str(tmp_path / "demo"))
    assert "--num-samples must be >= 4 for the metric table, got 3" in err and not (tmp_path / "demo").exists()
    assert "group_size must be an int >= 1" in cli_fails(capsys, "demo", "--group-size", "0", "--out", str(tmp_path))


def test_demo_tiny_budget_prints_the_table_and_eval_reprints_it(tmp_path, capsys):
    out = tmp_path / "demo"
    printed = run_cli(capsys, *"demo --steps 20 --batch 64 --num-samples 200 --out".split(), str(out))
    lines = printed.out.splitlines()
    table = [line for line in lines if line.startswith(("real digits", "gaussian fit", "untrained", "trained"))]
    names = [
        "real digits (held out)",
        "gaussian fit of the pixels",
        "untrained model, 1 step",
        "trained (EMA), 1 step",
        "trained (EMA), 2 steps",
        "trained (EMA), 4 steps",
        "trained (EMA), 8 steps",
    ]
    assert [line.split("  ")[0].strip() for line in table] == 2 * names  # the FD table, then the class shares
    assert "FD: 100 samples to as many held-out digits" in printed.out  # half of --num-samples
    assert (out / "samples_m4.png").is_file() and (out / "m4" / "latest").is_file()

    # eval scores the checkpoint with the same draws: its model rows are the demo's, to the digit.
    printed = run_cli(capsys, "eval", "--checkpoint", str(out / "m4"), "--num-samples", "200")
    eval_rows = [line for line in printed.out.splitlines() if line.startswith(("untrained", "trained"))]
    assert len(eval_rows) == 10 and set(eval_rows) <= set(table)


def _options(command: str) -> dict:
    """The options of one subcommand's parser, by flag."""
    from imm_kernels.cli import build_parser

    subcommands = next(a for a in build_parser()._actions if a.dest == "command")
    return {flag: action for action in subcommands.choices[command]._actions for flag in action.option_strings}


def test_every_choice_list_is_the_constant_the_code_checks_against():
    from imm_kernels.ops.backends import BACKEND_NAMES
    from imm_kernels.precond import PARAMS, TIME_EMBEDS
    from imm_kernels.sampling import GRID_KINDS, SAMPLERS
    from imm_kernels.sampling.latency import BENCH_MODELS, PRECISIONS
    from imm_kernels.schedules import SCHEDULE_NAMES
    from imm_kernels.train.trainer import (
        DEVICE_CHOICES,
        DIST_CHOICES,
        MIXED_PRECISION_CHOICES,
        MODEL_CHOICES,
        ON_NAN_CHOICES,
    )

    expected = {
        "train": {
            "--schedule": SCHEDULE_NAMES,
            "--param": PARAMS,
            "--time-embed": TIME_EMBEDS,
            "--backend": BACKEND_NAMES,
            "--mixed-precision": MIXED_PRECISION_CHOICES,
            "--device": DEVICE_CHOICES,
            "--on-nan": ON_NAN_CHOICES,
            "--model": MODEL_CHOICES,
            "--dist": DIST_CHOICES,
        },
        "eval": {"--device": DEVICE_CHOICES},
        "sample": {"--sampler": SAMPLERS, "--grid": GRID_KINDS, "--device": DEVICE_CHOICES},
        "bench-sampling": {"--model": BENCH_MODELS, "--precision": PRECISIONS},
    }
    for command in ("demo", "study", "train", "eval", "plot", "sample", "convert", "bench-sampling", "report"):
        choices = {flag: action.choices for flag, action in _options(command).items() if action.choices is not None}
        assert choices.keys() == expected.get(command, {}).keys(), command
        assert all(choices[flag] is constant for flag, constant in expected.get(command, {}).items()), command


def test_resume_takes_the_fields_the_trainer_lets_change():
    from imm_kernels.train.trainer import RESUMABLE_FIELDS, TrainConfig

    train_options = {action.dest for action in _options("train").values()}
    assert set(RESUMABLE_FIELDS) <= train_options and set(RESUMABLE_FIELDS) <= set(TrainConfig.__dataclass_fields__)


def test_report_lists_the_backends_and_times_the_auto_choice(capsys):
    import torch

    from imm_kernels.ops.backends import MMD_AUTO, backends, choose_backend

    printed = run_cli(capsys, "report", "--repeats", "1", "--no-compile").out
    for backend, reason in backends().items():
        assert f"  {backend:<8} {'available' if reason is None else 'unavailable: ' + reason}" in printed
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    auto = choose_backend("auto", device, MMD_AUTO, dtype=dtype, group_size=4).name
    assert "eager reference" in printed
    if auto == "torch":  # the auto row would time the eager reference again
        assert "mmd_loss (auto" not in printed
    else:
        assert f"mmd_loss (auto -> {auto})" in printed
