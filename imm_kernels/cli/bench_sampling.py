"""`imm-kernels bench-sampling`: latency per sampling call, eager vs torch.compile vs GraphedSampler."""

from __future__ import annotations

import argparse

import torch

from ..sampling import time_grid
from ..sampling.latency import (
    BENCH_MODELS,
    PRECISIONS,
    bench_net,
    interleaved_medians_ms,
    kernel_time_ms,
    sampling_inputs,
    sampling_providers,
)
from .common import MAX_SAMPLES, SETUP_ERRORS, comma_separated_counts, fail, finite_float, parse_step_counts

parse_batch_sizes = comma_separated_counts("batch sizes", "1,4,16", MAX_SAMPLES)


def add_parser(commands) -> None:
    parser = commands.add_parser("bench-sampling", help="latency per sampling call: eager, compiled, graphed")
    parser.add_argument(
        "--model",
        choices=BENCH_MODELS,
        default=None,
        help="random-weight model (default: dit-s2 on CUDA, tiny on a CPU)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="bf16: bf16 weights; bf16-autocast: fp32 weights under autocast "
        "(default: bf16 for a DiT on CUDA, else fp32)",
    )
    parser.add_argument("--batch", type=parse_batch_sizes, default=None, help="comma-separated batch sizes")
    parser.add_argument("--steps", type=parse_step_counts, default=None, help="comma-separated step counts")
    parser.add_argument(
        "--cfg-scale", type=finite_float, default=1.5, help="the guided rows' scale (default: %(default)s)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per provider (median)")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="include torch.compile(mode='reduce-overhead') (default: on CUDA only)",
    )
    parser.add_argument("--quick", action="store_true", help="batch 1, steps 1 and 8, 3 repeats")
    parser.set_defaults(run=run)


def run(args) -> None:
    on_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if on_cuda else "cpu")
    model = args.model or ("dit-s2" if on_cuda else "tiny")
    # torch.compile recompiles per case (a minute or more for a DiT on a GPU): few cases by default.
    batches = args.batch or ((1,) if args.quick else (1, 16))
    step_counts = args.steps or ((1, 8) if args.quick or on_cuda else (1, 2, 4, 8))
    repeats = args.repeats or (3 if args.quick else 20 if on_cuda else 10)
    use_compile = on_cuda if args.compile is None else args.compile
    try:
        if repeats < 1 or min(batches) < 1:
            raise ValueError("--repeats and --batch must be >= 1")
        net, sample_shape = bench_net(model, device, args.precision)
    except (*SETUP_ERRORS, ImportError) as err:
        fail("bench-sampling", err)
    providers = (
        ("eager", "torch.compile(reduce-overhead)", "GraphedSampler") if use_compile else ("eager", "GraphedSampler")
    )
    name = torch.cuda.get_device_name() if on_cuda else f"CPU, {torch.get_num_threads()} threads"
    precision = args.precision or ("bf16" if on_cuda and model != "tiny" else "fp32")
    print(
        f"imm-kernels bench-sampling: {model} ({sum(p.numel() for p in net.parameters()) / 1e6:.1f}M parameters, "
        f"{precision}, samples {'x'.join(map(str, sample_shape))}), pushforward on a uniform grid, {name}, "
        f"torch {torch.__version__}; ms per call, median of {repeats}"
    )
    if not on_cuda:
        print(
            "no GPU: GraphedSampler runs the eager sampler here (no CUDA graphs), so its column is the eager path "
            "behind the same API" + ("" if use_compile else "; torch.compile skipped (--compile to include it)")
        )
    header = f"{'batch':>5} {'steps':>5} {'cfg':>5} {'eager':>9}"
    header += f" {'compiled':>9}" if use_compile else ""
    header += f" {'graphed':>9} {'vs eager':>8}" + (f" {'vs comp.':>8}" if use_compile else "")
    header += f" {'GPU busy':>8}" if on_cuda else ""
    print(header)
    print("-" * len(header))
    for batch in batches:
        for num_steps in step_counts:
            for cfg_scale in (None, args.cfg_scale) if net.label_dim else (None,):  # guidance needs labels
                noise, labels = sampling_inputs(net, batch, sample_shape, cfg_scale)
                times = time_grid("uniform", num_steps, net.T, net.eps).tolist()
                calls = sampling_providers(net, noise, labels, times, cfg_scale, providers)
                ms = interleaved_medians_ms(calls, repeats)
                graphed = ms["GraphedSampler"]
                line = f"{batch:5d} {num_steps:5d} {'-' if cfg_scale is None else cfg_scale:>5} {ms['eager']:9.3f}"
                if use_compile:
                    line += f" {ms['torch.compile(reduce-overhead)']:9.3f}"
                line += f" {graphed:9.3f} {ms['eager'] / graphed:7.2f}x"
                if use_compile:
                    line += f" {ms['torch.compile(reduce-overhead)'] / graphed:7.2f}x"
                if on_cuda:
                    line += f" {100 * kernel_time_ms(calls['GraphedSampler']) / graphed:7.1f}%"
                print(line, flush=True)
    if on_cuda:
        print(
            "GPU busy: summed kernel and copy time of one GraphedSampler call (torch.profiler) / its median wall time"
        )
