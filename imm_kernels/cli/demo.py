"""`imm-kernels demo`: train IMM on 8×8 digits, write samples and print the metric table."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .common import SETUP_ERRORS, check_count, check_output_folder, fail, seed


def add_parser(commands) -> None:
    parser = commands.add_parser("demo", help="train on 8x8 digits, write samples and print the metric table")
    parser.add_argument(
        "--out",
        default="imm-kernels-demo",
        help="output folder; a previous demo's files in it are replaced (default: %(default)s)",
    )
    parser.add_argument("--steps", type=int, help="training steps (default: the train default)")
    parser.add_argument("--batch", type=int, help="batch size (default: the train default)")
    parser.add_argument("--seed", type=seed, help="seed of init, data order and draws, 0 to 2**32 - 1 (default: 0)")
    parser.add_argument("--group-size", type=int, default=4, help="M, particles per group (default: %(default)s)")
    parser.add_argument(
        "--compare-m1",
        action="store_true",
        help="also train M=1 (the consistency-style baseline) with the same budget; about doubles the time",
    )
    parser.add_argument(
        "--num-samples",
        type=int,
        default=1000,
        help="samples per table row, at least 4; each FD uses half of them, at most half the held-out digits "
        "(default: %(default)s)",
    )
    parser.set_defaults(run=run)


def run(args) -> None:
    from ..train.evaluation import MIN_TABLE_SAMPLES, digits_metric_rows, format_metric_table, untrained_net
    from ..train.metrics import DigitsEvaluator
    from ..train.sampling_helpers import save_steps_grid
    from ..train.trainer import TrainConfig, Trainer

    started = time.perf_counter()
    out = Path(args.out)
    group_sizes = (args.group_size, 1) if args.compare_m1 else (args.group_size,)
    overrides = {name: getattr(args, name) for name in ("steps", "batch", "seed") if getattr(args, name) is not None}
    try:
        check_output_folder("--out", out, force=True)  # the demo's own folder: rewritten on every run
        configs = {m: TrainConfig(group_size=m, **overrides) for m in group_sizes}
        if args.num_samples < MIN_TABLE_SAMPLES:  # checked now, not after minutes of training
            raise ValueError(
                f"--num-samples must be >= {MIN_TABLE_SAMPLES} for the metric table, got {args.num_samples}"
            )
        check_count("--num-samples", args.num_samples)
    except SETUP_ERRORS as err:
        fail("demo", err)
    print(
        f"imm-kernels demo: IMM on sklearn's 8x8 digits, {torch.get_num_threads()} CPU thread(s)"
        if not torch.cuda.is_available()
        else "imm-kernels demo: IMM on sklearn's 8x8 digits, on CUDA"
    )
    trained, train_seconds = {}, {}
    for m, config in configs.items():
        print(
            f"\ntraining M={m}: {config.steps} steps, batch {config.batch}, lr {config.lr}, "
            f"EMA {config.ema_decay} -> {out / f'm{m}'}"
        )
        trainer = Trainer(config, out / f"m{m}", overwrite=True)
        summary = trainer.train()
        train_seconds[m] = summary["wall_s"]
        trained[m] = trainer.ema.cpu().float()
        print(f"M={m}: {config.steps} steps in {summary['wall_s']:.0f} s ({summary['samples_per_s']:.0f} samples/s)")
    grids = [
        save_steps_grid(net, out / f"samples_m{m}.png", (1, 8, 8), seed=trainer.config.seed)
        for m, net in trained.items()
    ]

    evaluator = DigitsEvaluator(seed=0)
    print(
        f"\nevaluating {args.num_samples} samples per row in the features of a digit classifier\n"
        "(trained on digits apart from the models' and the held-out ones; "
        f"{evaluator.test_accuracy:.1%} accurate on the held-out digits)"
    )
    models = {f"trained M={m} (EMA)" if len(trained) > 1 else "trained (EMA)": net for m, net in trained.items()}
    rows = digits_metric_rows(
        models,
        evaluator,
        untrained=untrained_net(trainer.config, trainer.data_info),
        num_samples=args.num_samples,
        seed=trainer.config.seed,
    )
    print(format_metric_table(rows))
    print(f"\nsamples (rows: 1, 2, 4, 8 steps): {', '.join(map(str, grids))}")
    print(
        f"training {' + '.join(f'{s:.0f} s (M={m})' for m, s in train_seconds.items())}; "
        f"total {time.perf_counter() - started:.0f} s"
    )
