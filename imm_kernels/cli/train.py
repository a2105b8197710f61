"""`imm-kernels train`: train an IMM model (also under torchrun), or resume a run."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback

import torch

from ..ops.backends import BACKEND_NAMES
from ..precond import PARAMS, TIME_EMBEDS
from ..schedules import SCHEDULE_NAMES
from ..train.data import ARRAY_SUFFIXES, BUILTIN_DATASETS
from ..train.trainer import (
    DEVICE_CHOICES,
    DIST_CHOICES,
    DIST_TIMEOUT_S,
    MIXED_PRECISION_CHOICES,
    MODEL_CHOICES,
    ON_NAN_CHOICES,
    RESUMABLE_FIELDS,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    find_checkpoint,
    load_run_config,
)
from .common import SETUP_ERRORS, fail

# The parsed arguments that are not TrainConfig fields.
_COMMAND_ARGUMENTS = (
    "command",
    "run",
    "out",
    "resume",
    "auto_resume",
    "allow_world_size_change",
    "dist_timeout",
    "debug",
)
# Exit statuses beyond argparse's 2 (bad input): the run diverged; a peer process was lost.
EXIT_DIVERGED, EXIT_PEER_LOST = 3, 4


def add_parser(commands) -> None:
    parser = commands.add_parser("train", help="train an IMM model (also under torchrun)")
    parser.add_argument("--out", help="run directory: config.json, log.jsonl, samples/, checkpoint/")
    parser.add_argument(
        "--resume", metavar="DIR", help="continue this run directory (its newest complete checkpoint) or checkpoint"
    )
    parser.add_argument(
        "--auto-resume",
        action="store_true",
        help="with --out: continue the run already there (its newest complete checkpoint), else start it; "
        "the command torchrun --max-restarts repeats after a failure",
    )
    parser.add_argument(
        "--allow-world-size-change",
        action="store_true",
        help="resume on another number of processes (each rank's data share and draws then change)",
    )
    parser.add_argument(
        "--dist-timeout",
        type=float,
        default=DIST_TIMEOUT_S,
        metavar="SECONDS",
        help="under torchrun: how long a rank waits for the others before failing (default: %(default)s)",
    )
    _add_train_options(parser)
    parser.set_defaults(run=run)


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    """The TrainConfig fields as options; unset options are absent, so the config's defaults apply."""
    defaults = TrainConfig()

    def option(flag: str, help: str, **kwargs) -> None:
        field = flag[2:].replace("-", "_")
        default = getattr(defaults, field)
        shown = "from the data" if default is None and field == "sigma_data" else default
        shown = "per data kind" if default is None and field in ("width", "depth") else shown
        parser.add_argument(flag, dest=field, default=argparse.SUPPRESS, help=f"{help} (default: {shown})", **kwargs)

    data_help = f"{', '.join(BUILTIN_DATASETS)}, an image folder or a {'/'.join(ARRAY_SUFFIXES)} file"
    option("--data", data_help, metavar="NAME|PATH")
    option("--steps", "total optimizer steps", type=int)
    option("--batch", "global batch size, a multiple of group size x number of processes", type=int)
    option("--group-size", "M, particles per group (1: the consistency-model-style baseline)", type=int)
    option("--lr", "AdamW learning rate after warm-up", type=float)
    option("--warmup", "linear learning-rate warm-up steps", type=int)
    option("--weight-decay", "AdamW weight decay", type=float)
    option("--grad-clip", "max gradient norm, 0 disables", type=float)
    option("--ema-decay", "decay of the evaluation EMA (warmed up as (1+n)/(10+n))", type=float)
    option("--schedule", "noise schedule", choices=SCHEDULE_NAMES)
    option("--param", "parameterisation of f_{s,t}", choices=PARAMS)
    option("--time-embed", "second time given to the backbone", choices=TIME_EMBEDS)
    option("--sigma-data", "sigma_d; unset: the training data's standard deviation", type=float)
    option("--T", "largest time", type=float)
    option("--eps", "smallest time", type=float)
    option("--k", "r is a 1/2^k step of the eta range below t", type=int)
    option("--a", "time-weight exponent", type=float)
    option("--b", "time-weight log-SNR shift", type=float)
    option("--width", "model width: conv channels or MLP hidden units", type=int)
    option("--depth", "model depth: residual blocks", type=int)
    option("--dropout", "backbone dropout (conv backbone)", type=float)
    option("--conditional", "train on the class labels (labelled data only)", action="store_true")
    option("--label-dropout", "probability of the null label when --conditional (for guidance)", type=float)
    option("--seed", "model init, data order and random draws", type=int)
    option("--sample-every", "steps between sample PNGs in OUT/samples, 0: only at the end", type=int)
    option("--ckpt-every", "steps between checkpoints in OUT/checkpoint, 0: only at the end", type=int)
    option("--log-every", "steps between progress/log updates", type=int)
    option("--backend", "mmd_loss backend", choices=BACKEND_NAMES)
    option("--mixed-precision", "backbone autocast (auto: bf16 on CUDA)", choices=MIXED_PRECISION_CHOICES)
    option("--device", "auto: CUDA when available", choices=DEVICE_CHOICES)
    option("--on-nan", "non-finite loss or gradient: stop the run, or skip the batch", choices=ON_NAN_CHOICES)
    option("--model", "backbone (auto: conv for images, mlp for vectors)", choices=MODEL_CHOICES)
    option(
        "--model-kwargs",
        'backbone constructor arguments as JSON, e.g. \'{"hidden_size": 64, "depth": 2, "num_heads": 2}\'',
        type=_json_object,
        metavar="JSON",
    )
    option("--compile", "torch.compile the model the loss calls", action=argparse.BooleanOptionalAction)
    option(
        "--checkpoint-activations",
        "recompute DiT blocks in the backward pass (less memory)",
        action=argparse.BooleanOptionalAction,
    )
    option("--tf32", "TF32 matmuls and convolutions on CUDA", action=argparse.BooleanOptionalAction)
    option("--fused-optimizer", "the fused AdamW kernel on CUDA", action=argparse.BooleanOptionalAction)
    option("--accum", "gradient accumulation: micro-batches per step (each whole groups)", type=int)
    option("--workers", "DataLoader processes for data streamed from disk (too large for memory)", type=int)
    option("--flip", "mirror training images left-right at random", action=argparse.BooleanOptionalAction)
    option("--keep", "complete checkpoints kept in OUT/checkpoints (the newest)", type=int)
    option(
        "--dist",
        "under torchrun: ddp (a model copy per rank) or fsdp (FSDP2: model, optimizer and EMA sharded, "
        "sharded checkpoints); fsdp also runs as one process",
        choices=DIST_CHOICES,
    )
    option(
        "--fsdp-bf16-params",
        "with --dist fsdp: all-gather block weights in bf16 (half the traffic; the target pass then uses bf16 "
        "weights too)",
        action="store_true",
    )


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({err.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'expected a JSON object like {{"depth": 2}}, got {text!r}')
    return value


def run(args) -> None:
    if not torch.distributed.is_torchelastic_launched():
        _train(args)
        return
    # A torchrun rank leaves through os._exit once its output is flushed, skipping interpreter
    # finalization: a gloo worker thread can still be freeing the last collective's tensors then,
    # and taking the GIL during finalization aborts the process ("terminate called without an
    # active exception") after a complete run, which torchrun reports as a failure or restarts.
    # destroy_process_group does not join those threads, and FSDP keeps the group alive after it.
    status = 1
    try:
        _train(args)
        status = 0
    except SystemExit as stop:
        status = _exit_status(stop)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _exit_status(stop: SystemExit) -> int:
    """The status the interpreter would exit with for `stop`, printing its message as it would."""
    if stop.code is None or isinstance(stop.code, int):
        return stop.code or 0
    print(stop.code, file=sys.stderr)
    return 1


def _train(args) -> None:
    options = {name: value for name, value in vars(args).items() if name not in _COMMAND_ARGUMENTS}
    try:
        resume = args.resume
        if args.auto_resume:
            if resume is not None or args.out is None:
                raise ValueError("--auto-resume goes with --out (not --resume)")
            resume = args.out if _has_checkpoint(args.out) else None
            if resume is not None:
                options = _resumable_options(args.out, options)
        if resume is not None:
            fixed = sorted(set(options) - set(RESUMABLE_FIELDS))
            if fixed:
                raise ValueError(
                    f"--resume continues the checkpoint's config; only {', '.join(RESUMABLE_FIELDS)} can change, "
                    f"got {', '.join(fixed)}"
                )
            trainer = Trainer.resume(
                resume,
                args.out,
                allow_world_size_change=args.allow_world_size_change,
                dist_timeout_s=args.dist_timeout,
                **options,
            )
        else:
            if args.out is None:
                raise ValueError("--out is required (the run directory), unless --resume gives one")
            if args.allow_world_size_change:
                raise ValueError("--allow-world-size-change applies to --resume only")
            # --auto-resume with no checkpoint yet: whatever a run left before its first checkpoint is started over
            trainer = Trainer(
                TrainConfig(**options), args.out, dist_timeout_s=args.dist_timeout, overwrite=args.auto_resume
            )
    except SETUP_ERRORS as err:
        _leave_process_group()
        fail("train", err)
    try:
        if trainer.process.is_main:
            config = trainer.config
            print(
                f"training {config.data} for {config.steps} steps (batch {config.batch}, M={config.group_size}, "
                f"{trainer.process.world_size} process(es) on {trainer.device}) -> {trainer.out_dir}"
            )
        summary = trainer.train()
        if trainer.process.is_main:
            skipped = f", {summary['skipped_steps']} non-finite batches skipped" if summary["skipped_steps"] else ""
            loss = f"{summary['loss']:.4g}" if math.isfinite(summary["loss"]) else "n/a (no step logged)"
            print(
                f"done: step {trainer.step}, loss {loss}, {summary['samples_per_s']:.0f} samples/s, "
                f"{summary['wall_s']:.0f} s{skipped}; checkpoints in {trainer.out_dir / 'checkpoints'}"
            )
    except TrainingDiverged as err:
        _stop("train", err, EXIT_DIVERGED)
    except RuntimeError as err:
        if not _is_peer_failure(err):
            raise
        _stop(
            "train",
            f"rank {trainer.process.rank} lost contact with the other processes ({_first_line(err)}): one stopped "
            f"or crashed, or took longer than --dist-timeout {args.dist_timeout:g} s. The last complete checkpoint "
            f"in {trainer.out_dir} is kept; `imm-kernels train --resume {trainer.out_dir}` continues from it (under "
            "torchrun --max-restarts=N, `train --out ... --auto-resume` does that by itself).",
            EXIT_PEER_LOST,
        )
    finally:
        _leave_process_group()


def _has_checkpoint(out: str) -> bool:
    try:
        find_checkpoint(out)
    except FileNotFoundError:
        return False
    return True


def _resumable_options(out: str, options: dict) -> dict:
    """The options that may change on resume; the others must equal the run's saved config (auto-resume
    repeats the original command line, so they normally do)."""
    saved = load_run_config(out)[0]
    differing = [
        f"--{name.replace('_', '-')} {value!r} (the run has {getattr(saved, name)!r})"
        for name, value in options.items()
        if name not in RESUMABLE_FIELDS and getattr(saved, name) != value
    ]
    if differing:
        raise ValueError(f"--auto-resume: {', '.join(differing)} differ from the run in {out}")
    return {name: value for name, value in options.items() if name in RESUMABLE_FIELDS}


def _leave_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def _is_peer_failure(err: RuntimeError) -> bool:
    """A collective that failed because another rank is gone (gloo/NCCL errors, timeouts), in a distributed run."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    dist_error = getattr(torch.distributed, "DistError", ())
    text = str(err).lower()
    return isinstance(err, dist_error) or any(
        word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout", "peer")
    )


def _stop(command: str, message, status: int) -> None:
    print(f"imm-kernels {command}: error: {message}", file=sys.stderr)
    raise SystemExit(status)
