"""`imm-kernels plot RUN_DIR`: the curves of a real run's log, FD vs sampling steps of its EMA model (digits),
scatter plots over the data's density (2-D toys), and one-line errors for a RUN_DIR it cannot plot."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import cli_fails, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--batch", "32", "--width", "16", "--depth", "1", "--log-every", "4"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny training runs of 12 steps, logged every 4: digits and the 2-D checkerboard."""
    from imm_kernels.cli import main

    root = tmp_path_factory.mktemp("plot_runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in ("digits", "toy2d"):
            main(["train", "--data", name, "--steps", "12", "--out", str(root / name), *TINY])
    finally:
        torch.set_num_threads(threads)
    return root


def png(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image)


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imm-kernels plot: error: "), err
    return lines[0]


def test_plot_curves_only(runs, capsys, tmp_path):
    run = runs / "digits"
    out = tmp_path / "curves"
    printed = run_cli(capsys, "plot", str(run), "--no-fd", "--out", str(out)).out
    assert sorted(p.name for p in out.iterdir()) == ["loss.png", "loss_by_t.png", "throughput.png"]
    for path in out.iterdir():
        height, width = png(path).shape[:2]
        assert 500 <= width <= 1000 and 300 <= height <= 800
        assert str(path) in printed

    # The default folder is RUN_DIR/plots; writing into a folder that holds files takes --force.
    run_copy = tmp_path / "run"
    shutil.copytree(run, run_copy)
    run_cli(capsys, "plot", str(run_copy), "--no-fd")
    assert (run_copy / "plots" / "loss.png").is_file()
    err = one_line_error(cli_fails(capsys, "plot", str(run_copy), "--no-fd"))
    assert "--out" in err and "pass --force" in err
    run_cli(capsys, "plot", str(run_copy), "--no-fd", "--force")


def test_plot_fd_vs_steps_of_a_digits_run(runs, capsys, tmp_path):
    from imm_kernels.train.evaluation import load_ema_net
    from imm_kernels.train.metrics import DigitsEvaluator
    from imm_kernels.train.sampling_helpers import balanced_labels, prior_noise, pushforward_sample

    run, out = runs / "digits", tmp_path / "fd"
    printed = run_cli(capsys, "plot", str(run), *"--steps 1,2 --num-samples 60 --seed 3 --out".split(), str(out))
    assert "FD of the EMA model" in printed.out
    assert (out / "fd_vs_steps.png").is_file() and png(out / "fd_vs_steps.png").shape[1] >= 500
    recorded = json.loads((out / "fd_vs_steps.json").read_text())
    assert recorded["steps"] == [1, 2] and recorded["num_samples"] == 60 and recorded["seed"] == 3

    # The same numbers from the run's EMA model, sampled here from the same prior draws.
    net = load_ema_net(run)[0]
    noise, labels = prior_noise(net, 60, (1, 8, 8), 3), balanced_labels(net, 60)
    evaluator = DigitsEvaluator(seed=0)
    expected = [evaluator.fd(pushforward_sample(net, noise, n, labels)) for n in (1, 2)]
    assert recorded["fd"] == pytest.approx(expected, rel=1e-9)
    assert recorded["fd"][0] != pytest.approx(recorded["fd"][1], rel=1e-6)  # the step counts did differ


def test_plot_scatter_plots_of_a_toy_run_over_its_density(runs, capsys, tmp_path):
    out = tmp_path / "toy"
    run_cli(capsys, "plot", str(runs / "toy2d"), "--steps", "1,4", "--num-samples", "200", "--out", str(out))
    assert {"samples_1step.png", "samples_4step.png", "loss.png"} <= {p.name for p in out.iterdir()}
    canvas = png(out / "samples_4step.png")
    assert canvas.shape == (512, 512)
    shaded = (canvas >= 170) & (canvas < 250) & (canvas != 200)  # the density's greys (200: the axes)
    assert shaded.mean() > 0.05  # the checkerboard's squares cover about a sixth of the plot


def test_plot_bad_run_dir_is_one_line_naming_it(runs, capsys, tmp_path):
    missing = tmp_path / "nothing"
    err = one_line_error(cli_fails(capsys, "plot", str(missing)))
    assert f"RUN_DIR {str(missing)!r} is not a folder" in err

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert "is not a folder" in one_line_error(cli_fails(capsys, "plot", str(a_file)))

    no_log = tmp_path / "no_log"
    no_log.mkdir()
    err = one_line_error(cli_fails(capsys, "plot", str(no_log), "--no-fd"))
    assert f"RUN_DIR {str(no_log)!r} has no log.jsonl" in err

    log_only = tmp_path / "log_only"
    log_only.mkdir()
    shutil.copy(runs / "digits" / "log.jsonl", log_only / "log.jsonl")
    err = one_line_error(cli_fails(capsys, "plot", str(log_only)))
    assert f"RUN_DIR {str(log_only)!r} has no checkpoint to sample" in err and "--no-fd" in err
    assert not (log_only / "plots").exists()  # nothing written before the error
    run_cli(capsys, "plot", str(log_only), "--no-fd")  # the curves need the log only
    assert (log_only / "plots" / "loss.png").is_file()

    err = one_line_error(cli_fails(capsys, "plot", str(runs / "digits"), "--num-samples", "0"))
    assert "--num-samples must be >= 1" in err
    assert "argument --steps" in cli_fails(capsys, "plot", str(runs / "digits"), "--steps", "0")
