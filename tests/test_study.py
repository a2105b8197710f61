"""`imm-kernels study` (imm_kernels.study): the results file and resuming, the summary's numbers, the PNGs,
how runs are classified (diverged, collapsed), and bad input to the command. Tiny budgets: a few steps at
batch 8, 40 samples per step count (FDs of 20 samples)."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from imm_kernels import study
from imm_kernels.study import (
    COLLAPSE_MIN_CLASSES,
    CellSummary,
    RunKey,
    StudySettings,
    best_learning_rates,
    format_summary,
    read_results,
    run_outcome,
    run_study,
    samples_collapsed,
    summarize,
    train_and_score,
    write_report,
)
from imm_kernels.train.metrics import FD_DRAWS, DigitsEvaluator

from helpers import cli_fails, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(steps=2, batch=8, num_samples=40, sampling_steps=(1, 2, 8))


def tiny_settings(**changes) -> StudySettings:
    return StudySettings(**{"group_sizes": (1,), "lrs": (2e-3,), "seeds": (0, 1), **TINY, **changes})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-run study (M=1, one lr, seeds 0 and 1): (settings, folder, records, progress lines)."""
    import torch

    settings, out = tiny_settings(), tmp_path_factory.mktemp("study")
    lines = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        records = run_study(settings, out, log=lines.append)
    finally:
        torch.set_num_threads(threads)
    return settings, out, records, lines


def result_lines(out) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


# Settings.


def test_draws_default_is_the_digits_tables():
    assert StudySettings().draws == FD_DRAWS


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(group_sizes=(3,)), "group_sizes must be ints >= 1 that divide batch=8"),
        (dict(seeds=(0, 0)), "seeds lists a value twice"),
        (dict(lrs=(math.nan,)), "lrs must be finite numbers > 0"),
        (dict(lrs=()), "lrs must not be empty"),
        (dict(steps=0), "steps must be an int >= 1"),
        (dict(num_samples=3), "num_samples must be an int >= 4"),
        (dict(sampling_steps=(1, 2, 4)), "sampling_steps must include (1, 8)"),
    ],
)
def test_settings_refuse_bad_values(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_settings(**changes)


def test_every_run_has_the_same_budget_and_the_grid_runs_seed_first():
    settings = StudySettings(group_sizes=(1, 8), lrs=(1e-3, 4e-3), seeds=(0, 1), steps=1000)
    assert settings.runs()[:4] == [RunKey(1, 1e-3, 0), RunKey(8, 1e-3, 0), RunKey(1, 4e-3, 0), RunKey(8, 4e-3, 0)]
    configs = [settings.train_config(key) for key in settings.runs()]
    assert {(c.steps, c.batch, c.warmup, c.ema_decay, c.device) for c in configs} == {(1000, 128, 200, 0.998, "cpu")}
    assert StudySettings(steps=100).warmup == 25  # a short run still reaches its learning rate


# Outcomes on constructed inputs.


def test_samples_collapse_with_few_classes_or_an_fd_no_better_than_a_gaussian_fit():
    gaussian_fit = 137.0
    assert not samples_collapsed(30.0, 10, gaussian_fit)
    assert not samples_collapsed(30.0, COLLAPSE_MIN_CLASSES, gaussian_fit)
    assert samples_collapsed(30.0, COLLAPSE_MIN_CLASSES - 1, gaussian_fit)  # mode collapse, however good the FD
    assert samples_collapsed(gaussian_fit, 10, gaussian_fit) and samples_collapsed(400.0, 10, gaussian_fit)
    assert not samples_collapsed(gaussian_fit - 0.1, 10, gaussian_fit)
    assert samples_collapsed(math.nan, 10, gaussian_fit) and samples_collapsed(None, 10, gaussian_fit)
    assert not samples_collapsed(500.0, 10, None)  # without the fit's FD only the classes count


def test_a_run_collapsed_only_when_every_step_count_did():
    gaussian_fit = 137.0
    assert run_outcome([350.0, 30.0, 25.0], [10, 10, 10], gaussian_fit) == "ok"  # 1 step bad, more steps fine
    assert run_outcome([350.0, 30.0, 250.0], [10, 3, 10], gaussian_fit) == "collapsed"
    assert run_outcome([None, None, None], [1, 1, 1], gaussian_fit) == "collapsed"


def test_a_huge_learning_rate_is_recorded_as_diverged_not_raised():
    settings = tiny_settings(lrs=(1e9,), seeds=(0,))
    record = train_and_score(RunKey(1, 1e9, 0), settings, DigitsEvaluator(seed=0))
    assert record["outcome"] == "diverged" and "diverged" in record["message"]
    assert "fd" not in record and record["settings"] == settings.run_settings()


# Bookkeeping of a finished study.


def test_results_hold_one_line_per_run_with_its_scores(finished):
    settings, out, records, lines = finished
    recorded = result_lines(out)
    assert [(r["group_size"], r["lr"], r["seed"]) for r in recorded] == [tuple(key) for key in settings.runs()]
    assert recorded == records
    for record in recorded:
        assert record["settings"] == settings.run_settings()
        assert len(record["fd"]) == len(record["fd_std"]) == len(record["class_counts"]) == 3
        assert record["sample_size"] == 20 and all(sum(counts) == 40 for counts in record["class_counts"])
        # two steps of training learn no digits: every FD is above the Gaussian fit's
        assert record["outcome"] == "collapsed" and min(record["fd"]) >= record["gaussian_fit_fd"]
    assert len(lines) == 4 and lines[1].startswith("[1/2] M=1 lr=0.002 seed=0: collapsed, FD at 1/2/8 steps")


def test_the_summary_table_is_the_mean_and_std_of_the_recorded_runs(finished):
    settings, out, records, _ = finished
    summary = (out / "summary.md").read_text()
    assert summary == format_summary(records, settings)
    at_1 = [r["fd"][0] for r in records]
    at_8 = [r["fd"][2] for r in records]
    row = (
        f"| 1 | 0.002 | 2 | {np.mean(at_1):.1f} ± {np.std(at_1, ddof=1):.1f} | "
        f"{np.mean(at_8):.1f} ± {np.std(at_8, ddof=1):.1f} | 0/2 | 2/2 | 2/2 |"
    )
    assert row in summary.splitlines()
    for record in records:
        fds = " | ".join(f"{fd:.1f}" for fd in record["fd"])
        assert f"| 1 | 0.002 | {record['seed']} | collapsed | {fds} |" in summary


def test_the_pngs_are_written(finished):
    _, out, _, _ = finished
    for name, width in (("fd_vs_steps.png", 640), ("fd_by_group_size.png", 960)):
        with Image.open(out / name) as png:
            assert png.format == "PNG" and png.size == (width, 400)


def test_a_study_started_again_skips_its_finished_runs(finished, tmp_path, monkeypatch):
    settings, out, records, _ = finished
    folder = tmp_path / "again"
    folder.mkdir()
    (folder / "results.jsonl").write_text((out / "results.jsonl").read_text())
    trained = []

    def record_call(key, settings, evaluator):
        trained.append(key)
        return {**records[0], **key._asdict()}

    monkeypatch.setattr(study, "train_and_score", record_call)
    assert run_study(settings, folder, log=lambda line: None) == records and trained == []
    wider = tiny_settings(seeds=(0, 1, 2))  # a seed more, same settings per run: only it runs
    assert run_study(wider, folder, log=lambda line: None)[:2] == records and trained == [RunKey(1, 2e-3, 2)]
    assert len(result_lines(folder)) == 3


def test_the_same_settings_give_the_same_numbers(finished, tmp_path):
    settings, _, records, _ = finished
    again = run_study(settings, tmp_path, log=lambda line: None)
    scores = ("fd", "fd_std", "class_counts", "untrained_fd", "final_loss", "outcome")
    assert [{k: r[k] for k in scores} for r in again] == [{k: r[k] for k in scores} for r in records]


def test_results_of_other_settings_are_refused_unless_started_over(finished, tmp_path):
    settings, out, _, _ = finished
    (tmp_path / "results.jsonl").write_text((out / "results.jsonl").read_text())
    longer = tiny_settings(steps=3)
    with pytest.raises(ValueError, match="other settings .*train_config.steps: 2 there, 3 here"):
        run_study(longer, tmp_path, log=lambda line: None)
    with pytest.raises(ValueError, match="num_samples: 40 there, 50 here"):
        read_results(tmp_path, tiny_settings(num_samples=50))
    assert len(result_lines(tmp_path)) == 2  # refusing wrote nothing
    records = run_study(longer, tmp_path, restart=True, log=lambda line: None)
    assert [r["settings"]["train_config"]["steps"] for r in result_lines(tmp_path)] == [3, 3]
    assert records == result_lines(tmp_path)


def test_a_line_cut_short_is_skipped_and_the_next_record_starts_a_new_line(finished, tmp_path, monkeypatch):
    settings, out, records, _ = finished
    (tmp_path / "results.jsonl").write_text(
        (out / "results.jsonl").read_text().splitlines()[0] + '\n{"group_size": 1, "lr'
    )
    assert list(read_results(tmp_path, settings)) == [RunKey(1, 2e-3, 0)]
    monkeypatch.setattr(study, "train_and_score", lambda key, settings, evaluator: records[1])
    run_study(settings, tmp_path, log=lambda line: None)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert lines[1] == '{"group_size": 1, "lr' and json.loads(lines[2]) == records[1]
    assert list(read_results(tmp_path, settings)) == [RunKey(1, 2e-3, 0), RunKey(1, 2e-3, 1)]


def test_a_line_that_is_no_study_record_is_an_error(tmp_path):
    (tmp_path / "results.jsonl").write_text('{"loss": 1.0}\n')
    with pytest.raises(ValueError, match="line 1: not a study record"):
        read_results(tmp_path, tiny_settings())


# The summary on constructed records.


def constructed(m: int, lr: float, seed: int, fds, outcome: str = "ok") -> dict:
    trained = outcome != "diverged"
    record = {"group_size": m, "lr": lr, "seed": seed, "outcome": outcome, "train_s": 1.0, "message": "boom"}
    if trained:
        record.update(
            fd=list(fds), fd_std=[2.0] * len(fds), covered_classes=[10] * len(fds), final_loss=0.1, sample_size=177
        )
        record.update(untrained_fd=400.0, gaussian_fit_fd=137.0, floor_fd=10.0, floor_fd_std=1.0)
    return record


def test_summarize_and_best_learning_rates_on_constructed_records():
    settings = StudySettings(group_sizes=(1, 4), lrs=(1e-3, 4e-3), seeds=(0, 1), sampling_steps=(1, 8))
    records = [
        constructed(1, 1e-3, 0, [40.0, 20.0]),
        constructed(1, 1e-3, 1, [50.0, 30.0]),
        constructed(1, 4e-3, 0, [20.0, 10.0]),
        constructed(1, 4e-3, 1, [], "diverged"),
        constructed(4, 1e-3, 0, [300.0, 300.0], "collapsed"),
        constructed(4, 1e-3, 1, [150.0, 20.0]),  # no digits at 1 step, digits at 8
        constructed(4, 4e-3, 0, [], "diverged"),
        constructed(4, 4e-3, 1, [], "diverged"),
    ]
    cells = {(c.group_size, c.lr): c for c in summarize(records, settings)}
    std = np.std([40, 50], ddof=1)
    assert cells[(1, 1e-3)] == CellSummary(1, 1e-3, 2, 0, 0, 0, (45.0, 25.0), (std, std), (2.0, 2.0))
    assert (cells[(4, 1e-3)].collapsed, cells[(4, 1e-3)].collapsed_at_one_step) == (1, 2)
    assert cells[(1, 4e-3)].fd_mean == (20.0, 10.0) and cells[(1, 4e-3)].fd_std == (None, None)
    assert cells[(4, 4e-3)].fd_mean == (None, None) and cells[(4, 4e-3)].diverged == 2
    best = best_learning_rates(list(cells.values()))
    # M=1: the lower FD at 4e-3 does not beat 1e-3, where no run failed; M=4: every 4e-3 run diverged
    assert best[1].lr == 1e-3 and best[4].lr == 1e-3
    summary = format_summary(records, settings)
    rows = summary.splitlines()
    assert "| 1 | 0.004 | 2 | 20.0 | 10.0 | 1/2 | 0/2 | 0/2 |" in rows
    assert "| 4 | 0.004 | 2 | – | – | 2/2 | 0/2 | 0/2 |" in rows
    at_1, at_8 = f"{np.std([300, 150], ddof=1):.1f}", f"{np.std([300, 20], ddof=1):.1f}"
    assert f"| 4 | 0.001 | 2 | 225.0 ± {at_1} | 160.0 ± {at_8} | 0/2 | 1/2 | 2/2 |" in rows
    assert "- M=4 lr=0.004 seed=1: boom" in summary


def test_a_study_whose_every_run_diverged_still_writes_its_report(tmp_path):
    settings = StudySettings(group_sizes=(1, 4), lrs=(1.0,), seeds=(0, 1), sampling_steps=(1, 8))
    records = [constructed(key.group_size, key.lr, key.seed, [], "diverged") for key in settings.runs()]
    summary, *pngs = write_report(records, settings, tmp_path)
    assert "| 4 | 1 | 2 | – | – | 2/2 | 0/2 | 0/2 |" in summary.read_text().splitlines()
    for png in pngs:
        with Image.open(png) as image:
            assert image.format == "PNG"


# The command.


def test_cli_runs_a_tiny_study_and_prints_the_summary(tmp_path, capsys):
    out = tmp_path / "study"
    command = ["study", "--group-sizes", "1,2", "--lrs", "2e-3", "--seeds", "0", "--batch", "8", "--num-samples", "40"]
    printed = run_cli(capsys, *command, "--steps", "2", "--out", str(out))
    assert "[2/2] M=2 lr=0.002 seed=0: collapsed" in printed.out
    assert "## FD by group size and learning rate" in printed.out
    assert len(result_lines(out)) == 2 and (out / "fd_by_group_size.png").is_file()
    again = run_cli(capsys, *command, "--steps", "2", "--out", str(out))
    assert "2 runs of 2 steps at batch 8, 2 already in" in again.out and "[1/" not in again.out
    err = cli_fails(capsys, *command, "--steps", "3", "--out", str(out))
    assert "--out: " in err and "other settings" in err and "--force" in err
    run_cli(capsys, *command[:2], "1", *command[3:], "--steps", "3", "--out", str(out), "--force")
    assert len(result_lines(out)) == 1


@pytest.mark.parametrize(
    "options, message",
    [
        (["--group-sizes", "0"], "argument --group-sizes: expected group sizes like 1,2,4,8, got '0'"),
        (["--group-sizes", "1,1"], "argument --group-sizes: --group-sizes must differ, got '1,1' (1 twice)"),
        (["--group-sizes", "3"], "--group-sizes: M=3 does not divide --batch 128"),
        (["--group-sizes", "4", "--batch", "6"], "--group-sizes: M=4 does not divide --batch 6"),
        (["--lrs=-1e-3"], "argument --lrs: expected learning rates > 0 like 1e-3,2e-3, got '-1e-3'"),
        (["--lrs", "nan"], "argument --lrs: expected learning rates > 0"),
        (["--lrs", "2e-3,x"], "argument --lrs: expected learning rates > 0"),
        (["--seeds", "-1"], "argument --seeds: expected seeds in [0, 4294967295] like 0,1,2, got '-1'"),
        (["--seeds", "0,1,0"], "argument --seeds: --seeds must differ, got '0,1,0' (0 twice)"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--batch", "0"], "--batch must be >= 1, got 0"),
        (["--num-samples", "3"], "--num-samples must be >= 4"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--steps", "x"], "argument --steps: invalid int value: 'x'"),
    ],
)
def test_cli_bad_input_names_the_argument(options, message, tmp_path, capsys):
    out = tmp_path / "study"
    err = cli_fails(capsys, "study", "--quick", *options, "--out", str(out))
    assert message in err and not out.exists()


def test_cli_refuses_an_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert "--out '" in cli_fails(capsys, "study", "--quick", "--out", str(tmp_path / "file"))
