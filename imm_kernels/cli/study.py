"""`imm-kernels study`: group size M × learning rate × seed on 8×8 digits, FD vs sampling steps, on the CPU."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import SETUP_ERRORS, check_count, check_output_folder, comma_separated_counts, fail, finite_float, seed

DEFAULT_OUT, QUICK_OUT = "imm-kernels-study", "imm-kernels-study-quick"
MAX_TRAINING_STEPS = 10_000_000
MAX_THREADS = 1024


def _distinct(parse, flag_values: str):
    """An argparse type: `parse`, then no value twice (each run of the grid is one combination)."""

    def parse_distinct(text: str):
        values = parse(text)
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise argparse.ArgumentTypeError(f"{flag_values} must differ, got {text!r} ({repeated[0]} twice)")
        return values

    return parse_distinct


def _learning_rates(text: str) -> tuple[float, ...]:
    """Comma-separated finite numbers > 0, such as 1e-3,2e-3."""
    try:
        values = tuple(finite_float(part) for part in text.split(","))
    except argparse.ArgumentTypeError:
        values = ()
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected learning rates > 0 like 1e-3,2e-3, got {text!r}")
    return values


def _seeds(text: str) -> tuple[int, ...]:
    """Comma-separated seeds in [0, 2**32 - 1], such as 0,1,2."""
    try:
        return tuple(seed(part) for part in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected seeds in [0, 4294967295] like 0,1,2, got {text!r}") from None


def add_parser(commands) -> None:
    from ..study import QUICK_SETTINGS, StudySettings

    full, quick = StudySettings(), QUICK_SETTINGS

    def listed(values) -> str:
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)

    parser = commands.add_parser(
        "study",
        help="train M x lr x seed on digits at one budget; FD vs sampling steps, divergence and collapse",
        description="Trains a grid of IMM runs on sklearn's 8x8 digits, group size M x learning rate x seed, each "
        "at the same budget (the same steps at the same batch), then scores each run's EMA model by the digits FD "
        "at several sampling steps and records whether it diverged or collapsed. Writes results.jsonl (a line per "
        "run; a study started again with the same settings skips its finished runs), summary.md and two PNGs. "
        f"Full: M {listed(full.group_sizes)} x lr {listed(full.lrs)} x seeds {listed(full.seeds)}, {full.steps} "
        f"steps at batch {full.batch}. --quick: M {listed(quick.group_sizes)} x lr {listed(quick.lrs)} x seeds "
        f"{listed(quick.seeds)}, {quick.steps} steps. The options below replace either's values. The same "
        "command gives the same numbers on the same machine, software and --threads.",
    )
    parser.add_argument("--quick", action="store_true", help="the short grid and budget (see above)")
    parser.add_argument(
        "--out", help=f"output folder (default: {DEFAULT_OUT}, with --quick {QUICK_OUT}); its study is resumed"
    )
    parser.add_argument(
        "--group-sizes",
        type=_distinct(comma_separated_counts("group sizes", "1,2,4,8"), "--group-sizes"),
        help="comma-separated M, each dividing --batch",
    )
    parser.add_argument("--lrs", type=_distinct(_learning_rates, "--lrs"), help="comma-separated learning rates")
    parser.add_argument("--seeds", type=_distinct(_seeds, "--seeds"), help="comma-separated seeds")
    parser.add_argument("--steps", type=int, help="training steps of every run")
    parser.add_argument("--batch", type=int, help=f"batch of every run (default: {full.batch})")
    parser.add_argument(
        "--num-samples",
        type=int,
        help=f"samples per sampling step count, at least 4; each FD draw takes half, at most 177 (default: "
        f"{full.num_samples})",
    )
    parser.add_argument(
        "--threads", type=int, help=f"torch and BLAS threads; the numbers depend on it (default: {full.threads})"
    )
    parser.add_argument(
        "--force", action="store_true", help="start over: delete the study files in --out (results.jsonl too)"
    )
    parser.set_defaults(run=run)


def run(args) -> None:
    from ..study import QUICK_SETTINGS, RESULTS_FILE, StudySettings, read_results, run_study
    from ..train.evaluation import MIN_TABLE_SAMPLES

    base = QUICK_SETTINGS if args.quick else StudySettings()
    out = Path(args.out if args.out is not None else QUICK_OUT if args.quick else DEFAULT_OUT)
    try:
        steps = check_count("--steps", args.steps if args.steps is not None else base.steps, MAX_TRAINING_STEPS)
        batch = check_count("--batch", args.batch if args.batch is not None else base.batch)
        num_samples = args.num_samples if args.num_samples is not None else base.num_samples
        if num_samples < MIN_TABLE_SAMPLES:
            raise ValueError(
                f"--num-samples must be >= {MIN_TABLE_SAMPLES} (an FD draw takes half, at least 2), got {num_samples}"
            )
        check_count("--num-samples", num_samples)
        threads = check_count("--threads", args.threads if args.threads is not None else base.threads, MAX_THREADS)
        group_sizes = args.group_sizes or base.group_sizes
        for m in group_sizes:
            if batch % m:
                raise ValueError(f"--group-sizes: M={m} does not divide --batch {batch} (every group is whole)")
        settings = StudySettings(
            group_sizes=group_sizes,
            lrs=args.lrs or base.lrs,
            seeds=args.seeds or base.seeds,
            steps=steps,
            batch=batch,
            num_samples=num_samples,
            sampling_steps=base.sampling_steps,
            threads=threads,
        )
        check_output_folder("--out", out, force=True)  # a study resumes in its own folder
        if not args.force:
            try:
                read_results(out, settings)  # refuses other settings now, not after the first run
            except ValueError as err:
                raise ValueError(f"--out: {err}") from err
    except SETUP_ERRORS as err:
        fail("study", err)
    run_study(settings, out, restart=args.force)
    print()
    print((out / "summary.md").read_text())
    print(f"results: {out / RESULTS_FILE}")
