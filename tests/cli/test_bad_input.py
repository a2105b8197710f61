"""Bad input to the imm-kernels command ends it with one clear line and exit status 2, checked before any
sampling starts: option bounds, output paths, the memory a call needs, corrupt data files; --debug adds
the traceback."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import cli_fails, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--batch", "32", "--width", "16", "--depth", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny training runs: 2-D points (unconditional), digits (conditional) and 6-D vectors."""
    from imm_kernels.cli import main

    root = tmp_path_factory.mktemp("runs")
    vectors = root / "vectors.npy"
    np.save(vectors, np.random.default_rng(0).normal(size=(64, 6)).astype(np.float32))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, data in (("toy", ["toy2d"]), ("digits", ["digits", "--conditional"]), ("vectors", [str(vectors)])):
            main(["train", "--data", *data, "--steps", "1", "--out", str(root / name), *TINY])
    finally:
        torch.set_num_threads(threads)
    return {name: str(root / name) for name in ("toy", "digits", "vectors")}


def one_line_error(err: str, command: str) -> str:
    """The message of a `fail` error: exactly one line on stderr, no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"imm-kernels {command}: error: "), err
    return lines[0]


@pytest.mark.parametrize(
    "options, message",
    [
        (["--steps", "1000000000"], "at most 1000 each, got '1000000000'"),
        (["--steps", "1,1001"], "at most 1000 each"),
        (["--batch", "-5"], "--batch must be >= 1, got -5"),
        (["--batch", "1000001"], "--batch must be at most 1000000, got 1000001"),
        (["--cfg-scale", "nan"], "argument --cfg-scale: expected a finite number, got 'nan'"),
        (["--cfg-scale", "inf"], "argument --cfg-scale: expected a finite number, got 'inf'"),
        (["--cfg-scale=-inf"], "argument --cfg-scale: expected a finite number, got '-inf'"),
        (["--steps", "2", "--grid", "eta", "--mid-eta", "nan"], "argument --mid-eta: expected finite numbers"),
        (["--steps", "2", "--grid", "eta", "--mid-eta", "inf"], "argument --mid-eta: expected finite numbers"),
        (["--seed", "-1"], "argument --seed: expected a seed in [0, 4294967295]"),
        (["--seed", str(2**32)], "argument --seed: expected a seed in [0, 4294967295]"),
        (["--seed", str(2**64 - 1), "--sampler", "restart", "--steps", "2"], "argument --seed: expected a seed"),
        (["--labels", "10"], "--labels must be class indices in [0, 9], got 10"),
        (["--labels", "1,2,3", "--batch", "2"], "--labels gives 3 labels for a batch of 2; give --batch 3 or more"),
    ],
)
def test_sample_options_out_of_range(runs, tmp_path, capsys, options, message):
    out = tmp_path / "samples.png"
    err = cli_fails(capsys, "sample", "--checkpoint", runs["digits"], "--steps", "1", *options, "--out", str(out))
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err
    assert not out.exists()


def test_sample_output_paths(runs, tmp_path, capsys):
    sample = ["sample", "--checkpoint", runs["toy"], "--steps", "1", "--batch", "8", "--out"]
    (tmp_path / "folder.png").mkdir()
    err = cli_fails(capsys, *sample, str(tmp_path / "folder.png"))
    assert "is a folder; give a file name" in one_line_error(err, "sample")

    (tmp_path / "a_file").write_text("x")
    err = cli_fails(capsys, *sample, str(tmp_path / "a_file" / "deeper" / "x.png"))
    assert f"{str(tmp_path / 'a_file')!r} is a file, so no folder can be made in it" in one_line_error(err, "sample")

    for name in ("x.jpg", "no_suffix"):
        err = cli_fails(capsys, *sample, str(tmp_path / name))
        assert "--out must end in .png or .npy" in one_line_error(err, "sample")
        assert not (tmp_path / name).exists()

    existing = tmp_path / "precious.png"
    existing.write_bytes(b"precious")
    err = cli_fails(capsys, *sample, str(existing))
    assert "precious.png' exists; pass --force to replace it" in one_line_error(err, "sample")
    assert existing.read_bytes() == b"precious"
    run_cli(capsys, *sample, str(existing), "--force")
    assert Image.open(existing).format == "PNG"

    run_cli(capsys, *sample, str(tmp_path / "new" / "sub" / "made.png"))  # missing folders are made
    assert (tmp_path / "new" / "sub" / "made.png").is_file()
    run_cli(capsys, *sample, str(tmp_path / "upper.NPY"))  # the suffix in any case: an array, not a PNG
    assert np.load(tmp_path / "upper.NPY").shape == (1, 8, 2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc takes no new files on Linux")
def test_unwritable_output_folders(runs, tmp_path, capsys):
    err = cli_fails(capsys, "sample", "--checkpoint", runs["toy"], "--out", "/proc/imm-kernels-test/x.png")
    assert "--out: cannot create files in '/proc'" in one_line_error(err, "sample")
    err = cli_fails(capsys, "eval", "--checkpoint", runs["toy"], "--out", "/proc/imm-kernels-test")
    assert "--out: cannot create files in '/proc'" in one_line_error(err, "eval")


def test_sample_refuses_a_batch_beyond_the_memory_and_suggests_one_that_fits(runs, tmp_path, capsys, monkeypatch):
    from imm_kernels.cli import common

    monkeypatch.setattr(common, "available_memory", lambda device: 2**20)
    out = tmp_path / "x.npy"
    err = cli_fails(capsys, "sample", "--checkpoint", runs["digits"], "--batch", "5000", "--out", str(out))
    line = one_line_error(err, "sample")
    assert "--batch 5000 needs about" in line and "of host memory (noise" in line and "activations" in line
    assert "more than the 1.0 MiB available: use --batch" in line and not out.exists()
    suggested = int(line.rsplit("use --batch ", 1)[1].split()[0])
    assert 1 <= suggested < 5000
    run_cli(capsys, "sample", "--checkpoint", runs["digits"], "--batch", str(suggested), "--out", str(out))
    assert np.load(out).shape == (4, suggested, 1, 8, 8)

    monkeypatch.setattr(common, "available_memory", lambda device: 100)
    err = cli_fails(capsys, "sample", "--checkpoint", runs["digits"], "--batch", "2", "--out", str(tmp_path / "y.npy"))
    assert "not even one sample fits" in one_line_error(err, "sample")


def test_the_memory_estimate_counts_guidance_restart_and_graphs(runs):
    from imm_kernels.cli.common import ACTIVATION_COPIES, sampling_parts, widest_output_bytes
    from imm_kernels.train.evaluation import load_ema_net

    net = load_ema_net(runs["digits"])[0]
    widest = widest_output_bytes(net, lambda: net(torch.zeros(1, 1, 8, 8), net.T, net.eps, torch.zeros(1).long()))
    plain = sampling_parts(net, 10, (1, 8, 8), (1, 4), guided=False, restart=False, graphed=False)
    assert plain == {
        "noise": 10 * 64 * 4,
        "states": 2 * 10 * 64 * 4,
        "labels": 10 * 10 * 4,
        "times": 0,
        "activations": ACTIVATION_COPIES * widest * 10,
    }
    guided = sampling_parts(net, 10, (1, 8, 8), (1, 4), guided=True, restart=True, graphed=True)
    assert guided["activations"] == 2 * 2 * plain["activations"]  # the 2B guided batch; warm-up beside the graph
    assert guided["states"] == 2 * (plain["states"] + 3 * 10 * 64 * 4)  # restart's 3 fresh noise draws
    assert guided["labels"] == 2 * plain["labels"] and guided["times"] == 2 * 4 * 10 * 8


def test_available_memory_reads_the_host(monkeypatch):
    from imm_kernels.cli.common import available_memory

    available = available_memory(torch.device("cpu"))
    assert available is None or available > 0
    if sys.platform.startswith("linux"):
        meminfo = next(line for line in Path("/proc/meminfo").read_text().splitlines() if "MemAvailable" in line)
        # The smaller of MemAvailable and any container limit; 10% for what other processes free between the reads.
        assert available <= int(meminfo.split()[1]) * 1024 * 1.1


def test_sample_with_non_finite_results_writes_nothing(runs, tmp_path, capsys):
    # 1e39 is a finite double, but the float32 guidance overflows: every value turns NaN or infinite.
    out = tmp_path / "x.png"
    options = ["--steps", "1", "--batch", "4", "--cfg-scale", "1e39", "--out", str(out)]
    err = cli_fails(capsys, "sample", "--checkpoint", runs["digits"], *options)
    assert "256 of 256 sampled values are NaN or infinite, so nothing was written" in one_line_error(err, "sample")
    assert not out.exists()


def test_sample_out_of_gpu_memory_is_one_line(runs, tmp_path, capsys, monkeypatch):
    from imm_kernels.cli import sample

    class OutOfMemory:
        def __init__(self, *args, **kwargs):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB. GPU 0 has 1 GiB free.")

    monkeypatch.setattr(sample, "GraphedSampler", OutOfMemory)
    err = cli_fails(capsys, "sample", "--checkpoint", runs["toy"], "--out", str(tmp_path / "x.png"))
    assert one_line_error(err, "sample") == (
        "imm-kernels sample: error: out of GPU memory at --batch 1000 (CUDA out of memory. Tried to allocate "
        "9.00 GiB); use a smaller --batch"
    )


@pytest.mark.parametrize(
    "options, message",
    [
        (["--num-samples", "0"], "--num-samples must be >= 1, got 0"),
        (["--num-samples", "-1"], "--num-samples must be >= 1, got -1"),
        (["--num-samples", str(10**7)], "--num-samples must be at most 1000000"),
        (["--steps", "100000"], "at most 1000 each"),
        (["--cfg-scale", "nan"], "argument --cfg-scale: expected a finite number, got 'nan'"),
        (["--cfg-scale", "2"], "--cfg-scale needs a conditional checkpoint"),
        (["--seed", "-1"], "argument --seed: expected a seed in [0, 4294967295]"),
        (["--seed", str(2**64)], "argument --seed: expected a seed in [0, 4294967295]"),
    ],
)
def test_eval_options_out_of_range(runs, tmp_path, capsys, options, message):
    out = tmp_path / "eval"
    err = cli_fails(capsys, "eval", "--checkpoint", runs["toy"], "--num-samples", "50", *options, "--out", str(out))
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err
    assert not out.exists()


def test_eval_checks_the_digits_sample_count_and_memory_before_sampling(runs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "eval"
    err = cli_fails(capsys, "eval", "--checkpoint", runs["digits"], "--num-samples", "3", "--out", str(out))
    assert "--num-samples must be >= 4 for the digits table, got 3" in one_line_error(err, "eval")
    assert not out.exists()  # refused before any sample was written

    from imm_kernels.cli import common

    monkeypatch.setattr(common, "available_memory", lambda device: 2**16)
    err = cli_fails(capsys, "eval", "--checkpoint", runs["vectors"], "--num-samples", "1000", "--out", str(out))
    assert "--num-samples 1000 needs about" in one_line_error(err, "eval") and not out.exists()


def test_eval_output_folder(runs, tmp_path, capsys):
    evaluate = ["eval", "--checkpoint", runs["vectors"], "--steps", "1", "--num-samples", "10", "--out"]
    (tmp_path / "a_file").write_text("x")
    err = cli_fails(capsys, *evaluate, str(tmp_path / "a_file"))
    assert "a_file' is a file, not a folder" in one_line_error(err, "eval")

    out = tmp_path / "eval"
    run_cli(capsys, *evaluate, str(out))
    assert np.load(out / "samples_1step.npy").shape == (10, 6)
    err = cli_fails(capsys, *evaluate, str(out))
    assert "eval' is not empty; pass --force to write into it" in one_line_error(err, "eval")
    run_cli(capsys, *evaluate, str(out), "--force")


def test_other_commands_bounds(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    err = cli_fails(capsys, "demo", "--steps", "2", "--out", str(tmp_path / "a_file"))
    assert "a_file' is a file, not a folder" in one_line_error(err, "demo")
    bench = ["bench-sampling", "--model", "tiny", "--no-compile", "--repeats", "1"]
    assert "argument --cfg-scale: expected a finite number" in cli_fails(capsys, *bench, "--cfg-scale", "nan")
    assert "at most 1000 each" in cli_fails(capsys, *bench, "--steps", "100000")
    assert "batch sizes like 1,4,16, at most 1000000 each" in cli_fails(capsys, *bench, "--batch", "10000000")
    err = cli_fails(capsys, "report", "--repeats", "0")
    assert one_line_error(err, "report") == "imm-kernels report: error: --repeats must be >= 1, got 0"


def test_debug_adds_the_traceback_to_a_bad_input_error(tmp_path, capsys, monkeypatch):
    missing = ["sample", "--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")]
    quiet = cli_fails(capsys, *missing)
    assert "Traceback" not in quiet and "is not a checkpoint" in one_line_error(quiet, "sample")

    loud = cli_fails(capsys, "--debug", *missing)
    assert loud.startswith("Traceback (most recent call last):") and "FileNotFoundError" in loud
    assert loud.strip().splitlines()[-1] == quiet.strip()

    monkeypatch.setenv("IMM_KERNELS_DEBUG", "1")
    assert cli_fails(capsys, *missing) == loud
    monkeypatch.setenv("IMM_KERNELS_DEBUG", "0")
    assert cli_fails(capsys, *missing) == quiet


def test_unexpected_errors_keep_their_traceback(runs, tmp_path, monkeypatch):
    """A bug is not bad input: it propagates (and prints its traceback) with or without --debug."""
    from imm_kernels.cli import main, sample

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(sample, "GraphedSampler", broken)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        main(["sample", "--checkpoint", runs["toy"], "--out", str(tmp_path / "x.png")])


def truncated_npz(path: Path) -> Path:
    np.savez(path, x=np.zeros((10, 3)))
    path.write_bytes(path.read_bytes()[:100])
    return path


def huge_labels_npz(path: Path) -> Path:
    # Before the class bound, a conditional run on these labels asked for a 9 PB label table.
    np.savez(path, x=np.random.default_rng(0).normal(size=(8, 2)), y=np.array([0, 1, 2, 3, 0, 1, 2, 2**45]))
    return path


def too_wide_image_folder(path: Path) -> Path:
    path.mkdir()
    Image.new("L", (1100, 4)).save(path / "wide.png")
    return path


@pytest.mark.parametrize(
    "make_data, message",
    [
        (truncated_npz, "bad.npz: unreadable array file, truncated or corrupt (File is not a zip file)"),
        (huge_labels_npz, "bad.npz: labels 'y' go up to 35184372088832, but class indices must be below 100000"),
        (too_wide_image_folder, "wide.png: image is 1100×4; training images may be at most 1024 pixels on a side"),
    ],
)
def test_train_on_a_bad_data_file_is_one_line(tmp_path, capsys, make_data, message):
    data = make_data(tmp_path / ("bad.npz" if make_data is not too_wide_image_folder else "images"))
    options = ["--steps", "1", "--conditional", "--out", str(tmp_path / "run"), *TINY]
    err = cli_fails(capsys, "train", "--data", str(data), *options)
    assert message in one_line_error(err, "train")
