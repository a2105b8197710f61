"""`imm-kernels plot`: a run's training curves and its EMA model's samples as PNG files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .common import (
    MAX_SAMPLING_STEPS,
    SETUP_ERRORS,
    check_count,
    check_output_folder,
    check_sampling_memory,
    fail,
    parse_step_counts,
    sampling_parts,
    seed,
)

FD_STEPS = (1, 2, 4, 8, 16)


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "plot",
        help="a run's training curves, FD vs sampling steps (digits) or scatter plots (2-D data) as PNGs",
        description="Writes PNGs of a training run into RUN_DIR/plots: the curves of its log.jsonl (loss, loss by "
        "time bin, samples/s, FD at checkpoints where logged) and, from its newest checkpoint's EMA model, FD "
        "against sampling steps (digits runs) or a scatter plot per step count over the data's density "
        "(2-D toys).",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run's folder (imm-kernels train --out)")
    parser.add_argument("--out", help="folder for the PNGs (default: RUN_DIR/plots)")
    parser.add_argument("--force", action="store_true", help="write into --out even if it holds files")
    parser.add_argument(
        "--no-fd",
        action="store_true",
        help="plot the training curves only: do not sample the checkpoint (FD vs steps for digits, which also "
        "trains the digit classifier, and the scatter plots of 2-D runs)",
    )
    parser.add_argument(
        "--steps",
        type=parse_step_counts,
        default=FD_STEPS,
        help=f"comma-separated step counts to sample, at most {MAX_SAMPLING_STEPS} "
        f"(default: {','.join(map(str, FD_STEPS))})",
    )
    parser.add_argument(
        "--num-samples",
        type=int,
        default=1000,
        help="samples per step count: FD's sample size, or the points of each scatter plot (default: %(default)s)",
    )
    parser.add_argument("--seed", type=seed, default=0, help="seed of the prior draws, 0 to 2**32 - 1 (default: 0)")
    parser.set_defaults(run=run)


def run(args) -> None:
    from ..plots import plot_training_curves, read_log
    from ..train.trainer import LOG_FILE

    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out is not None else run_dir / "plots"
    net = data_info = None
    try:
        num_samples = check_count("--num-samples", args.num_samples)
        if not run_dir.is_dir():
            raise NotADirectoryError(f"RUN_DIR {str(run_dir)!r} is not a folder; give a run's folder (train --out)")
        if not (run_dir / LOG_FILE).is_file():
            raise FileNotFoundError(
                f"RUN_DIR {str(run_dir)!r} has no {LOG_FILE}; give a run's folder (train --out), which holds its log"
            )
        records = read_log(run_dir / LOG_FILE)
        check_output_folder("--out", out, force=args.force)
        if not args.no_fd:
            net, data_info = _open_ema(run_dir)
            if data_info.name == "digits" and num_samples < 2:
                raise ValueError(f"--num-samples must be >= 2 for FD (a covariance), got {num_samples}")
            parts = sampling_parts(
                net, num_samples, data_info.shape, args.steps, guided=False, restart=False, graphed=False
            )
            results = {"results": 2 * num_samples * math.prod(data_info.shape) * 4}  # the noise and one step count's
            check_sampling_memory("--num-samples", num_samples, torch.device("cpu"), parts, results)
    except SETUP_ERRORS as err:
        fail("plot", err)

    written = list(plot_training_curves(records, out).values())
    if not written:
        print(f"{run_dir / LOG_FILE}: no loss, samples/s or FD values to plot")
    if net is not None:
        if data_info.name == "digits":
            written += _fd_vs_steps(net, data_info.shape, run_dir, out, args.steps, num_samples, args.seed)
        elif data_info.shape == (2,):
            written += _scatter_plots(net, data_info.name, out, args.steps, num_samples, args.seed)
        else:
            print(f"no sample plots for {data_info.name} data (FD vs steps: digits; scatter plots: 2-D data)")
    if written:
        print(f"plots: {', '.join(map(str, written))}")


def _open_ema(run_dir: Path):
    """(EMA net, DataInfo) of the run's newest checkpoint; errors name RUN_DIR."""
    from ..train.checkpoints import CheckpointError
    from ..train.evaluation import load_ema_net

    try:
        net, _, data_info = load_ema_net(run_dir)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"RUN_DIR {str(run_dir)!r} has no checkpoint to sample; pass --no-fd to plot the training curves only"
        ) from err
    except CheckpointError as err:
        raise CheckpointError(f"RUN_DIR {str(run_dir)!r}: {err}") from err
    return net, data_info


def _fd_vs_steps(
    net, shape, run_dir: Path, out: Path, steps: tuple[int, ...], num_samples: int, seed: int
) -> list[Path]:
    """FD of the EMA model's samples at each step count, every count from the same prior draws, as
    fd_vs_steps.png and its numbers as fd_vs_steps.json; prints them."""
    from ..plots import plot_fd_vs_steps
    from ..train.metrics import DigitsEvaluator
    from ..train.sampling_helpers import balanced_labels, prior_noise, pushforward_sample

    evaluator = DigitsEvaluator(seed=0)
    noise = prior_noise(net, num_samples, shape, seed)
    labels = balanced_labels(net, num_samples)
    fds = [evaluator.fd(pushforward_sample(net, noise, num_steps, labels)) for num_steps in steps]
    print(f"FD of the EMA model to the held-out digits ({num_samples} samples, seed {seed}; lower is better):")
    for num_steps, fd in zip(steps, fds):
        print(f"  {num_steps:4d} step{'s' if num_steps > 1 else ' '}  {fd:8.2f}")
    numbers = out / "fd_vs_steps.json"
    numbers.parent.mkdir(parents=True, exist_ok=True)
    finite_fds = [fd if math.isfinite(fd) else None for fd in fds]  # NaN samples give NaN, which JSON lacks
    summary = {"steps": list(steps), "fd": finite_fds, "num_samples": num_samples, "seed": seed, "classifier_seed": 0}
    numbers.write_text(json.dumps(summary, indent=1) + "\n")
    series = {"EMA model": (steps, fds, None)}
    return [plot_fd_vs_steps(series, out / "fd_vs_steps.png", title=f"FD vs sampling steps: {run_dir.name}"), numbers]


def _scatter_plots(net, data_name: str, out: Path, steps, num_points: int, seed: int) -> list[Path]:
    """A scatter plot of num_points samples per step count, over the density of the run's toy data."""
    from ..train.sampling_helpers import save_points_scatter

    return [
        save_points_scatter(net, out / f"samples_{n}step.png", n, num_points=num_points, seed=seed, data_name=data_name)
        for n in steps
    ]
