"""`imm-kernels eval`: sample a checkpoint; the metric table for digits, plots or arrays otherwise."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .common import (
    MAX_SAMPLES,
    MAX_SAMPLING_STEPS,
    SETUP_ERRORS,
    check_count,
    check_output_folder,
    check_sampling_memory,
    fail,
    finite_float,
    parse_step_counts,
    sampling_parts,
    seed,
)


def add_parser(commands) -> None:
    parser = commands.add_parser("eval", help="sample a checkpoint; the metric table for digits")
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="run directory or checkpoint folder")
    parser.add_argument(
        "--steps",
        type=parse_step_counts,
        default=(1, 2, 4, 8),
        help=f"comma-separated step counts, at most {MAX_SAMPLING_STEPS} (default: 1,2,4,8)",
    )
    parser.add_argument(
        "--num-samples",
        type=int,
        default=1000,
        help=f"samples per step count, at most {MAX_SAMPLES} and what the memory estimate allows (default: 1000)",
    )
    parser.add_argument("--seed", type=seed, default=0, help="seed of the prior draws, 0 to 2**32 - 1 (default: 0)")
    parser.add_argument(
        "--cfg-scale",
        type=finite_float,
        default=1.0,
        help="classifier-free guidance scale for conditional models (default: %(default)s)",
    )
    parser.add_argument("--out", help="folder for the sample files (default: CHECKPOINT/eval)")
    parser.add_argument("--force", action="store_true", help="write into --out even if it holds files")
    parser.set_defaults(run=run)


def run(args) -> None:
    from ..train.evaluation import digits_metric_rows, format_metric_table, load_ema_net, untrained_net, write_samples
    from ..train.trainer import find_checkpoint, run_directory_of

    try:
        num_samples = check_count("--num-samples", args.num_samples)  # before the checkpoint loads
        net, config, data_info = load_ema_net(args.checkpoint)
        guided = args.cfg_scale != 1.0  # the samplers' convention: 1 is the conditional model itself
        if guided and not net.label_dim:
            raise ValueError("--cfg-scale needs a conditional checkpoint (trained with --conditional)")
        if data_info.name == "digits":  # the table's check, made before any sampling
            from ..train.data import load_dataset

            train_size = len(load_dataset("digits", split="train"))
            if not 2 <= num_samples <= train_size:
                raise ValueError(
                    f"--num-samples must be in [2, {train_size}] (the training digits) for the digits table, "
                    f"got {num_samples}"
                )
        out = Path(args.out) if args.out is not None else run_directory_of(find_checkpoint(args.checkpoint)) / "eval"
        check_output_folder("--out", out, force=args.force)
        device_parts = sampling_parts(
            net, num_samples, data_info.shape, args.steps, guided=guided, restart=False, graphed=False
        )
        results = {"results": len(args.steps) * num_samples * math.prod(data_info.shape) * 4}
        check_sampling_memory("--num-samples", num_samples, torch.device("cpu"), device_parts, results)
    except SETUP_ERRORS as err:
        fail("eval", err)
    paths = write_samples(
        net, data_info, out, steps=args.steps, num_samples=num_samples, seed=args.seed, cfg_scale=args.cfg_scale
    )
    if data_info.name == "digits":
        from ..train.metrics import DigitsEvaluator

        rows = digits_metric_rows(
            {"trained (EMA)": net},
            DigitsEvaluator(seed=0),
            untrained=untrained_net(config, data_info),
            steps=args.steps,
            num_samples=num_samples,
            seed=args.seed,
            cfg_scale=args.cfg_scale,
        )
        print(format_metric_table(rows))
    print(f"samples: {', '.join(map(str, paths))}")
