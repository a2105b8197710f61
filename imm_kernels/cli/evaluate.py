"""`imm-kernels eval`: sample a checkpoint; the metric table for digits, plots or arrays otherwise."""

from __future__ import annotations

from pathlib import Path

from .common import SETUP_ERRORS, fail, parse_step_counts


def add_parser(commands) -> None:
    parser = commands.add_parser("eval", help="sample a checkpoint; the metric table for digits")
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="run directory or checkpoint folder")
    parser.add_argument(
        "--steps", type=parse_step_counts, default=(1, 2, 4, 8), help="comma-separated step counts (default: 1,2,4,8)"
    )
    parser.add_argument("--num-samples", type=int, default=1000, help="samples per step count (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prior draws (default: %(default)s)")
    parser.add_argument(
        "--cfg-scale",
        type=float,
        default=1.0,
        help="classifier-free guidance scale for conditional models (default: %(default)s)",
    )
    parser.add_argument("--out", help="folder for the sample files (default: CHECKPOINT/eval)")
    parser.set_defaults(run=run)


def run(args) -> None:
    from ..train.evaluation import digits_metric_rows, format_metric_table, load_ema_net, untrained_net, write_samples
    from ..train.trainer import find_checkpoint

    try:
        net, config, data_info = load_ema_net(args.checkpoint)
    except SETUP_ERRORS as err:
        fail("eval", err)
    out = Path(args.out) if args.out is not None else find_checkpoint(args.checkpoint).parent / "eval"
    paths = write_samples(
        net, data_info, out, steps=args.steps, num_samples=args.num_samples, seed=args.seed, cfg_scale=args.cfg_scale
    )
    if data_info.name == "digits":
        from ..train.metrics import DigitsEvaluator

        try:
            rows = digits_metric_rows(
                {"trained (EMA)": net},
                DigitsEvaluator(seed=0),
                untrained=untrained_net(config, data_info),
                steps=args.steps,
                num_samples=args.num_samples,
                seed=args.seed,
                cfg_scale=args.cfg_scale,
            )
        except ValueError as err:  # e.g. more samples than the reference rows have digits
            fail("eval", err)
        print(format_metric_table(rows))
    print(f"samples: {', '.join(map(str, paths))}")
