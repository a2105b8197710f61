"""What the subcommands share: how a setup error ends a command, option types and bounds, output
paths, and the memory a sampling call needs against what the machine has."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

# Errors a bad configuration, data set or checkpoint path, or a missing optional extra, raises while a run is set up.
SETUP_ERRORS = (ValueError, TypeError, OSError, ImportError)

# The most steps a sampler takes: IMM samples in 1 to 8 steps and its samples stop improving long
# before 1000, while every step is one network call and the CUDA graph keeps tensors per step
# (`sample --steps 1000000000` once ran until the host killed it for memory).
MAX_SAMPLING_STEPS = 1000
# Samples per call (sample --batch, eval --num-samples): a bound on typing slips; the memory estimate
# (check_sampling_memory) is what limits a call in practice.
MAX_SAMPLES = 1_000_000
# Seeds are 32-bit, as numpy's legacy seeding takes them; torch's generators (64-bit) then also take
# the seed + 1 that seeds restart's fresh noise.
MAX_SEED = 2**32 - 1
# Inference keeps a few tensors as wide as the widest module output alive at once (a block's input,
# output and inner tensors, a U-Net's skip connections). Measured on a CPU, per sample: one forward of
# DiT-S/2, DiT-XL/2 and the CIFAR-10 SongUNet peaked at 2.4 to 4.8 times their widest module output,
# and `imm-kernels sample` at batch 10**6 on the small MLP and conv backbones at 5.7 to 6.3 times
# (their maximum RSS); 12 leaves about a factor 2.
ACTIVATION_COPIES = 12

_show_tracebacks = False


def show_tracebacks(enabled: bool) -> None:
    """Whether `fail` prints the error's traceback above its one-line message (imm-kernels --debug)."""
    global _show_tracebacks
    _show_tracebacks = enabled


def fail(command: str, err: Exception, message: str | None = None) -> None:
    """Ends the command with one line, `message` or else the error's, and exit status 2.

    With --debug (show_tracebacks) the error's traceback comes first.
    """
    if _show_tracebacks:
        traceback.print_exception(err)
    print(f"imm-kernels {command}: error: {message or err}", file=sys.stderr)
    raise SystemExit(2)


def comma_separated_counts(what: str, example: str, maximum: int | None = None) -> Callable[[str], tuple[int, ...]]:
    """An argparse type for comma-separated ints >= 1 (and <= maximum), such as `example`; `what` names them."""
    bound = "" if maximum is None else f", at most {maximum} each"

    def parse(text: str) -> tuple[int, ...]:
        try:
            counts = tuple(int(part) for part in text.split(","))
        except ValueError:
            counts = ()
        if not counts or min(counts) < 1 or (maximum is not None and max(counts) > maximum):
            raise argparse.ArgumentTypeError(f"expected {what} like {example}{bound}, got {text!r}")
        return counts

    return parse


parse_step_counts = comma_separated_counts("step counts", "1,2,4,8", MAX_SAMPLING_STEPS)


def comma_separated_labels(text: str) -> tuple[int, ...]:
    """An argparse type for comma-separated class indices >= 0, such as 207,360,387."""
    try:
        labels = tuple(int(part) for part in text.split(","))
    except ValueError:
        labels = ()
    if not labels or min(labels) < 0:
        raise argparse.ArgumentTypeError(f"expected class indices like 207,360,387, got {text!r}")
    return labels


def finite_float(text: str) -> float:
    """An argparse type for a finite number (nan and inf are refused)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def seed(text: str) -> int:
    """An argparse type for a seed in [0, MAX_SEED]."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, {MAX_SEED}] (2**32 - 1), got {text!r}")
    return value


def device_of_choice(name: str) -> torch.device:
    """The device a --device choice (DEVICE_CHOICES) names; auto: CUDA when available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available here")
    return torch.device(name)


def check_count(flag: str, value: int, maximum: int = MAX_SAMPLES) -> int:
    """value, an int in [1, maximum]; ValueError naming the option otherwise."""
    if value < 1:
        raise ValueError(f"{flag} must be >= 1, got {value}")
    if value > maximum:
        raise ValueError(f"{flag} must be at most {maximum}, got {value}")
    return value


def parse_override(text: str) -> tuple[str, object]:
    """An argparse type for NAME=VALUE; VALUE is read as JSON (numbers, true/false/null, lists) or else a string."""
    name, sep, raw = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE like temb_type=identity, got {text!r}")
    try:
        return name, json.loads(raw)
    except json.JSONDecodeError:
        return name, raw


def add_official_options(parser: argparse.ArgumentParser) -> None:
    """--key and --set: which entry of an official IMM checkpoint to read, and IMMPrecond arguments to replace."""
    parser.add_argument("--key", default="ema", help="official checkpoints: the entry to load (default: %(default)s)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        type=parse_override,
        default=[],
        metavar="NAME=VALUE",
        help="official checkpoints: replace an IMMPrecond argument, e.g. temb_type=identity (repeatable)",
    )


# Output paths.


def check_output_file(flag: str, path: Path, suffixes: tuple[str, ...], *, force: bool) -> None:
    """path can be written: a suffix in `suffixes`, not a folder, not an existing file unless force, and
    its folder exists or can be made, and takes new files. Nothing is created."""
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"{flag} must end in {' or '.join(suffixes)}, got {str(path)!r}")
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {str(path)!r} is a folder; give a file name such as {str(path / 'x')!r}")
    if path.exists() and not force:
        raise FileExistsError(f"{flag} {str(path)!r} exists; pass --force to replace it")
    _check_can_create_in(flag, path.parent)


def check_output_folder(flag: str, path: Path, *, force: bool) -> None:
    """path can take the command's files: not a file, empty or absent unless force, and it exists or can be
    made where files can be created. Nothing is created."""
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{flag} {str(path)!r} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise FileExistsError(f"{flag} {str(path)!r} is not empty; pass --force to write into it (same names replaced)")
    _check_can_create_in(flag, path)


def _check_can_create_in(flag: str, folder: Path) -> None:
    """folder, or the nearest of its parents that exists (the folders below it would be made), takes new files."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{flag}: {str(existing)!r} is a file, so no folder can be made in it")
    try:  # trying is the one check that also sees read-only mounts, ACLs and special file systems
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise PermissionError(f"{flag}: cannot create files in {str(existing)!r} ({err.strerror})") from err


# Memory.


def format_bytes(count: float) -> str:
    """A byte count for people, e.g. 1.5 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can still get on device; None when it cannot be told.

    CUDA: the driver's free memory plus what PyTorch holds cached but unused. CPU: the smaller of
    MemAvailable (/proc/meminfo) and, in a container, its memory limit less what it uses (page cache
    not counted, the kernel reclaims it); sysconf's free pages where /proc is absent.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    found = [value for value in (_meminfo_available(), _cgroup_available()) if value is not None]
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):  # not a POSIX system
            return None
    return min(found)


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# (limit, usage, statistics file, its reclaimable page-cache entry) for cgroup v2, then v1.
_CGROUP_FILES = (
    ("memory.max", "memory.current", "memory.stat", "inactive_file"),
    ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat", "total_inactive_file"),
)


def _cgroup_available() -> int | None:
    root = Path("/sys/fs/cgroup")
    for limit_file, usage_file, stat_file, reclaimable in _CGROUP_FILES:
        try:
            limit_text = (root / limit_file).read_text().strip()
            if limit_text == "max" or int(limit_text) >= 2**60:  # no limit set
                return None
            stats = dict(line.split() for line in (root / stat_file).read_text().splitlines())
            usage = int((root / usage_file).read_text()) - int(stats.get(reclaimable, 0))
            return max(0, int(limit_text) - usage)
        except (OSError, ValueError):
            continue
    return None


def widest_output_bytes(module: torch.nn.Module, call: Callable[[], object]) -> int:
    """The largest tensor (in bytes) that module or any of its submodules outputs while call() runs, no grad."""
    widest = 0

    def record(_module, _inputs, output) -> None:
        nonlocal widest
        for tensor in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(tensor, torch.Tensor):
                widest = max(widest, tensor.numel() * tensor.element_size())

    hooks = [submodule.register_forward_hook(record) for submodule in module.modules()]
    try:
        with torch.no_grad():
            call()
    finally:
        for hook in hooks:
            hook.remove()
    return widest


def check_sampling_memory(
    flag: str, batch: int, device: torch.device, device_parts: dict[str, int], host_parts: dict[str, int]
) -> None:
    """Refuses (ValueError) a call whose estimated bytes exceed the memory available.

    device_parts: the estimate on the sampling device; host_parts: what the results take in host memory
    (counted with the device's when that is the CPU). Both grow about linearly with the batch, which the
    message's suggested batch assumes.
    """
    budgets = [(device, dict(device_parts))]
    if device.type == "cpu":
        budgets[0][1].update(host_parts)
    else:
        budgets.append((torch.device("cpu"), dict(host_parts)))
    for where, parts in budgets:
        available = available_memory(where)
        needed = sum(parts.values())
        if available is None or needed <= available:
            continue
        largest_fitting = batch * available // needed
        advice = f"use {flag} {largest_fitting} or less" if largest_fitting >= 1 else "not even one sample fits"
        breakdown = ", ".join(f"{name} {format_bytes(size)}" for name, size in parts.items() if size)
        memory = "GPU" if where.type == "cuda" else "host"
        raise ValueError(
            f"{flag} {batch} needs about {format_bytes(needed)} of {memory} memory ({breakdown}; a conservative "
            f"estimate), more than the {format_bytes(available)} available: {advice}"
        )


def sampling_parts(
    net,
    batch: int,
    sample_shape: tuple[int, ...],
    step_counts: tuple[int, ...],
    *,
    guided: bool,
    restart: bool,
    graphed: bool,
) -> dict[str, int]:
    """The bytes one sampling call needs on the net's device, by part; a conservative estimate.

    With F the numbers per sample, S the most steps, B the batch (2B for the model with guidance,
    which runs the conditional and null-label inputs as one batch), float32 states:
      noise        B·F·4, the prior draws
      states       2·B·F·4, the state before and after a step, plus restart's fresh noise (S-1)·B·F·4
      labels       B·label_dim·4 one-hot rows, twice with guidance
      times        2·S·B·8, GraphedSampler's per-sample float64 times (CUDA only)
      activations  ACTIVATION_COPIES × the widest module output of a batch-1 forward × B (2B with guidance)
    On CUDA, states and activations count twice: the warm-up runs' memory stays cached beside the
    CUDA graph's own memory pool.
    """
    numbers = math.prod(sample_shape)
    steps = max(step_counts)
    model_batch = 2 * batch if guided else batch
    device = next(net.parameters()).device
    probe = torch.zeros(1, *sample_shape, device=device)
    labels = torch.zeros(1, dtype=torch.long, device=device) if net.label_dim else None
    widest = widest_output_bytes(net, lambda: net(probe, net.T, net.eps, labels))
    states = 2 * batch * numbers * 4 + (steps - 1 if restart else 0) * batch * numbers * 4
    activations = ACTIVATION_COPIES * widest * model_batch
    graph_copies = 2 if graphed else 1
    return {
        "noise": batch * numbers * 4,
        "states": graph_copies * states,
        "labels": (2 if guided else 1) * batch * net.label_dim * 4,
        "times": 2 * steps * batch * 8 if graphed else 0,
        "activations": graph_copies * activations,
    }
