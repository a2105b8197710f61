"""`imm-kernels sample`: few-step samples of a checkpoint as one PNG (CUDA-graph replay on a GPU).

The checkpoint is a training run (or its checkpoint folder), a model folder written by
`imm-kernels convert`, or a released IMM checkpoint file (.pkl/.pt, read without executing it).

Besides the PNG, --out takes .npy (the raw float32 samples of every step count) or .npz: one step
count's samples in the layout evaluation suites read (the ADM / guided-diffusion suite's `arr_0`, and
its `arr_1` for class labels). Images are uint8 (N, H, W, C), by the PNG's rule (imm_kernels.fid's
to_uint8_images) or as the VAE decodes them with --vae; other samples (latents without --vae,
vectors) keep their float32 (N, *shape) layout.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from ..sampling import GRID_KINDS, SAMPLERS, GraphedSampler, time_grid
from ..train.trainer import DEVICE_CHOICES
from .common import (
    ACTIVATION_COPIES,
    MAX_SAMPLES,
    MAX_SAMPLING_STEPS,
    SETUP_ERRORS,
    add_official_options,
    check_count,
    check_output_file,
    check_sampling_memory,
    comma_separated_labels,
    device_of_choice,
    fail,
    finite_float,
    parse_step_counts,
    sampling_parts,
    seed,
    widest_output_bytes,
)

OUT_SUFFIXES = (".png", ".npy", ".npz")


def add_parser(commands) -> None:
    parser = commands.add_parser("sample", help="few-step samples of a checkpoint as one PNG, a row per step count")
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="run directory or checkpoint folder, a model folder (imm-kernels convert), or an official IMM .pkl/.pt",
    )
    add_official_options(parser)
    parser.add_argument(
        "--labels",
        type=comma_separated_labels,
        default=None,
        metavar="L[,L...]",
        help="class labels, repeated over the batch (conditional models; default: 0, 1, 2, ...)",
    )
    parser.add_argument(
        "--vae",
        default=None,
        metavar="DIR",
        help="decode latent samples to pixels with the Stable Diffusion VAE saved in DIR (needs imm-kernels[vae])",
    )
    parser.add_argument(
        "--steps",
        type=parse_step_counts,
        default=(1, 2, 4, 8),
        help=f"comma-separated step counts, one row each, same noise, at most {MAX_SAMPLING_STEPS} (default: 1,2,4,8)",
    )
    parser.add_argument(
        "--cfg-scale",
        type=finite_float,
        default=None,
        help="classifier-free guidance scale (conditional checkpoints; default: no guidance)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help=f"samples per step count, at most {MAX_SAMPLES} and what the memory estimate allows "
        "(default: 16 images, 1000 points for 2-D data)",
    )
    parser.add_argument("--sampler", choices=SAMPLERS, default="pushforward", help="(default: %(default)s)")
    parser.add_argument(
        "--grid",
        choices=GRID_KINDS,
        default="uniform",
        help="time grid: uniform in t, edm (rho=7 in eta) or eta (--mid-eta) (default: %(default)s)",
    )
    parser.add_argument(
        "--mid-eta",
        type=_float_list,
        default=None,
        metavar="ETA[,ETA...]",
        help="intermediate eta values for --grid eta, e.g. 1.4 for 2 steps",
    )
    parser.add_argument("--seed", type=seed, default=0, help="seed of the prior draws, 0 to 2**32 - 1 (default: 0)")
    parser.add_argument(
        "--device", choices=DEVICE_CHOICES, default="auto", help="auto: CUDA when available (default: %(default)s)"
    )
    parser.add_argument(
        "--out",
        required=True,
        help="PNG to write; or .npy for the raw samples (float32 array (step counts, batch, *shape)); or .npz for "
        "one step count's samples as evaluation suites read them: arr_0 uint8 images (batch, H, W, C), by the "
        "PNG's rule or decoded by --vae (latents without --vae, and vectors: float32 (batch, *shape)), and arr_1 "
        "the class labels of a conditional model. Its folder is made if needed",
    )
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.set_defaults(run=run)


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = (math.nan,)
    if not all(math.isfinite(value) for value in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers like 1.4 or 10,1.4, got {text!r}")
    return values


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


def _open_model(args):
    """(net, DataInfo-like description) for any checkpoint kind `--checkpoint` accepts."""
    from ..model_files import is_model_folder, is_official_checkpoint, load_model
    from ..official import load_official
    from ..train.evaluation import load_ema_net
    from ..train.trainer import DataInfo

    path = Path(args.checkpoint)
    official = is_official_checkpoint(path)
    if (args.overrides or args.key != "ema") and not official:
        raise ValueError("--key and --set apply to official IMM checkpoint files (.pkl/.pt) only")
    if official or is_model_folder(path):
        net = load_official(path, key=args.key, overrides=dict(args.overrides)) if official else load_model(path)
        return net, DataInfo(path.name, "image", tuple(net.sample_shape), net.label_dim)
    net, _, data_info = load_ema_net(path)
    return net, data_info


def _labels(net, batch: int, given: tuple[int, ...] | None, device) -> torch.Tensor | None:
    from ..train.sampling_helpers import balanced_labels

    if given is None:
        return balanced_labels(net, batch)
    if not net.label_dim:
        raise ValueError("--labels needs a conditional model (label_dim > 0)")
    if max(given) >= net.label_dim:
        raise ValueError(f"--labels must be class indices in [0, {net.label_dim - 1}], got {max(given)}")
    if len(given) > batch:
        raise ValueError(
            f"--labels gives {len(given)} labels for a batch of {batch}; give --batch {len(given)} or more"
        )
    return torch.tensor(given, device=device).repeat(batch // len(given) + 1)[:batch]


def _memory_parts(args, net, data_info, batch: int, device, decoder, out_kind: str):
    """(device parts, host parts) of the call's memory estimate; see common.sampling_parts."""
    from ..train.data import grid_upscale

    step_counts = tuple(sorted(set(args.steps)))
    device_parts = sampling_parts(
        net,
        batch,
        data_info.shape,
        step_counts,
        guided=args.cfg_scale is not None,
        restart=args.sampler == "restart",
        graphed=device.type == "cuda",
    )
    shape = data_info.shape
    if decoder is not None:  # it decodes decoder.batch_size latents at a time
        decoded = []
        probe = torch.zeros(1, *shape, device=device)
        widest = widest_output_bytes(decoder.vae, lambda: decoded.append(decoder.decode(probe)))
        shape = tuple(decoded[0].shape[1:])  # the pixels' shape
        device_parts["decoding"] = ACTIVATION_COPIES * widest * min(batch, decoder.batch_size)
    rows = len(step_counts)
    host_parts = {"results": rows * batch * math.prod(data_info.shape) * 4}
    if data_info.kind == "image" and out_kind == ".png":  # save_image_grid's float copy and upscaled pixels
        channels, height, width = shape
        upscale = grid_upscale(height, width)
        cell = channels * (height * upscale + 2) * (width * upscale + 2)
        host_parts["png"] = rows * batch * (4 * math.prod(shape) + 2 * cell)
    elif out_kind == ".npz":  # the array written, at most float32
        host_parts["npz"] = batch * math.prod(shape) * 4
    return device_parts, host_parts


def run(args) -> None:
    import tempfile

    import numpy as np

    from ..train.data import save_image_grid, save_scatter_plot
    from ..train.sampling_helpers import SCATTER_EXTENT, data_density_points, prior_noise, step_label

    out = Path(args.out)
    out_kind = out.suffix.lower()
    writes_array = out_kind in (".npy", ".npz")
    try:
        if args.batch is not None:  # before the checkpoint loads
            check_count("--batch", args.batch)
        net, data_info = _open_model(args)
        if args.cfg_scale is not None and not net.label_dim:
            raise ValueError("--cfg-scale needs a conditional checkpoint (trained with --conditional)")
        if args.mid_eta is not None and (args.grid != "eta" or len(args.steps) != 1):
            raise ValueError("--mid-eta needs --grid eta and a single step count in --steps")
        if args.grid == "eta" and args.mid_eta is None:
            raise ValueError("--grid eta needs --mid-eta (the steps - 1 intermediate eta values)")
        is_points = data_info.kind == "vector" and data_info.shape == (2,)
        batch = check_count("--batch", args.batch if args.batch is not None else (1000 if is_points else 16))
        if data_info.kind == "vector" and not is_points and not writes_array:
            raise ValueError(
                f"--out must end in .npy or .npz for {data_info.shape} vectors (an array of samples), got {out}"
            )
        if out_kind == ".npz" and len(args.steps) != 1:
            raise ValueError(
                f"--out {out.name} holds one set of samples (arr_0, as evaluation suites read it): give one step "
                f"count, e.g. --steps {args.steps[0]}, got --steps {','.join(map(str, args.steps))}"
            )
        is_latent = data_info.kind == "image" and data_info.shape[0] not in (1, 3)
        if is_latent and not writes_array and args.vae is None:
            raise ValueError(
                f"samples of shape {data_info.shape} are latents: give --vae DIR to decode them to a PNG, "
                "or --out X.npy for the raw latents"
            )
        grids = {
            n: time_grid(args.grid, n, net.T, net.eps, args.mid_eta, schedule=net.schedule.name) for n in args.steps
        }
        device = device_of_choice(args.device)
        decoder = None
        if args.vae is not None and out_kind != ".npy":  # .npy keeps the raw latents
            if not is_latent:
                raise ValueError("--vae decodes 4-channel latents; this model samples pixels")
            from ..vae import LatentDecoder

            decoder = LatentDecoder.from_pretrained(args.vae, device=device)
        net = net.to(device)
        labels = _labels(net, batch, args.labels, device)
        check_output_file("--out", out, OUT_SUFFIXES, force=args.force)
        parts = _memory_parts(args, net, data_info, batch, device, decoder, out_kind)
        check_sampling_memory("--batch", batch, device, *parts)
    except SETUP_ERRORS as err:
        fail("sample", err)

    noise = prior_noise(net, batch, data_info.shape, args.seed)
    rows = []
    try:
        for grid in grids.values():
            sampler = GraphedSampler(
                net, batch, grid, args.cfg_scale, sampler=args.sampler, sample_shape=data_info.shape
            )
            generator = torch.Generator(device=device).manual_seed(args.seed + 1)  # restart's fresh noise
            rows.append(sampler(noise, labels, generator=generator).float().cpu())
            del sampler  # its CUDA graph's memory goes before the next one is captured
    except torch.cuda.OutOfMemoryError as err:  # the estimate is rough; its first two sentences say how much
        reason = ". ".join(" ".join(str(err).split()).split(". ")[:2])
        fail("sample", err, f"out of GPU memory at --batch {batch} ({reason}); use a smaller --batch")
    non_finite = sum(int((~torch.isfinite(row)).sum()) for row in rows)
    if non_finite:
        message = (
            f"{non_finite} of {len(rows) * rows[0].numel()} sampled values are NaN or infinite, so nothing was "
            "written: the checkpoint may be broken, or --cfg-scale too large"
        )
        fail("sample", ValueError(message))
    mode = "CUDA graph" if device.type == "cuda" else "eager, CPU"
    print(
        f"sampled {batch} x steps {','.join(map(str, grids))} ({args.sampler}, {args.grid} grid, "
        f"cfg_scale {args.cfg_scale}, {mode}) from {args.checkpoint}"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    if out_kind == ".npy":
        with open(out, "wb") as file:  # np.save would add .npy to a name ending in .NPY
            np.save(file, torch.stack(rows).numpy())
        print(f"samples: {out} (array (step counts, batch, *shape))")
        return
    if out_kind == ".npz":
        print(f"samples: {_write_npz(out, rows[0], data_info, decoder, labels)}")
        return
    if decoder is not None:
        rows = [decoder.decode(row.to(device)).cpu().float() / 127.5 - 1 for row in rows]
    if data_info.kind == "image":
        save_image_grid(torch.cat(rows), out, nrow=batch, row_labels=[step_label(n) for n in grids])
    else:
        density = data_density_points(data_info.name)
        with tempfile.TemporaryDirectory() as tmp:
            panels = [
                save_scatter_plot(
                    points,
                    Path(tmp) / f"{n}.png",
                    extent=SCATTER_EXTENT,
                    background=density,
                    label=step_label(n),
                )
                for n, points in zip(grids, rows)
            ]
            _side_by_side(panels, out)
    layout = "one row per step count" if data_info.kind == "image" else "one panel per step count, left to right"
    print(f"samples: {out} ({layout})")


def _write_npz(out: Path, samples: torch.Tensor, data_info, decoder, labels: torch.Tensor | None) -> str:
    """Writes one step count's samples as evaluation suites read them; returns what the file holds."""
    import numpy as np

    from ..fid import to_uint8_images

    if decoder is not None:
        pixels = decoder.decode(samples.to(decoder.device)).cpu()
    elif data_info.kind == "image" and data_info.shape[0] in (1, 3):
        pixels = to_uint8_images(samples)
    else:
        pixels = None
    arrays = {"arr_0": samples.numpy() if pixels is None else pixels.permute(0, 2, 3, 1).numpy()}
    if labels is not None:
        arrays["arr_1"] = labels.cpu().numpy()
    with open(out, "wb") as file:  # np.savez would add .npz to a name ending in .NPZ
        np.savez(file, **arrays)
    what = "float32 (batch, *shape)" if pixels is None else "uint8 images (batch, H, W, C)"
    return f"{out} (arr_0: {what}{', arr_1: class labels' if labels is not None else ''})"
