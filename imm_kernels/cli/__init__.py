"""The `imm-kernels` command (also `python -m imm_kernels`).

    imm-kernels demo      train IMM on 8×8 digits (4–5 min on 2 CPU cores), print the metric table
    imm-kernels train     train IMM on digits, 2-D toys or your data (also under torchrun)
    imm-kernels eval      sample a checkpoint: metric table for digits, plots or arrays otherwise
    imm-kernels sample    few-step samples of a checkpoint (CUDA-graph replay on a GPU) as one PNG
    imm-kernels convert   a released IMM checkpoint (.pkl) as a model folder (safetensors + JSON)
    imm-kernels bench-sampling
                          latency per sampling call: eager vs torch.compile vs GraphedSampler
    imm-kernels report    backends available here, their accuracy against float64,
                          and forward+backward timings against the eager reference

Each subcommand is one module here: `add_parser` declares its options, `run` carries it out.
The heavy imports (training, evaluation, plotting) wait until a command runs.
"""

from __future__ import annotations

import argparse

from . import bench_sampling, convert, demo, evaluate, report, sample, train

# In the order `imm-kernels --help` lists them.
COMMANDS = (demo, train, evaluate, sample, convert, bench_sampling, report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imm-kernels", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)
