"""The `imm-kernels` command (also `python -m imm_kernels`).

    imm-kernels demo      train IMM on 8×8 digits (4–5 min on 2 CPU cores), print the metric table
    imm-kernels train     train IMM on digits, 2-D toys or your data (also under torchrun)
    imm-kernels eval      sample a checkpoint: metric table for digits, plots or arrays otherwise
    imm-kernels sample    few-step samples of a checkpoint (CUDA-graph replay on a GPU) as one PNG
    imm-kernels bench-sampling
                          latency per sampling call: eager vs torch.compile vs GraphedSampler
    imm-kernels report    backends available here, their accuracy against float64,
                          and forward+backward timings against the eager reference
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

from .backends import backends, resolve_mmd_backend
from .functional import mmd_loss
from .ops.reference import mmd_loss_reference
from .sampling.latency import interleaved_medians_ms


def _inputs(batch, group_size, num_features, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, num_features, generator=gen).to(device, dtype)
    y = (0.8 * torch.randn(batch, num_features, generator=gen) + 0.3).to(device, dtype)
    bandwidth = (num_features**0.5) * torch.linspace(0.5, 1.5, batch // group_size).to(device)
    return x, y, bandwidth


def _accuracy_row(backend, device) -> str:
    """Relative error of the fp32 loss and dx against the float64 reference."""
    x, y, bandwidth = _inputs(24, 4, 257, torch.float32, device)
    results = []
    for inputs, name in (((x, y), backend), ((x.double(), y.double()), "torch")):
        leaf = inputs[0].clone().requires_grad_(True)
        loss = mmd_loss(leaf, inputs[1], 4, bandwidth, reduction="sum", backend=name)
        results.append((loss.detach(), torch.autograd.grad(loss, leaf)[0]))
    (loss, dx), (loss64, dx64) = results
    loss_err = ((loss.double() - loss64).abs() / loss64.abs()).item()
    dx_err = ((dx.double() - dx64).norm() / dx64.norm()).item()
    return f"  {backend:<8} loss rel err {loss_err:.1e}   dx rel err {dx_err:.1e}"


def report(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    triton_version = "not installed"
    if importlib.util.find_spec("triton") is not None:
        import triton

        triton_version = triton.__version__
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"imm_kernels report: torch {torch.__version__}, triton {triton_version}, device {name}")
    print("\nbackends:")
    availability = backends()
    for backend, reason in availability.items():
        print(f"  {backend:<8} {'available' if reason is None else 'unavailable: ' + reason}")

    usable = [b for b, reason in availability.items() if reason is None]
    print("\naccuracy against float64 (B=24, M=4, D=257, fp32 inputs, loss and dL/dx):")
    for backend in usable:
        print(_accuracy_row(backend, device))

    batch, group_size, num_features, dtype = (
        (4096, 4, 4096, torch.bfloat16) if device.type == "cuda" else (1024, 4, 3072, torch.float32)
    )
    x, y, bandwidth = _inputs(batch, group_size, num_features, dtype, device)
    x.requires_grad_(True)

    def step(loss_fn):
        return lambda: torch.autograd.grad(loss_fn(x, y, group_size, bandwidth), x)

    providers = {"eager reference": step(mmd_loss_reference)}
    if args.compile:
        providers["torch.compile(reference)"] = step(torch.compile(mmd_loss_reference))
    auto_name, _ = resolve_mmd_backend("auto", x, group_size)
    if auto_name != "torch":  # otherwise it is the eager reference again
        providers[f"mmd_loss (auto -> {auto_name})"] = step(mmd_loss)

    print(f"\nforward+backward, B={batch} M={group_size} D={num_features} {str(dtype)[6:]} on {name}, "
          f"median of {args.repeats}:")
    medians = interleaved_medians_ms(providers, args.repeats, warmup=1)
    baseline = medians["eager reference"]
    for label, ms in medians.items():
        print(f"  {label:<28} {ms:9.3f} ms   {baseline / ms:5.2f}x vs eager")
    if device.type == "cpu" and auto_name == "torch":
        print("  mmd_loss (auto) runs the eager reference here: the native C++ backend is not built"
              " (see `backends` above).")


# Training, the demo and evaluation. The heavy imports wait until a command needs them.

# Errors a bad configuration, data set or checkpoint path raises while a run is set up.
_SETUP_ERRORS = (ValueError, TypeError, OSError)
_RESUMABLE = ("steps", "sample_every", "ckpt_every", "log_every")


def _fail(command: str, err: Exception) -> None:
    """Ends the command with the setup error's message and exit status 2, no traceback."""
    print(f"imm-kernels {command}: error: {err}", file=sys.stderr)
    raise SystemExit(2)


def _step_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected step counts like 1,2,4,8, got {text!r}")
    return counts


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    """The TrainConfig fields as options; unset options are absent, so the config's defaults apply."""
    from .backends import BACKEND_NAMES
    from .precond import PARAMS, TIME_EMBEDS
    from .schedules import SCHEDULE_NAMES
    from .train.trainer import DEVICE_CHOICES, MIXED_PRECISION_CHOICES, TrainConfig

    defaults = TrainConfig()

    def option(flag: str, help: str, **kwargs) -> None:
        field = flag[2:].replace("-", "_")
        default = getattr(defaults, field)
        shown = "from the data" if default is None and field == "sigma_data" else default
        shown = "per data kind" if default is None and field in ("width", "depth") else shown
        parser.add_argument(flag, dest=field, default=argparse.SUPPRESS, help=f"{help} (default: {shown})", **kwargs)

    option("--data", "digits, toy2d, checkerboard, 8gaussians, an image folder or a .npy/.npz file", metavar="NAME|PATH")
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


def train(args) -> None:
    from .train.trainer import TrainConfig, Trainer

    options = {name: value for name, value in vars(args).items() if name not in ("command", "run", "out", "resume")}
    try:
        if args.resume is not None:
            fixed = sorted(set(options) - set(_RESUMABLE))
            if fixed:
                raise ValueError(
                    f"--resume continues the checkpoint's config; only {', '.join(_RESUMABLE)} can change, "
                    f"got {', '.join(fixed)}"
                )
            trainer = Trainer.resume(args.resume, args.out, **options)
        else:
            if args.out is None:
                raise ValueError("--out is required (the run directory), unless --resume gives one")
            trainer = Trainer(TrainConfig(**options), args.out)
    except _SETUP_ERRORS as err:
        _fail("train", err)
    try:
        if trainer.process.is_main:
            config = trainer.config
            print(f"training {config.data} for {config.steps} steps (batch {config.batch}, M={config.group_size}, "
                  f"{trainer.process.world_size} process(es) on {trainer.device}) -> {trainer.out_dir}")
        summary = trainer.train()
        if trainer.process.is_main:
            print(f"done: step {trainer.step}, loss {summary['loss']:.4g}, {summary['samples_per_s']:.0f} samples/s, "
                  f"{summary['wall_s']:.0f} s; checkpoint in {trainer.out_dir / 'checkpoint'}")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def demo(args) -> None:
    from .train.evaluation import digits_metric_rows, format_metric_table, untrained_net
    from .train.metrics import DigitsEvaluator
    from .train.sampling_helpers import save_steps_grid
    from .train.data import load_dataset
    from .train.trainer import TrainConfig, Trainer

    started = time.perf_counter()
    out = Path(args.out)
    group_sizes = (args.group_size, 1) if args.compare_m1 else (args.group_size,)
    overrides = {name: getattr(args, name) for name in ("steps", "batch", "seed") if getattr(args, name) is not None}
    try:
        configs = {m: TrainConfig(group_size=m, **overrides) for m in group_sizes}
        train_size = len(load_dataset("digits", split="train"))
        if not 2 <= args.num_samples <= train_size:  # checked now, not after minutes of training
            raise ValueError(f"--num-samples must be in [2, {train_size}] (the training digits), got {args.num_samples}")
    except _SETUP_ERRORS as err:
        _fail("demo", err)
    print(f"imm-kernels demo: IMM on sklearn's 8x8 digits, {torch.get_num_threads()} CPU thread(s)"
          if not torch.cuda.is_available() else "imm-kernels demo: IMM on sklearn's 8x8 digits, on CUDA")
    trained, train_seconds = {}, {}
    for m, config in configs.items():
        print(f"\ntraining M={m}: {config.steps} steps, batch {config.batch}, lr {config.lr}, "
              f"EMA {config.ema_decay} -> {out / f'm{m}'}")
        trainer = Trainer(config, out / f"m{m}", overwrite=True)
        summary = trainer.train()
        train_seconds[m] = summary["wall_s"]
        trained[m] = trainer.ema.cpu().float()
        print(f"M={m}: {config.steps} steps in {summary['wall_s']:.0f} s ({summary['samples_per_s']:.0f} samples/s)")
    grids = [save_steps_grid(net, out / f"samples_m{m}.png", (1, 8, 8), seed=trainer.config.seed)
             for m, net in trained.items()]

    print("\nevaluating: FD to the held-out digits in a digit classifier's features, "
          f"and its confidence, on {args.num_samples} samples each")
    evaluator = DigitsEvaluator(seed=0)
    models = {f"trained M={m} (EMA)" if len(trained) > 1 else "trained (EMA)": net for m, net in trained.items()}
    rows = digits_metric_rows(models, evaluator, untrained=untrained_net(trainer.config, trainer.data_info),
                              num_samples=args.num_samples, seed=trainer.config.seed)
    print(format_metric_table(rows))
    print(f"\nsamples (rows: 1, 2, 4, 8 steps): {', '.join(map(str, grids))}")
    print(f"training {' + '.join(f'{s:.0f} s (M={m})' for m, s in train_seconds.items())}; "
          f"total {time.perf_counter() - started:.0f} s")


def evaluate(args) -> None:
    from .train.evaluation import (
        digits_metric_rows, format_metric_table, load_ema_net, untrained_net, write_samples,
    )
    from .train.trainer import find_checkpoint

    try:
        net, config, data_info = load_ema_net(args.checkpoint)
    except _SETUP_ERRORS as err:
        _fail("eval", err)
    out = Path(args.out) if args.out is not None else find_checkpoint(args.checkpoint).parent / "eval"
    paths = write_samples(net, data_info, out, steps=args.steps, num_samples=args.num_samples, seed=args.seed,
                          cfg_scale=args.cfg_scale)
    if data_info.name == "digits":
        from .train.metrics import DigitsEvaluator

        try:
            rows = digits_metric_rows({"trained (EMA)": net}, DigitsEvaluator(seed=0),
                                      untrained=untrained_net(config, data_info), steps=args.steps,
                                      num_samples=args.num_samples, seed=args.seed, cfg_scale=args.cfg_scale)
        except ValueError as err:  # e.g. more samples than the reference rows have digits
            _fail("eval", err)
        print(format_metric_table(rows))
    print(f"samples: {', '.join(map(str, paths))}")


# Few-step sampling and its latency.


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected batch sizes like 1,4,16, got {text!r}")
    return sizes


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1.4 or 10,1.4, got {text!r}") from None


def _sample_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available here")
    return torch.device(name)


def _side_by_side(panels: list[Path], out: Path) -> Path:
    """The PNG panels joined left to right, 8 white pixels apart, as one PNG."""
    from PIL import Image

    images = [Image.open(panel) for panel in panels]
    gap = 8
    width = sum(image.width for image in images) + gap * (len(images) - 1)
    joined = Image.new("L", (width, max(image.height for image in images)), 255)
    left = 0
    for image in images:
        joined.paste(image.convert("L"), (left, 0))
        left += image.width + gap
    joined.save(out, format="PNG")
    return out


def sample(args) -> None:
    import tempfile

    import numpy as np

    from .sampling import GraphedSampler, time_grid
    from .train.data import save_image_grid, save_scatter_plot
    from .train.evaluation import load_ema_net
    from .train.sampling_helpers import SCATTER_EXTENT, balanced_labels, prior_noise

    out = Path(args.out)
    try:
        net, config, data_info = load_ema_net(args.checkpoint)
        if args.cfg_scale is not None and not net.label_dim:
            raise ValueError("--cfg-scale needs a conditional checkpoint (trained with --conditional)")
        if args.mid_eta is not None and (args.grid != "eta" or len(args.steps) != 1):
            raise ValueError("--mid-eta needs --grid eta and a single step count in --steps")
        if args.grid == "eta" and args.mid_eta is None:
            raise ValueError("--grid eta needs --mid-eta (the steps - 1 intermediate eta values)")
        is_points = data_info.kind == "vector" and data_info.shape == (2,)
        batch = args.batch if args.batch is not None else (1000 if is_points else 16)
        if batch < 1:
            raise ValueError(f"--batch must be >= 1, got {batch}")
        if data_info.kind == "vector" and not is_points and out.suffix != ".npy":
            raise ValueError(f"--out must end in .npy for {data_info.shape} vectors (an array of samples), got {out}")
        grids = {n: time_grid(args.grid, n, net.T, net.eps, args.mid_eta, schedule=config.schedule)
                 for n in args.steps}
        device = _sample_device(args.device)
    except _SETUP_ERRORS as err:
        _fail("sample", err)

    net = net.to(device)
    noise = prior_noise(net, batch, data_info.shape, args.seed)
    labels = balanced_labels(net, batch)
    rows = []
    for num_steps, grid in grids.items():
        sampler = GraphedSampler(net, batch, grid, args.cfg_scale, sampler=args.sampler,
                                 sample_shape=data_info.shape)
        generator = torch.Generator(device=device).manual_seed(args.seed + 1)  # restart's fresh noise
        rows.append(sampler(noise, labels, generator=generator).float().cpu())
    mode = "CUDA graph" if device.type == "cuda" else "eager, CPU"
    print(f"sampled {batch} x steps {','.join(map(str, grids))} ({args.sampler}, {args.grid} grid, "
          f"cfg_scale {args.cfg_scale}, {mode}) from {args.checkpoint}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if data_info.kind == "image":
        save_image_grid(torch.cat(rows), out, nrow=batch)
    elif is_points:
        with tempfile.TemporaryDirectory() as tmp:
            panels = [save_scatter_plot(points, Path(tmp) / f"{n}.png", extent=SCATTER_EXTENT)
                      for n, points in zip(grids, rows)]
            _side_by_side(panels, out)
    else:
        np.save(out, torch.stack(rows).numpy())
    layout = "one row per step count" if data_info.kind == "image" else (
        "one panel per step count, left to right" if is_points else "array (step counts, batch, *shape)")
    print(f"samples: {out} ({layout})")


def bench_sampling(args) -> None:
    from .sampling import time_grid
    from .sampling.latency import bench_net, interleaved_medians_ms, kernel_time_ms, sampling_inputs, sampling_providers

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
    except (*_SETUP_ERRORS, ImportError) as err:
        _fail("bench-sampling", err)
    providers = ("eager", "torch.compile(reduce-overhead)", "GraphedSampler") if use_compile else (
        "eager", "GraphedSampler")
    name = torch.cuda.get_device_name() if on_cuda else f"CPU, {torch.get_num_threads()} threads"
    precision = args.precision or ("bf16" if on_cuda and model != "tiny" else "fp32")
    print(f"imm-kernels bench-sampling: {model} ({sum(p.numel() for p in net.parameters()) / 1e6:.1f}M parameters, "
          f"{precision}, samples {'x'.join(map(str, sample_shape))}), pushforward on a uniform grid, {name}, "
          f"torch {torch.__version__}; ms per call, median of {repeats}")
    if not on_cuda:
        print("no GPU: GraphedSampler runs the eager sampler here (no CUDA graphs), so its column is the eager path "
              "behind the same API" + ("" if use_compile else "; torch.compile skipped (--compile to include it)"))
    header = f"{'batch':>5} {'steps':>5} {'cfg':>5} {'eager':>9}"
    header += f" {'compiled':>9}" if use_compile else ""
    header += f" {'graphed':>9} {'vs eager':>8}" + (f" {'vs comp.':>8}" if use_compile else "")
    header += f" {'GPU busy':>8}" if on_cuda else ""
    print(header)
    print("-" * len(header))
    for batch in batches:
        for num_steps in step_counts:
            for cfg_scale in (None, args.cfg_scale):
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
        print("GPU busy: summed kernel and copy time of one GraphedSampler call (torch.profiler) / its median "
              "wall time")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="imm-kernels", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    demo_cmd = commands.add_parser("demo", help="train on 8x8 digits, write samples and print the metric table")
    demo_cmd.add_argument("--out", default="imm-kernels-demo", help="output folder (default: %(default)s)")
    demo_cmd.add_argument("--steps", type=int, help="training steps (default: the train default)")
    demo_cmd.add_argument("--batch", type=int, help="batch size (default: the train default)")
    demo_cmd.add_argument("--seed", type=int, help="seed of init, data order and draws (default: 0)")
    demo_cmd.add_argument("--group-size", type=int, default=4, help="M, particles per group (default: %(default)s)")
    demo_cmd.add_argument("--compare-m1", action="store_true",
                          help="also train M=1 (the consistency-style baseline) with the same budget; "
                               "about doubles the time")
    demo_cmd.add_argument("--num-samples", type=int, default=1000, help="samples per table row (default: %(default)s)")
    demo_cmd.set_defaults(run=demo)

    train_cmd = commands.add_parser("train", help="train an IMM model (also under torchrun)")
    train_cmd.add_argument("--out", help="run directory: config.json, log.jsonl, samples/, checkpoint/")
    train_cmd.add_argument("--resume", metavar="DIR", help="continue this run directory or checkpoint folder")
    _add_train_options(train_cmd)
    train_cmd.set_defaults(run=train)

    eval_cmd = commands.add_parser("eval", help="sample a checkpoint; the metric table for digits")
    eval_cmd.add_argument("--checkpoint", required=True, metavar="DIR", help="run directory or checkpoint folder")
    eval_cmd.add_argument("--steps", type=_step_counts, default=(1, 2, 4, 8),
                          help="comma-separated step counts (default: 1,2,4,8)")
    eval_cmd.add_argument("--num-samples", type=int, default=1000, help="samples per step count (default: %(default)s)")
    eval_cmd.add_argument("--seed", type=int, default=0, help="seed of the prior draws (default: %(default)s)")
    eval_cmd.add_argument("--cfg-scale", type=float, default=1.0,
                          help="classifier-free guidance scale for conditional models (default: %(default)s)")
    eval_cmd.add_argument("--out", help="folder for the sample files (default: CHECKPOINT/eval)")
    eval_cmd.set_defaults(run=evaluate)

    sample_cmd = commands.add_parser("sample", help="few-step samples of a checkpoint as one PNG, a row per step count")
    sample_cmd.add_argument("--checkpoint", required=True, metavar="DIR", help="run directory or checkpoint folder")
    sample_cmd.add_argument("--steps", type=_step_counts, default=(1, 2, 4, 8),
                            help="comma-separated step counts, one row each, same noise (default: 1,2,4,8)")
    sample_cmd.add_argument("--cfg-scale", type=float, default=None,
                            help="classifier-free guidance scale (conditional checkpoints; default: no guidance)")
    sample_cmd.add_argument("--batch", type=int, default=None,
                            help="samples per step count (default: 16 images, 1000 points for 2-D data)")
    sample_cmd.add_argument("--sampler", choices=("pushforward", "restart"), default="pushforward",
                            help="(default: %(default)s)")
    sample_cmd.add_argument("--grid", choices=("uniform", "edm", "eta"), default="uniform",
                            help="time grid: uniform in t, edm (rho=7 in eta) or eta (--mid-eta) "
                                 "(default: %(default)s)")
    sample_cmd.add_argument("--mid-eta", type=_float_list, default=None, metavar="ETA[,ETA...]",
                            help="intermediate eta values for --grid eta, e.g. 1.4 for 2 steps")
    sample_cmd.add_argument("--seed", type=int, default=0, help="seed of the prior draws (default: %(default)s)")
    sample_cmd.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                            help="auto: CUDA when available (default: %(default)s)")
    sample_cmd.add_argument("--out", required=True,
                            help="PNG to write (a .npy array for vector data other than 2-D points)")
    sample_cmd.set_defaults(run=sample)

    bench_cmd = commands.add_parser("bench-sampling", help="latency per sampling call: eager, compiled, graphed")
    bench_cmd.add_argument("--model", choices=("tiny", "dit-s2", "dit-xl2"), default=None,
                           help="random-weight model (default: dit-s2 on CUDA, tiny on a CPU)")
    bench_cmd.add_argument("--precision", choices=("fp32", "bf16", "bf16-autocast"), default=None,
                           help="bf16: bf16 weights; bf16-autocast: fp32 weights under autocast "
                                "(default: bf16 for a DiT on CUDA, else fp32)")
    bench_cmd.add_argument("--batch", type=_batch_sizes, default=None, help="comma-separated batch sizes")
    bench_cmd.add_argument("--steps", type=_step_counts, default=None, help="comma-separated step counts")
    bench_cmd.add_argument("--cfg-scale", type=float, default=1.5, help="the guided rows' scale (default: %(default)s)")
    bench_cmd.add_argument("--repeats", type=int, default=None, help="timed calls per provider (median)")
    bench_cmd.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                           help="include torch.compile(mode='reduce-overhead') (default: on CUDA only)")
    bench_cmd.add_argument("--quick", action="store_true", help="batch 1, steps 1 and 8, 3 repeats")
    bench_cmd.set_defaults(run=bench_sampling)

    report_cmd = commands.add_parser("report", help="backends, accuracy and timings of mmd_loss here")
    report_cmd.add_argument("--repeats", type=int, default=20, help="timed runs per provider (median)")
    report_cmd.add_argument("--no-compile", dest="compile", action="store_false",
                            help="skip the torch.compile provider (its warm-up takes a while on a CPU)")
    report_cmd.set_defaults(run=report)
    args = parser.parse_args(argv)
    args.run(args)
