"""The `imm-kernels` command (also `python -m imm_kernels`).

    imm-kernels demo      train IMM on 8×8 digits (4–5 min on 2 CPU cores), print the metric table
    imm-kernels study     group size × lr × seed on digits at one budget: FD vs steps, divergence, collapse
    imm-kernels train     train IMM on digits, 2-D toys or your data (also under torchrun, DDP or FSDP)
    imm-kernels eval      sample a checkpoint: metric table for digits, Inception FID/KID (--fid), plots or arrays
    imm-kernels plot      a run's training curves, FD vs sampling steps or 2-D scatter plots as PNGs
    imm-kernels sample    few-step samples of a checkpoint (CUDA-graph replay on a GPU) as one PNG
    imm-kernels convert   a released IMM checkpoint (.pkl) as a model folder (safetensors + JSON)
    imm-kernels encode    images -> VAE latents (shards the trainer streams), through a local diffusers VAE
    imm-kernels bench-sampling
                          latency per sampling call: eager vs torch.compile vs GraphedSampler
    imm-kernels report    backends available here, their accuracy against float64,
                          and forward+backward timings against the eager reference

Bad input (a value out of range, a corrupt data file, a path that cannot be written) ends a command
with one line, `imm-kernels COMMAND: error: ...`, and exit status 2. `imm-kernels --debug COMMAND ...`
(or the environment variable IMM_KERNELS_DEBUG=1) prints that error's traceback above the line.
Anything else, a bug, ends with its traceback as always.

Each subcommand is one module here: `add_parser` declares its options, `run` carries it out.
The heavy imports (training, evaluation, plotting) wait until a command runs.
"""

from __future__ import annotations

import argparse
import os

from . import bench_sampling, common, convert, demo, encode, evaluate, plot, report, sample, study, train

DEBUG_VARIABLE = "IMM_KERNELS_DEBUG"

# In the order `imm-kernels --help` lists them.
COMMANDS = (demo, study, train, evaluate, plot, sample, convert, encode, bench_sampling, report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imm-kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"on a bad-input error, print its traceback above the one-line message (or set {DEBUG_VARIABLE}=1)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    common.show_tracebacks(args.debug or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"))
    args.run(args)
