"""`imm-kernels train`: train an IMM model (also under torchrun), or resume a run."""

from __future__ import annotations

import argparse

import torch

from ..ops.backends import BACKEND_NAMES
from ..precond import PARAMS, TIME_EMBEDS
from ..schedules import SCHEDULE_NAMES
from ..train.data import ARRAY_SUFFIXES, BUILTIN_DATASETS
from ..train.trainer import DEVICE_CHOICES, MIXED_PRECISION_CHOICES, RESUMABLE_FIELDS, TrainConfig, Trainer
from .common import SETUP_ERRORS, fail

# The parsed arguments that are not TrainConfig fields.
_COMMAND_ARGUMENTS = ("command", "run", "out", "resume")


def add_parser(commands) -> None:
    parser = commands.add_parser("train", help="train an IMM model (also under torchrun)")
    parser.add_argument("--out", help="run directory: config.json, log.jsonl, samples/, checkpoint/")
    parser.add_argument("--resume", metavar="DIR", help="continue this run directory or checkpoint folder")
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


def run(args) -> None:
    options = {name: value for name, value in vars(args).items() if name not in _COMMAND_ARGUMENTS}
    try:
        if args.resume is not None:
            fixed = sorted(set(options) - set(RESUMABLE_FIELDS))
            if fixed:
                raise ValueError(
                    f"--resume continues the checkpoint's config; only {', '.join(RESUMABLE_FIELDS)} can change, "
                    f"got {', '.join(fixed)}"
                )
            trainer = Trainer.resume(args.resume, args.out, **options)
        else:
            if args.out is None:
                raise ValueError("--out is required (the run directory), unless --resume gives one")
            trainer = Trainer(TrainConfig(**options), args.out)
    except SETUP_ERRORS as err:
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
            print(
                f"done: step {trainer.step}, loss {summary['loss']:.4g}, {summary['samples_per_s']:.0f} samples/s, "
                f"{summary['wall_s']:.0f} s; checkpoint in {trainer.out_dir / 'checkpoint'}"
            )
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
