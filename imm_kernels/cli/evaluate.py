"""`imm-kernels eval`: sample a checkpoint; the metric table for digits, plots or arrays otherwise; with
--fid, Inception FID and KID of image models against reference images or statistics."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..fid import DEFAULT_BATCH_SIZE as FID_BATCH_SIZE
from ..fid import INCEPTION_WEIGHTS_FILE
from ..train.trainer import DEVICE_CHOICES
from .common import (
    ACTIVATION_COPIES,
    MAX_SAMPLES,
    MAX_SAMPLING_STEPS,
    SETUP_ERRORS,
    check_count,
    check_output_folder,
    check_sampling_memory,
    device_of_choice,
    fail,
    finite_float,
    parse_step_counts,
    sampling_parts,
    seed,
    widest_output_bytes,
)

FID_ONLY_OPTIONS = ("--reference", "--inception-weights", "--fid-batch", "--device")


def add_parser(commands) -> None:
    parser = commands.add_parser("eval", help="sample a checkpoint; the metric table for digits, FID with --fid")
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
    fid = parser.add_argument_group(
        "FID",
        "--fid scores each step count's --num-samples samples of an image model (1 or 3 channels) against a "
        "reference: Inception FID and, when the reference has images, KID, printed as a table and written to "
        "OUT/fid.json (instead of the digits table). Needs imm-kernels[fid] and torch-fidelity, and the "
        "Inception weights as a local file: nothing is downloaded.",
    )
    fid.add_argument("--fid", action="store_true", help="score FID (and KID) against --reference")
    fid.add_argument(
        "--reference",
        metavar="PATH",
        help="a folder of .png/.jpg images, or a .npz of Inception statistics (mu, sigma) and/or uint8 images "
        "(arr_0, N×H×W×C), as the ADM evaluation suite writes them",
    )
    fid.add_argument(
        "--inception-weights",
        metavar="PATH",
        help=f"the file {INCEPTION_WEIGHTS_FILE} (default: torch's hub cache, "
        "$TORCH_HOME/hub/checkpoints, ~/.cache/torch/hub/checkpoints unless set)",
    )
    fid.add_argument(
        "--fid-batch",
        type=int,
        default=None,
        help=f"samples drawn and scored per batch (default: {FID_BATCH_SIZE})",
    )
    fid.add_argument(
        "--device",
        choices=DEVICE_CHOICES,
        default=None,
        help="where samples are drawn and Inception runs; auto: CUDA when available (default: auto)",
    )
    parser.set_defaults(run=run)


def run(args) -> None:
    from ..train.evaluation import digits_metric_rows, format_metric_table, load_ema_net, untrained_net, write_samples
    from ..train.trainer import find_checkpoint, run_directory_of

    try:
        num_samples = check_count("--num-samples", args.num_samples)  # before the checkpoint loads
        if args.fid:
            fid_batch = FID_BATCH_SIZE if args.fid_batch is None else check_count("--fid-batch", args.fid_batch)
            fid_batch = min(num_samples, fid_batch)
            if args.reference is None:
                raise ValueError("--fid needs --reference PATH (a folder of images or a .npz)")
        elif any(getattr(args, flag[2:].replace("-", "_")) is not None for flag in FID_ONLY_OPTIONS):
            raise ValueError(f"{', '.join(FID_ONLY_OPTIONS)} apply with --fid only")
        net, config, data_info = load_ema_net(args.checkpoint)
        guided = args.cfg_scale != 1.0  # the samplers' convention: 1 is the conditional model itself
        if guided and not net.label_dim:
            raise ValueError("--cfg-scale needs a conditional checkpoint (trained with --conditional)")
        if args.fid:
            _check_fid_model(data_info)
        elif data_info.name == "digits":  # the table's check, made before any sampling
            from ..train.evaluation import MIN_TABLE_SAMPLES

            if num_samples < MIN_TABLE_SAMPLES:
                raise ValueError(
                    f"--num-samples must be >= {MIN_TABLE_SAMPLES} for the digits table, got {num_samples}"
                )
        out = Path(args.out) if args.out is not None else run_directory_of(find_checkpoint(args.checkpoint)) / "eval"
        check_output_folder("--out", out, force=args.force)
        if args.fid:
            net, network, scorer = _fid_setup(args, net, data_info, num_samples, fid_batch, guided)
        else:
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
    if args.fid:
        paths.append(_fid_rows(args, net, data_info, num_samples, fid_batch, network, scorer, out))
    elif data_info.name == "digits":
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


def _check_fid_model(data_info) -> None:
    """FID scores pixels: an image model of 1 or 3 channels."""
    if data_info.kind != "image":
        raise ValueError(f"--fid scores images; this checkpoint samples {data_info.shape} vectors")
    if data_info.shape[0] not in (1, 3):
        raise ValueError(
            f"--fid scores pixels; this checkpoint samples latents of shape {data_info.shape}: decode them to "
            "images with imm-kernels sample --vae DIR --out X.npz (arr_0, what the ADM evaluation suite scores)"
        )


def _fid_setup(args, net, data_info, num_samples: int, batch: int, guided: bool):
    """(net on the device, Inception network, FidScorer): every check before sampling, the reference's
    features included."""
    from .. import fid

    device = device_of_choice(args.device or "auto")
    net = net.to(device)
    network = fid.load_inception(args.inception_weights, device)
    _, height, width = data_info.shape
    probe, outputs = torch.zeros(1, 3, height, width, dtype=torch.uint8, device=device), []
    widest = widest_output_bytes(network, lambda: outputs.append(network(probe)))
    features = outputs[0].shape[1]
    device_parts = sampling_parts(net, batch, data_info.shape, args.steps, guided=guided, restart=False, graphed=False)
    device_parts["noise"] = num_samples * math.prod(data_info.shape) * 4  # every prior draw, once
    device_parts["inception"] = ACTIVATION_COPIES * widest * batch
    host_parts = {"features": 2 * num_samples * features * 8}  # float64 features, and torchmetrics' KID copy
    check_sampling_memory("--fid-batch", batch, device, device_parts, host_parts)
    reference = fid.load_reference(args.reference, network, batch_size=batch)
    if reference.num_features != features:
        raise ValueError(
            f"--reference {args.reference!r} holds statistics of {reference.num_features} features; the "
            f"Inception network gives {features}"
        )
    if reference.image_size is not None and reference.image_size != (height, width):
        reference_height, reference_width = reference.image_size
        raise ValueError(
            f"--reference images are {reference_width}×{reference_height} but the samples {width}×{height} "
            "(width×height): FID compares images of one size"
        )
    return net, network, fid.FidScorer(reference, seed=args.seed)


def _fid_rows(args, net, data_info, num_samples: int, batch: int, network, scorer, out: Path) -> Path:
    """Samples every step count from the same prior draws (those of `imm-kernels sample --batch NUM_SAMPLES`
    with this seed), scores them, prints the table and writes OUT/fid.json; returns its path."""
    import json

    from ..fid import format_fid_table, image_features, to_uint8_images
    from ..train.sampling_helpers import balanced_labels, prior_noise, pushforward_sample, step_label

    noise = prior_noise(net, num_samples, data_info.shape, args.seed)
    labels = balanced_labels(net, num_samples)
    step_counts = tuple(dict.fromkeys(args.steps))  # a step count given twice is scored once
    rows = {}
    for num_steps in step_counts:
        features = []
        for start in range(0, num_samples, batch):
            batch_labels = None if labels is None else labels[start : start + batch]
            samples = pushforward_sample(net, noise[start : start + batch], num_steps, batch_labels, args.cfg_scale)
            if not torch.isfinite(samples).all():
                message = (
                    f"samples at {step_label(num_steps)} hold NaN or infinite values, so no FID was scored: the "
                    "checkpoint may be broken, or --cfg-scale too large"
                )
                fail("eval", ValueError(message))
            features.append(image_features(to_uint8_images(samples), network, batch_size=batch))
        rows[f"trained (EMA), {step_label(num_steps)}"] = scorer.score(torch.cat(features))
    print(format_fid_table(rows, scorer.reference))
    path = out / "fid.json"
    record = {
        "reference": scorer.reference.source,
        "num_samples": num_samples,
        "seed": args.seed,
        "cfg_scale": args.cfg_scale,
        "rows": [
            {
                "steps": num_steps,
                "fid": scores.fid,
                "kid_mean": None if math.isnan(scores.kid_mean) else scores.kid_mean,  # JSON has no NaN
                "kid_std": None if math.isnan(scores.kid_std) else scores.kid_std,
                "kid_subset_size": scores.kid_subset_size,
            }
            for num_steps, scores in zip(step_counts, rows.values())
        ],
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
