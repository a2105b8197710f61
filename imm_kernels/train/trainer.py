"""Training IMM models: the run configuration, the trainer, and its checkpoints.

One `Trainer` runs one process of a run: single-process, or one rank under
`torchrun` (gloo on CPU, NCCL on GPU; the process group is initialised from the
environment when WORLD_SIZE > 1). Local rank r takes GPU r mod the GPU count: where
a node's ranks outnumber its GPUs, they share them and talk over gloo. What makes a
run reproducible and resumable bit for bit:

- the data order is a function of (seed, step): every epoch is a permutation drawn
  from (seed, epoch), the global batch of step n is the next `batch` positions of that
  stream, and each rank takes its slice of whole groups;
- every step seeds the global RNG from (seed, rank, step) before IMMLoss draws its
  times, noise and dropout masks, so ranks draw differently, reproducibly, and a
  resumed run needs no RNG state from the checkpoint;
- the learning rate is a function of the step (linear warm-up, then constant), so it
  does not depend on the total number of steps either;
- the checkpoint holds the model, the EMA and the AdamW state (safetensors) and the
  step and optimizer hyper-parameters (JSON), plus the run's `config.json`; it is written
  atomically with checksums, and found again after any crash (`imm_kernels.train.checkpoints`).

What stops a run rather than letting it go on silently: a non-finite loss or gradient norm
(device-side flags, read where the host waits anyway: log lines and checkpoints), weights that
blew up, a lost peer process (the process group's timeout). Nothing non-finite is ever
checkpointed.

The EMA of the weights is kept on rank 0 for evaluation and samples only; training
never reads it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import __version__
from ..loss import IMMLoss
from ..models import ConvBackbone, DiT, MLPBackbone, SongUNet
from ..models.dit import DIT_SIZES
from ..models.flops import imm_training_step_flops, mfu, peak_bf16_flops
from ..ops.backends import BACKEND_NAMES
from ..precond import Preconditioner, check_parameterisation
from ..validation import (
    check_choice,
    check_finite,
    check_nonnegative_int,
    check_positive_int,
    check_probability,
    check_rate,
    check_time_range,
)
from .checkpoints import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    CheckpointError,
    begin_checkpoint,
    find_checkpoint,
    finish_checkpoint,
    holds_run,
    open_checkpoint,
    write_checkpoint,
    write_json_durably,
)
from .data import Dataset
from .fsdp import (
    SHARDED_DIR,
    ShardedEMA,
    full,
    join_single_process_group,
    load_sharded,
    local,
    no_gradient_sync,
    save_sharded,
    shard_model,
)
from .sampling_helpers import save_points_scatter, save_steps_grid
from .streaming import BatchLoader, InMemorySource, data_std, flip_mask, open_dataset

__all__ = [
    "TrainConfig",
    "DataInfo",
    "ProcessInfo",
    "Trainer",
    "TrainingDiverged",
    "CheckpointError",
    "build_net",
    "find_checkpoint",
    "load_run_config",
]

MIXED_PRECISION_CHOICES = ("auto", "none", "bf16")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
ON_NAN_CHOICES = ("stop", "skip")
DIST_CHOICES = ("ddp", "fsdp")
# Backbones: "auto" (conv for images, MLP for vectors), the small CPU ones, the DiT configs (DiT-S/2 is
# "dit-s2") and the IMM CIFAR-10 U-Net; --model-kwargs overrides any constructor argument.
DIT_MODELS = {f"dit-{size.lower()}{patch}": (size, patch) for size in ("S", "B", "L", "XL") for patch in (2, 4, 8)}
MODEL_CHOICES = ("auto", "mlp", "conv", *DIT_MODELS, "songunet")
# The config fields a resumed run may change (Trainer.resume, `imm-kernels train --resume`).
RESUMABLE_FIELDS = (
    "steps",
    "sample_every",
    "ckpt_every",
    "log_every",
    "on_nan",
    "keep",
    # how a step runs, not what it computes
    "compile",
    "checkpoint_activations",
    "tf32",
    "fused_optimizer",
    "workers",
)
LOG_FILE = "log.jsonl"
MODEL_FILE, EMA_FILE, OPTIMIZER_FILE = "model.safetensors", "ema.safetensors", "optimizer.safetensors"
# Default model sizes per kind of data: (width, depth) = ConvBackbone (channels, blocks), MLP (hidden, depth).
_DEFAULT_SIZES = {"image": (64, 3), "vector": (256, 3)}
# How long a collective waits for the other ranks before the run fails with a message (seconds).
DIST_TIMEOUT_S = 300.0
# A run stops as diverged when its weights' root mean square passes this (finite but useless:
# a huge learning rate can drive weights towards 1e30 while the loss sits flat).
WEIGHT_RMS_LIMIT = 1e6
# --on-nan skip stops as diverged after this many non-finite batches in a row: bad batches are
# rare, a run that produces nothing else has diverged.
MAX_CONSECUTIVE_SKIPS = 25
# Training data up to this size (float32) is kept on the device; larger data streams from its files.
IN_MEMORY_LIMIT_BYTES = 2 << 30
# Bins of t for the loss-by-time diagnostic in log.jsonl.
TIME_BINS = 4
# EMA warm-up: the decay used at step n is min(ema_decay, (1 + n)/(10 + n)), so the average
# covers about the last tenth of the steps until it reaches the 1/(1 - ema_decay) horizon.
_EMA_RAMP = 10


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; saved as `config.json` with every checkpoint.

    The defaults are the `imm-kernels demo` run on 8×8 digits (about 1.5 minutes on 2 CPU cores, 4–5 on a busier host).

    data: "digits", "toy2d" (= "checkerboard"), "checkerboard", "8gaussians", or a path
        (image folder or .npy/.npz array; see `imm_kernels.train.load_dataset`).
    steps: total optimizer steps (a resumed run continues up to this number).
    batch: global batch size, over all ranks; a multiple of group_size × world size.
    group_size: M, particles per group sharing (s, r, t); 1 is the consistency-style baseline.
    lr, warmup: AdamW learning rate, reached linearly over `warmup` steps, then constant.
    weight_decay, grad_clip: AdamW weight decay; max global gradient norm (0 disables clipping).
    ema_decay: the evaluation EMA's decay, warmed up as min(ema_decay, (1 + n)/(10 + n)).
    schedule, param, time_embed, T, eps: the model of docs/design.md §1.2 (`Preconditioner`).
    sigma_data: sigma_d; None takes the standard deviation of the training data, so the
        prior N(0, sigma_d²) has the data's scale (8×8 digits in [-1, 1]: about 0.75, not
        the 0.5 of CIFAR-10 pixels). For euler_fm and simple_edm, scaling the data and
        sigma_d by one factor c gives the same model and loss, so this equals rescaling the data
        to sigma_d = 0.5 (identity's coefficients do not involve sigma_d: not there).
    k, a, b: IMMLoss's r-step exponent, time-weight exponent and log-SNR shift.
    width, depth: model size; None takes the default for the data (conv 64 × 3, MLP 256 × 3).
    dropout: backbone dropout (conv backbone only).
    conditional, label_dropout: train on the data's class labels, replacing a label with
        the null class with probability label_dropout (for classifier-free guidance).
    seed: model init, data order and every random draw.
    sample_every, ckpt_every, log_every: steps between sample PNGs, checkpoints and log
        lines (0: only at the end; log_every must be >= 1).
    backend: the `mmd_loss` backend ("auto": native C++ on CPU, Triton on CUDA).
    mixed_precision: "auto" (bf16 autocast of the backbone on CUDA, none on CPU), "none", "bf16".
    device: "auto" (CUDA when available), "cpu" or "cuda".
    on_nan: what a non-finite loss or gradient norm does: "stop" the run (found at the next log
        line or checkpoint, no host sync per step; nothing non-finite is ever checkpointed), or
        "skip" the batch (no update; one host sync per step to know).
    keep: how many complete checkpoints to keep (the newest; at least 1).
    model: the backbone: "auto" (conv for images, MLP for vectors), "mlp", "conv", "dit-s2" …
        "dit-xl8" (the DiT configs; images or latents (C, S, S) with S a multiple of the patch),
        "songunet" (the IMM CIFAR-10 U-Net's class; its defaults are CIFAR-10's DDPM++ sizes).
        The DiT and U-Net use the fused adaLN/timestep ops on CUDA (backend "torch" runs their
        references, as for the loss); conditional DiTs take label dropout to their null class.
    model_kwargs: constructor arguments for the backbone, overriding the model's (e.g.
        {"hidden_size": 64, "depth": 2, "num_heads": 2} for a small DiT on 8×8 digits).
    compile: torch.compile the model the loss calls (the loss itself is graph-break-free).
    checkpoint_activations: recompute each DiT block in the backward pass (DiT models only).
    tf32: TF32 matmuls and convolutions on CUDA (float32 weights; no effect on the CPU).
    fused_optimizer: the fused AdamW kernel on CUDA (no effect on the CPU).
    accum: gradient accumulation: each rank's batch runs as this many micro-batches of whole
        groups (a step's random draws are made once for the whole batch, so the loss and
        gradients are the whole batch's, up to summation order, when the backbone has no dropout).
    workers: DataLoader worker processes reading data too large to keep in memory (streamed from
        memory-mapped arrays, shard folders or image folders; see imm_kernels.train.streaming).
    flip: mirror each training image left-right with probability 1/2, the coins drawn from
        (seed, rank, step), so a resumed run repeats them.
    dist: how the ranks share the model: "ddp" (a full copy on each, gradients all-reduced) or
        "fsdp" (FSDP2 `fully_shard`: parameters, gradients and optimizer state sharded over the
        ranks, the EMA too; sharded checkpoints through torch.distributed.checkpoint that load on
        any number of ranks; see imm_kernels.train.fsdp). "fsdp" also runs as a single process.
    fsdp_bf16_params: with dist="fsdp", all-gather the blocks' parameters in bf16 (half the
        traffic); the IMM target pass then runs with bf16 weights too. Off: float32 parameters,
        bf16 compute through autocast exactly as with "ddp".
    """

    data: str = "digits"
    steps: int = 4000
    batch: int = 128
    group_size: int = 4
    lr: float = 2e-3
    warmup: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.998
    schedule: str = "fm"
    param: str = "euler_fm"
    time_embed: str = "identity"
    sigma_data: float | None = None
    T: float = 0.994
    eps: float = 0.0
    k: int = 12
    a: float = 1.0
    b: float = 4.0
    width: int | None = None
    depth: int | None = None
    dropout: float = 0.0
    conditional: bool = False
    label_dropout: float = 0.1
    seed: int = 0
    sample_every: int = 1000
    ckpt_every: int = 1000
    log_every: int = 25
    backend: str = "auto"
    mixed_precision: str = "auto"
    device: str = "auto"
    on_nan: str = "stop"
    keep: int = 2
    model: str = "auto"
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    compile: bool = False
    checkpoint_activations: bool = False
    tf32: bool = True
    fused_optimizer: bool = True
    accum: int = 1
    workers: int = 0
    flip: bool = False
    dist: str = "ddp"
    fsdp_bf16_params: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.data, str) or not self.data:
            raise ValueError(f"data must be a data set name or a path, got {self.data!r}")
        check_nonnegative_int("steps", self.steps)
        check_positive_int("batch", self.batch)
        check_positive_int("group_size", self.group_size)
        if self.batch % self.group_size:
            raise ValueError(f"batch={self.batch} is not divisible by group_size={self.group_size}")
        check_finite("lr", self.lr, positive=True)
        check_nonnegative_int("warmup", self.warmup)
        check_finite("weight_decay", self.weight_decay, nonnegative=True)
        check_finite("grad_clip", self.grad_clip, nonnegative=True)
        check_rate("ema_decay", self.ema_decay)
        check_parameterisation(self.schedule, self.param, self.time_embed)
        if self.sigma_data is not None:
            check_finite("sigma_data", self.sigma_data, positive=True)
        # check_finite first: a T or eps that is no number is a ValueError here, as for every other field.
        check_time_range(check_finite("eps", self.eps), check_finite("T", self.T), finite_eta=True)
        check_nonnegative_int("k", self.k)
        check_finite("a", self.a)
        check_finite("b", self.b)
        for name in ("width", "depth"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        check_rate("dropout", self.dropout)
        if not isinstance(self.conditional, bool):
            raise TypeError(f"conditional must be a bool, got {self.conditional!r}")
        check_probability("label_dropout", self.label_dropout)
        for name in ("seed", "sample_every", "ckpt_every"):
            check_nonnegative_int(name, getattr(self, name))
        check_positive_int("log_every", self.log_every)
        check_choice("backend", self.backend, BACKEND_NAMES)
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION_CHOICES)
        check_choice("device", self.device, DEVICE_CHOICES)
        check_choice("on_nan", self.on_nan, ON_NAN_CHOICES)
        check_positive_int("keep", self.keep)
        check_choice("model", self.model, MODEL_CHOICES)
        if not isinstance(self.model_kwargs, dict) or not all(isinstance(key, str) for key in self.model_kwargs):
            raise TypeError(f"model_kwargs must be a dict of argument names to values, got {self.model_kwargs!r}")
        if self.model not in ("auto", "mlp", "conv") and (self.width is not None or self.depth is not None):
            raise ValueError(
                f"width and depth size the mlp and conv models; size model={self.model!r} with model_kwargs"
            )
        for name in ("compile", "checkpoint_activations", "tf32", "fused_optimizer"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        check_positive_int("accum", self.accum)
        check_nonnegative_int("workers", self.workers)
        if not isinstance(self.flip, bool):
            raise TypeError(f"flip must be a bool, got {self.flip!r}")
        check_choice("dist", self.dist, DIST_CHOICES)
        if not isinstance(self.fsdp_bf16_params, bool):
            raise TypeError(f"fsdp_bf16_params must be a bool, got {self.fsdp_bf16_params!r}")
        if self.fsdp_bf16_params and self.dist != "fsdp":
            raise ValueError('fsdp_bf16_params applies to dist="fsdp"')
        if self.checkpoint_activations and self.model not in DIT_MODELS:
            raise ValueError(f"checkpoint_activations applies to the DiT models, not model={self.model!r}")


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about its data, saved with the config so eval needs no data."""

    name: str
    kind: str
    shape: tuple[int, ...]
    num_classes: int

    @classmethod
    def of(cls, dataset: Dataset) -> DataInfo:
        return cls(dataset.name, dataset.kind, dataset.shape, dataset.num_classes)


@dataclass(frozen=True)
class ProcessInfo:
    """This process's place in the run: rank `rank` of `world_size`."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _process_group_backend(device_type: str) -> str:
    """NCCL for CUDA ranks with a GPU each; gloo on the CPU, and for CUDA ranks that outnumber the
    node's GPUs: NCCL refuses two ranks on one GPU, gloo runs them there (slower)."""
    if device_type != "cuda":
        return "gloo"
    local_ranks, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count()
    if local_ranks <= gpus:
        return "nccl"
    warnings.warn(
        f"{local_ranks} ranks share {gpus} GPU(s) on this node: NCCL needs a GPU per rank, "
        "so the process group uses gloo (slower)",
        stacklevel=2,
    )
    return "gloo"


def _process_from_env(device_type: str, timeout_s: float = DIST_TIMEOUT_S) -> ProcessInfo:
    """This process's rank in the default process group, joining it first (from torchrun's
    environment; see _process_group_backend) when WORLD_SIZE > 1 and nobody has yet.

    timeout_s bounds every collective: a rank whose peer stopped fails after it instead of
    waiting (PyTorch's default is 30 minutes).
    """
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            return ProcessInfo()
        dist.init_process_group(_process_group_backend(device_type), timeout=datetime.timedelta(seconds=timeout_s))
    return ProcessInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _rank_device(local_rank: int) -> torch.device:
    """The GPU of local rank `local_rank`: local ranks beyond the GPU count share them round robin
    (two processes on a one-GPU machine both take cuda:0) instead of asking for a missing cuda:N."""
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def _resolve_device(config: TrainConfig) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available")
    if config.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def build_net(config: TrainConfig, data: DataInfo, mixed_precision: str | None = None) -> Preconditioner:
    """The Preconditioner and backbone for `data`, initialised from config.seed (the global RNG is kept).

    mixed_precision: the backbone's autocast dtype (Preconditioner's argument), None for float32.
    """
    label_dim = data.num_classes if config.conditional else 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        backbone = _build_backbone(config, data, label_dim)
    return Preconditioner(
        backbone,
        config.schedule,
        config.param,
        config.time_embed,
        config.sigma_data,
        config.T,
        config.eps,
        label_dim=label_dim,
        mixed_precision=mixed_precision,
    )


def _build_backbone(config: TrainConfig, data: DataInfo, label_dim: int) -> nn.Module:
    model = config.model if config.model != "auto" else ("conv" if data.kind == "image" else "mlp")
    width = config.width or _DEFAULT_SIZES[data.kind][0]
    depth = config.depth or _DEFAULT_SIZES[data.kind][1]
    kwargs = dict(config.model_kwargs)
    if model == "mlp":
        if data.kind != "vector":
            raise ValueError(f"model 'mlp' takes vector data; {data.name} holds {data.kind}s of shape {data.shape}")
        return MLPBackbone(data.shape[0], **{"hidden": width, "depth": depth, "label_dim": label_dim, **kwargs})
    if data.kind != "image":
        raise ValueError(f"model {model!r} takes images or latents (C, H, W); {data.name} holds vectors")
    channels, height, image_width = data.shape
    if height != image_width:
        raise ValueError(f"data {data.name}: images are {height}×{image_width}; model {model!r} needs square ones")
    # The fused ops' backend follows the loss's: "torch" runs every reference, any other choice the fused ops.
    ops_backend = "torch" if config.backend == "torch" else "triton" if config.backend == "triton" else "auto"
    if model == "conv":
        if height % ConvBackbone.PATCH:
            raise ValueError(f"data {data.name}: the conv backbone needs an even image side, got {height}")
        conv = {"channels": width, "num_blocks": depth, "label_dim": label_dim, "dropout": config.dropout}
        return ConvBackbone(channels, height, **{**conv, **kwargs})
    if model == "songunet":
        return SongUNet(
            **{
                "img_resolution": height,
                "in_channels": channels,
                "label_dim": label_dim,
                "dropout": config.dropout,
                "backend": ops_backend,
                **kwargs,
            }
        )
    size, patch = DIT_MODELS[model]
    depth, hidden_size, num_heads = DIT_SIZES[size]
    dit = {
        "input_size": height,
        "in_channels": channels,
        "patch_size": patch,
        "depth": depth,
        "hidden_size": hidden_size,
        "num_heads": num_heads,
        "num_classes": label_dim,
        "dropout": config.dropout,
        "backend": ops_backend,
        "checkpoint_activations": config.checkpoint_activations,
    }
    return DiT(**{**dit, **kwargs})


def _nvtx_range_factory():
    """A context factory for named NVTX ranges when IMM_KERNELS_NVTX=1, else a no-op.

    Uses the `nvtx` package when installed, else torch.cuda.nvtx when CUDA is available.
    """
    if os.environ.get("IMM_KERNELS_NVTX") != "1":
        return lambda name: contextlib.nullcontext()
    if importlib.util.find_spec("nvtx") is not None:
        import nvtx

        return lambda name: nvtx.annotate(name, domain="imm_kernels")
    if torch.cuda.is_available():
        return torch.cuda.nvtx.range
    return lambda name: contextlib.nullcontext()


class _PhaseClock:
    """Time per step phase (data, forward: both model passes, loss: the MMD, backward, optimizer, ema),
    inside the phase's NVTX range.

    On CUDA it records event pairs and sums them when read (at a log line, where the host waits
    anyway); on a CPU it adds perf_counter intervals.
    """

    STEP_PHASES = ("data", "forward", "loss", "backward", "optimizer", "ema")

    def __init__(self, device: torch.device) -> None:
        self._nvtx = _nvtx_range_factory()
        self._cuda = device.type == "cuda"
        self._seconds: dict[str, float] = {}
        self._events: list[tuple[str, object, object]] = []

    @contextlib.contextmanager
    def __call__(self, name: str):
        with self._nvtx(name):
            if name not in self.STEP_PHASES:
                yield
                return
            if self._cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                yield
                end.record()
                self._events.append((name, start, end))
            else:
                began = time.perf_counter()
                yield
                self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - began

    def read_ms(self, steps: int) -> dict[str, float]:
        """Milliseconds per step of each phase since the last read; resets."""
        seconds = dict(self._seconds)
        if self._events:
            torch.cuda.synchronize()
            for name, start, end in self._events:
                seconds[name] = seconds.get(name, 0.0) + start.elapsed_time(end) / 1000
        self._seconds, self._events = {}, []
        return {name: round(1000 * value / max(steps, 1), 3) for name, value in seconds.items()}


class _TimeBins:
    """The IMM paper's diagnostic: the weighted MMD² averaged per bin of t, accumulated on the device."""

    def __init__(self, eps: float, T: float, device: torch.device, num_bins: int = TIME_BINS) -> None:
        self.edges = torch.linspace(eps, T, num_bins + 1, dtype=torch.float64)
        self._inner = self.edges[1:-1].to(device=device, dtype=torch.float32)
        self._sums = torch.zeros(num_bins, dtype=torch.float64, device=device)
        self._counts = torch.zeros(num_bins, dtype=torch.float64, device=device)

    def add(self, t: Tensor, weighted_mmd: Tensor) -> None:
        index = torch.bucketize(t.float(), self._inner, right=True)
        self._sums.index_add_(0, index, weighted_mmd.detach().double())
        self._counts.index_add_(0, index, torch.ones_like(self._counts[index]))

    def read(self) -> tuple[dict[str, float | None], dict[str, int]]:
        """({"lo-hi": mean weighted MMD² of the groups drawn there, None where none}, {"lo-hi": their
        number}) since the last read; resets."""
        sums, counts = self._sums.tolist(), self._counts.tolist()
        self._sums.zero_()
        self._counts.zero_()
        edges = self.edges.tolist()
        names = [f"{lo:.3f}-{hi:.3f}" for lo, hi in zip(edges[:-1], edges[1:])]
        means = {name: (total / count if count else None) for name, total, count in zip(names, sums, counts)}
        return means, {name: int(count) for name, count in zip(names, counts)}


def _derived_seed(seed: int, *key: int) -> int:
    """A well-mixed 63-bit seed for the stream `key` of a run (distinct keys give independent streams)."""
    state = np.random.SeedSequence(seed, spawn_key=key).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


_DATA_ORDER_STREAM, _STEP_DRAWS_STREAM = 0, 1


class Trainer:
    """Trains one IMM model per `config`, writing config, samples, log and checkpoints under `out_dir`.

    Args:
        config: the run (see TrainConfig).
        out_dir: the run directory; None writes nothing (tests, gradient checks).
        process: this process's rank and world size; None reads torchrun's environment and
            joins the process group when WORLD_SIZE > 1. A ProcessInfo given explicitly
            with world_size > 1 but no initialised process group computes that rank's
            batch and draws without DDP (used to check DDP against a serial computation).
        overwrite: write into an out_dir that already holds a run (otherwise that is an
            error: continue it with `Trainer.resume`). Checkpoints already there are kept until
            rotation (`keep`) replaces them with this run's.
        progress: show a tqdm progress bar (rank 0 only).
        dist_timeout_s: the process group's timeout when this trainer creates it (torchrun).
        run_id: the run's identity, written with every checkpoint (a resumed run keeps it);
            None starts a new run.
    """

    def __init__(
        self,
        config: TrainConfig,
        out_dir: str | os.PathLike | None = None,
        *,
        process: ProcessInfo | None = None,
        overwrite: bool = False,
        progress: bool = True,
        dist_timeout_s: float = DIST_TIMEOUT_S,
        run_id: str | None = None,
    ) -> None:
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        check_finite("dist_timeout_s", dist_timeout_s, positive=True)
        self.device = _resolve_device(config)
        self.process = process or _process_from_env(self.device.type, dist_timeout_s)
        if self.device.type == "cuda":
            self.device = _rank_device(self.process.local_rank)
            torch.cuda.set_device(self.device)
        self.sharded = config.dist == "fsdp"
        if self.sharded and not dist.is_initialized():
            if self.process.world_size > 1:
                raise ValueError(
                    f"dist='fsdp' shards the model over a process group, but rank {self.process.rank} of "
                    f"{self.process.world_size} has none (start the ranks with torchrun)"
                )
            join_single_process_group(_process_group_backend(self.device.type))
        world_size = self.process.world_size
        if config.batch % (config.group_size * world_size):
            raise ValueError(
                f"batch={config.batch} must be a multiple of group_size × world size = "
                f"{config.group_size} × {world_size}, so that every rank gets whole groups"
            )
        self.local_batch = config.batch // world_size
        if (self.local_batch // config.group_size) % config.accum:
            raise ValueError(
                f"accum={config.accum} must divide each rank's {self.local_batch // config.group_size} groups "
                f"(batch {config.batch} / {world_size} rank(s) / group_size {config.group_size})"
            )
        self.out_dir = None if out_dir is None else Path(out_dir)
        if self.out_dir is not None and not overwrite and holds_run(self.out_dir):
            raise ValueError(
                f"out_dir {self.out_dir} already holds a run (config.json or checkpoints); resume it with "
                "--resume, or choose another output directory"
            )
        self.run_id = run_id or uuid.uuid4().hex

        source = open_dataset(config.data, split="train", seed=config.seed)
        if config.conditional and not source.labelled:
            raise ValueError(f"conditional=True but the data {source.name} has no class labels")
        if config.flip and source.kind != "image":
            raise ValueError(f"flip mirrors images, but {source.name} holds {source.kind}s")
        if config.sigma_data is None:
            config = dataclasses.replace(config, sigma_data=round(data_std(source), 4))
        if config.model in ("auto", "mlp", "conv"):
            width, depth = _DEFAULT_SIZES[source.kind]
            config = dataclasses.replace(config, width=config.width or width, depth=config.depth or depth)
        self.config = config
        self.data_info = DataInfo.of(source)
        self.source, self.data_size = source, len(source)
        # Data that fits (IN_MEMORY_LIMIT_BYTES) is read once and kept on the device, indexed per step;
        # larger data streams from its files through BatchLoader (config.workers processes).
        sample_bytes = 4 * math.prod(source.shape)
        self.streaming = (
            not isinstance(source, InMemorySource) and self.data_size * sample_bytes > IN_MEMORY_LIMIT_BYTES
        )
        if self.streaming:
            self.train_x = self.train_labels = None
        else:
            x, labels = source.rows(torch.arange(self.data_size))
            self.train_x = x.to(self.device)
            self.train_labels = labels.to(self.device) if config.conditional and labels is not None else None

        use_bf16 = self.config.mixed_precision == "bf16" or (
            self.config.mixed_precision == "auto" and self.device.type == "cuda"
        )
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = self.config.tf32
            torch.backends.cudnn.allow_tf32 = self.config.tf32
        mixed_precision = "bf16" if use_bf16 else None
        self.net = build_net(self.config, self.data_info, mixed_precision).to(self.device)
        # The EMA: a full copy on rank 0 (single process, DDP), or sharded on every rank (FSDP).
        self.ema, self.sharded_ema = None, None
        if self.sharded:
            shard_model(self.net, self.device, bf16_params=self.config.fsdp_bf16_params)
            self.sharded_ema = ShardedEMA(
                self.net, lambda: build_net(self.config, self.data_info, mixed_precision), self.device
            )
        elif self.process.is_main:
            self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        distributed = world_size > 1 and dist.is_initialized()
        self.model = (
            nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.device] if self.device.type == "cuda" else None
            )
            if distributed and not self.sharded
            else self.net
        )
        if self.config.compile:
            self.model = torch.compile(self.model)
        self.loss_fn = IMMLoss(
            self.model,
            self.config.group_size,
            k=self.config.k,
            a=self.config.a,
            b=self.config.b,
            label_dropout=self.config.label_dropout if self.config.conditional else 0.0,
            backend=self.config.backend,
        )
        self._nvtx = _PhaseClock(self.device)
        self.loss_fn.phase = self._nvtx
        fused = self.config.fused_optimizer and self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            self.net.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay, fused=fused or None
        )
        self.step = 0
        self.progress = progress
        self._epoch_orders: dict[int, Tensor] = {}
        self._reset_divergence_watch()
        self._time_bins = _TimeBins(self.loss_fn.eps, self.loss_fn.T, self.device)
        self._throughput = _throughput_model(self.net.backbone, self.device)

    # Data and randomness: functions of (seed, step, rank) only.

    def _epoch_order(self, epoch: int) -> Tensor:
        """The data order of one epoch; only the latest is kept (batches never go back an epoch)."""
        if epoch not in self._epoch_orders:
            gen = torch.Generator().manual_seed(_derived_seed(self.config.seed, _DATA_ORDER_STREAM, epoch))
            order = torch.randperm(self.data_size, generator=gen)
            # Streaming: the loader reads the rows on the CPU, so the order stays there (no sync per step).
            self._epoch_orders = {epoch: order if self.streaming else order.to(self.device)}
        return self._epoch_orders[epoch]

    def batch_indices(self, step: int) -> Tensor:
        """This rank's rows of the training data at `step`: its slice of the global batch.

        The global batches walk through a stream of epochs, each a permutation drawn from
        (seed, epoch); a batch that crosses an epoch's end continues into the next one.
        """
        size = self.data_size
        position = step * self.config.batch + self.process.rank * self.local_batch
        stop = position + self.local_batch
        parts = []
        while position < stop:
            epoch, offset = divmod(position, size)
            take = min(size - offset, stop - position)
            parts.append(self._epoch_order(epoch)[offset : offset + take])
            position += take
        return torch.cat(parts)

    def _batch(self, step: int) -> tuple[Tensor, Tensor | None]:
        """This rank's (x, labels) at `step`: indexed on the device, or read from the source (streaming);
        mirrored per flip_mask when config.flip, as BatchLoader does."""
        indices = self.batch_indices(step)
        if self.streaming:
            x, labels = self.source.rows(indices)
        else:
            x = self.train_x[indices]
            labels = None if self.train_labels is None else self.train_labels[indices]
        if self.config.flip:
            mirrored = flip_mask(len(indices), seed=self.config.seed, rank=self.process.rank, step=step)
            mirrored = mirrored.to(x.device, non_blocking=True).view(-1, *[1] * (x.dim() - 1))
            x = torch.where(mirrored, x.flip(-1), x)
        return x, labels

    def compute_loss_and_gradients(
        self, step: int, batch: tuple[Tensor, Tensor | None] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of this rank's batch at `step`, and the gradients in .grad (DDP-averaged when distributed).

        batch: the step's (x, labels) as BatchLoader gives them (streaming); None reads them here.

        With config.accum = N the batch runs as N micro-batches of whole groups, backward after
        each (DDP syncs after the last only). The step's random draws are made once for the whole
        batch and sliced, so the loss is the whole batch's (up to summation order), not N others.
        """
        with self._nvtx("data"):
            x, labels = self._batch(step) if batch is None else batch
            x = x.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True) if self.config.conditional else None
        torch.manual_seed(_derived_seed(self.config.seed, _STEP_DRAWS_STREAM, self.process.rank, step))
        self.optimizer.zero_grad(set_to_none=True)
        accum = self.config.accum
        if accum == 1:
            loss, stats = self.loss_fn(x, labels)  # times its "forward" and "loss" phases itself
            with self._nvtx("backward"):
                loss.backward()
            return loss.detach(), stats
        draws = self.loss_fn.draw(x)
        groups = draws.num_groups
        per_micro = groups // accum
        total, parts = None, []
        for micro in range(accum):
            start, stop = micro * per_micro, (micro + 1) * per_micro
            rows = slice(start * self.config.group_size, stop * self.config.group_size)
            with contextlib.nullcontext() if micro == accum - 1 else self._no_gradient_sync():
                loss, stats = self.loss_fn(
                    x[rows],
                    None if labels is None else labels[rows],
                    draws=draws.groups(start, stop),
                    groups_in_step=groups,
                )
                with self._nvtx("backward"):
                    loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
            parts.append(stats)
        return total, {name: torch.cat([part[name] for part in parts]) for name in parts[0]}

    def _no_gradient_sync(self):
        """Gradients accumulate locally, without the ranks' all-reduce (DDP) or reduce-scatter (FSDP)."""
        if self.sharded:
            return no_gradient_sync(self.net)
        return self.model.no_sync() if hasattr(self.model, "no_sync") else contextlib.nullcontext()

    def learning_rate(self, step: int) -> float:
        """Linear warm-up to config.lr over config.warmup steps, then constant."""
        return self.config.lr * min(1.0, (step + 1) / max(self.config.warmup, 1))

    def train_step(self, batch: tuple[Tensor, Tensor | None] | None = None) -> Tensor:
        """One optimizer step at self.step; returns the (detached) loss.

        A non-finite loss or gradient norm is recorded on the device (no host sync) and raised
        as TrainingDiverged at the next log line or checkpoint (`check_divergence`); with
        on_nan="skip" the batch is skipped instead (no update), which reads the flag every step.
        """
        loss, stats = self.compute_loss_and_gradients(self.step, batch)
        with self._nvtx("optimizer"):
            params = [p for p in self.net.parameters() if p.grad is not None]
            max_norm = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
            grad_norm = full(nn.utils.clip_grad_norm_(params, max_norm)) if params else loss.new_zeros(())
            finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
            if self.config.on_nan == "skip":
                if not bool(finite):  # the host sync of skip mode
                    self._skip_batch(loss, grad_norm)
                    return loss
                self.consecutive_skips = 0
            self._watch(finite, loss)
            self._time_bins.add(stats["t"], stats["weighted_mmd"])
            for group in self.optimizer.param_groups:
                group["lr"] = self.learning_rate(self.step)
            self.optimizer.step()
        if self.ema is not None or self.sharded_ema is not None:
            with self._nvtx("ema"):
                self._update_ema()
        self.step += 1
        return loss

    # Divergence: device-side flags, read where the host waits anyway (log lines, checkpoints).

    def _reset_divergence_watch(self) -> None:
        make = dict(device=self.device)
        self._first_bad_step = torch.full((), -1, dtype=torch.long, **make)
        self._last_finite_loss = torch.full((), math.nan, dtype=torch.float32, **make)
        self._last_finite_step = torch.full((), -1, dtype=torch.long, **make)
        self.skipped_steps = 0
        self.consecutive_skips = 0

    def _watch(self, finite: Tensor, loss: Tensor) -> None:
        step = self.step + 1  # the step number this update completes, as in the log
        self._first_bad_step = torch.where(~finite & (self._first_bad_step < 0), step, self._first_bad_step)
        healthy = finite & (self._first_bad_step < 0)
        self._last_finite_loss = torch.where(healthy, loss.float(), self._last_finite_loss)
        self._last_finite_step = torch.where(healthy, step, self._last_finite_step)

    def _skip_batch(self, loss: Tensor, grad_norm: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        self.consecutive_skips += 1
        self.step += 1
        if self.is_logging:
            self._log({"step": self.step, "event": "skipped", "loss": loss.item(), "grad_norm": grad_norm.item()})
        if self.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            raise TrainingDiverged(
                f"{MAX_CONSECUTIVE_SKIPS} batches in a row gave a non-finite loss or gradient (steps "
                f"{self.step - MAX_CONSECUTIVE_SKIPS + 1} to {self.step}); " + self._divergence_hints()
            )

    def _divergence_hints(self) -> str:
        """Which checkpoint survives (only finite weights are ever checkpointed), then what to try."""
        kept = ""
        if self.out_dir is not None:
            try:
                newest = find_checkpoint(self.out_dir)
                kept = f"the newest checkpoint, {newest}, is kept. "
            except (CheckpointError, FileNotFoundError):
                kept = "no checkpoint had been written. "
        return kept + _DIVERGENCE_HINTS

    @property
    def is_logging(self) -> bool:
        return self.process.is_main and self.out_dir is not None

    def check_divergence(self) -> None:
        """Raises TrainingDiverged if a step went non-finite or the weights blew up (one host sync).

        Under torchrun every rank takes part (the flags are combined), so all ranks stop together.
        """
        with torch.no_grad():
            params = list(self.net.parameters())
            numel = sum(p.numel() for p in params)  # a DTensor's numel is the whole parameter's
            square_sum = torch.zeros((), device=self.device)
            for p in params:
                square_sum += local(p).detach().float().square().sum()
            if self.sharded and self.process.world_size > 1:
                dist.all_reduce(square_sum)  # each rank holds its shards' part
            rms = torch.sqrt(square_sum / max(numel, 1))
            flags = torch.stack([self._first_bad_step.float(), torch.nan_to_num(rms, nan=math.inf)])
        if dist.is_initialized() and self.process.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        first_bad, weight_rms = flags.tolist()
        if first_bad >= 0:
            last_step = int(self._last_finite_step.item())
            last = (
                f"last finite loss {self._last_finite_loss.item():.4g} at step {last_step}"
                if last_step >= 0
                else "no finite loss before it"
            )
            raise TrainingDiverged(
                f"training diverged at step {int(first_bad)}: the loss or gradient norm became non-finite ({last}); "
                + self._divergence_hints()
            )
        if not weight_rms <= WEIGHT_RMS_LIMIT:
            raise TrainingDiverged(
                f"training diverged by step {self.step}: the weights' root mean square is {weight_rms:.3g} "
                f"(> {WEIGHT_RMS_LIMIT:g}), though the loss is finite; " + self._divergence_hints()
            )

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = min(self.config.ema_decay, (1 + self.step) / (_EMA_RAMP + self.step))
        # Under FSDP each rank averages its own shards of the weights into its shards of the EMA.
        ema = self.ema if self.sharded_ema is None else self.sharded_ema.module
        ema_params, params = [local(p) for p in ema.parameters()], [local(p) for p in self.net.parameters()]
        torch._foreach_lerp_(ema_params, params, 1 - decay)
        for ema_buffer, buffer in zip(ema.buffers(), self.net.buffers()):
            ema_buffer.copy_(buffer)

    # The loop.

    def train(self) -> dict[str, float]:
        """Trains up to config.steps, writing samples, log lines and checkpoints on rank 0.

        Returns the last logged loss, the mean samples/s over the run, the wall time and the
        number of skipped batches. Raises TrainingDiverged (see `check_divergence`); the
        checkpoints already written are then the last good ones.
        """
        from tqdm.auto import tqdm

        config, is_main = self.config, self.process.is_main
        if self.is_logging:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_json_durably(self.out_dir / CONFIG_FILE, self.config_json())
            self._trim_log()
        bar = tqdm(
            total=config.steps,
            initial=self.step,
            disable=not (is_main and self.progress),
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
        )
        start_step, started = self.step, time.perf_counter()
        interval_start, interval_losses, last_loss = started, [], math.nan
        batches = None
        if self.streaming and self.step < config.steps:
            loader = BatchLoader(
                self.source,
                self.batch_indices,
                start_step=self.step,
                stop_step=config.steps,
                num_workers=config.workers,
                pin_memory=self.device.type == "cuda",
                flip=config.flip,
                seed=config.seed,
                rank=self.process.rank,
            )
            batches = iter(loader)
        try:
            while self.step < config.steps:
                skipped = self.skipped_steps
                loss = self.train_step(None if batches is None else next(batches))
                if self.skipped_steps == skipped:
                    interval_losses.append(loss)
                bar.update(1)
                at_end = self.step == config.steps
                log_now = self.step % config.log_every == 0 or at_end
                sample_now = (config.sample_every and self.step % config.sample_every == 0) or at_end
                checkpoint_now = (config.ckpt_every and self.step % config.ckpt_every == 0) or at_end
                if log_now or sample_now or checkpoint_now:
                    self.check_divergence()  # every rank, at the same steps
                if log_now and interval_losses:
                    logged_steps = len(interval_losses)
                    last_loss = torch.stack(interval_losses).mean().item()
                    now = time.perf_counter()
                    samples_per_s = len(interval_losses) * config.batch / (now - interval_start)
                    interval_start, interval_losses = now, []
                    throughput = self._throughput(samples_per_s, self.process.world_size)
                    shown = {"loss": f"{last_loss:.4g}", "samples_per_s": f"{samples_per_s:.0f}"}
                    if "mfu" in throughput:
                        shown["mfu"] = f"{throughput['mfu']:.1%}"
                    bar.set_postfix(shown)
                    step_ms = self._nvtx.read_ms(logged_steps)
                    loss_by_t, groups_by_t = self._time_bins.read()
                    if self.is_logging:
                        record = {"step": self.step, "loss": last_loss, "lr": self.learning_rate(self.step - 1)}
                        record.update(samples_per_s=samples_per_s, **throughput, step_ms=step_ms)
                        record.update(loss_by_t=loss_by_t, groups_by_t=groups_by_t)
                        if self.skipped_steps:
                            record["skipped_steps"] = self.skipped_steps
                        self._log(record)
                # Under FSDP every rank takes part (the EMA and the shards are gathered or written
                # collectively); otherwise rank 0 alone, which holds the EMA.
                takes_part = self.out_dir is not None and (self.sharded or self.process.is_main)
                if takes_part and sample_now:
                    with self._nvtx("sample"):
                        self.save_samples(self.out_dir / "samples" / f"step_{self.step:06d}.png")
                if takes_part and checkpoint_now:
                    with self._nvtx("checkpoint"):
                        self.save_checkpoint()
        except TrainingDiverged as err:
            if self.is_logging:
                self._log({"step": self.step, "event": "diverged", "message": str(err)})
            raise
        finally:
            bar.close()
        if dist.is_initialized() and self.process.world_size > 1:
            dist.barrier()  # the others wait for rank 0's last checkpoint
        wall = time.perf_counter() - started
        return {
            "loss": last_loss,
            "samples_per_s": (self.step - start_step) * config.batch / max(wall, 1e-9),
            "wall_s": wall,
            "skipped_steps": self.skipped_steps,
        }

    def _log(self, record: dict) -> None:
        """One JSON line; non-finite numbers are written as null (bare NaN is not JSON)."""
        clean = _finite_or_null(record)
        with open(self.out_dir / LOG_FILE, "a") as log:
            log.write(json.dumps(clean, allow_nan=False) + "\n")

    def _trim_log(self) -> None:
        """A new run starts a new log; a resumed one drops the lines after its checkpoint's step (a crashed
        run may have logged past its last checkpoint) and keeps the rest."""
        path = self.out_dir / LOG_FILE
        if not path.exists():
            return
        if self.step == 0:
            path.unlink()
            return
        kept = _log_lines_up_to(path, self.step)
        path.write_text("".join(line + "\n" for line in kept))

    # Samples.

    def evaluation_ema(self) -> Preconditioner | None:
        """The EMA model, whole, on rank 0 (None on the other ranks). Under FSDP this gathers the shards:
        a collective every rank calls."""
        return self.sharded_ema.gather() if self.sharded_ema is not None else self.ema

    def save_samples(self, path: str | os.PathLike) -> Path | None:
        """EMA samples as a PNG (rank 0): images at 1/2/4/8 steps (a row each), 2-D points as a 1-step
        scatter plot. Under FSDP every rank calls it (the EMA is gathered).

        The prior draws come from config.seed, so the images of a run compare across steps.
        Latents (vectors, or images of other than 1 or 3 channels) have no picture; nothing is written for them.
        """
        is_image = self.data_info.kind == "image" and self.data_info.shape[0] in (1, 3)
        if not (is_image or self.data_info.shape == (2,)):
            return None
        ema = self.evaluation_ema()
        if ema is None:
            return None
        if is_image:
            return save_steps_grid(ema, path, self.data_info.shape, seed=self.config.seed)
        return save_points_scatter(ema, path, 1, seed=self.config.seed, data_name=self.data_info.name)

    # Checkpoints.

    def config_json(self) -> dict:
        return {
            "config": dataclasses.asdict(self.config),
            "data_info": dataclasses.asdict(self.data_info),
            "world_size": self.process.world_size,
            "run_id": self.run_id,
            "imm_kernels_version": __version__,
        }

    def save_checkpoint(self) -> Path:
        """Writes checkpoint self.step of the run under out_dir (see imm_kernels.train.checkpoints):
        model, EMA and optimizer (safetensors), config.json and state.json with their SHA-256s.

        Rank 0 only (the EMA lives there); under FSDP every rank (see _save_sharded_checkpoint).
        Refuses non-finite weights (TrainingDiverged): a checkpoint is only ever written from finite
        ones. Keeps the newest config.keep.
        """
        from safetensors.torch import save_file

        if self.sharded:
            return self._save_sharded_checkpoint()
        if self.ema is None or self.out_dir is None:
            raise RuntimeError("save_checkpoint runs on rank 0 (which keeps the EMA) of a trainer with an out_dir")
        self._check_finite_weights(self.ema)

        def write_files(folder: Path) -> dict:
            save_file(_contiguous(self.net.state_dict()), folder / MODEL_FILE)
            save_file(_contiguous(self.ema.state_dict()), folder / EMA_FILE)
            optimizer_tensors, param_groups = _flatten_optimizer_state(self.optimizer.state_dict())
            save_file(optimizer_tensors, folder / OPTIMIZER_FILE)
            write_json_durably(folder / CONFIG_FILE, self.config_json())
            return {"step": self.step, "param_groups": param_groups}

        return write_checkpoint(self.out_dir, self.step, write_files, keep=self.config.keep)

    def _check_finite_weights(self, ema: nn.Module) -> None:
        """TrainingDiverged unless the model and EMA weights are finite (under FSDP: every rank's shards)."""
        for name, module in (("model", self.net), ("EMA", ema)):
            finite = torch.stack([torch.isfinite(local(p)).all() for p in module.parameters()]).all()
            if self.sharded and self.process.world_size > 1:
                finite = finite.to(torch.int32)
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if not bool(finite):  # one read for the whole module
                raise TrainingDiverged(
                    f"the {name} weights hold non-finite values at step {self.step}; no checkpoint was written. "
                    + self._divergence_hints()
                )

    def _save_sharded_checkpoint(self) -> Path:
        """save_checkpoint under FSDP, on every rank: each writes its shards of model and optimizer through
        torch.distributed.checkpoint into the checkpoint's sharded/ folder, then rank 0 writes the gathered
        EMA, the config and state.json, and completes the checkpoint as write_checkpoint does."""
        from safetensors.torch import save_file

        if self.out_dir is None:
            raise RuntimeError("save_checkpoint needs a trainer with an out_dir")
        self._check_finite_weights(self.sharded_ema.module)
        folders = [begin_checkpoint(self.out_dir, self.step) if self.process.is_main else None]
        if self.process.world_size > 1:
            dist.broadcast_object_list(folders, src=0)  # the ranks write into rank 0's new folder
        partial, final = folders[0]
        save_sharded(partial / SHARDED_DIR, self.net, self.optimizer)
        ema_state = self.sharded_ema.state_dict_on_rank0()
        if self.process.is_main:
            save_file(_contiguous(ema_state), partial / EMA_FILE)
            write_json_durably(partial / CONFIG_FILE, self.config_json())
            finish_checkpoint(self.out_dir, partial, final, {"step": self.step}, keep=self.config.keep)
        if self.process.world_size > 1:
            dist.barrier()  # the checkpoint is complete for every rank when save_checkpoint returns
        return final

    def load_checkpoint(self, directory: str | os.PathLike) -> None:
        """Loads model, optimizer, step and (rank 0) EMA of a checkpoint (a folder, or a run directory's
        newest complete one), after verifying every file's checksum."""
        self._load_checkpoint(*open_checkpoint(directory))

    def _load_checkpoint(self, directory: Path, state: dict) -> None:
        """load_checkpoint for a folder whose files open_checkpoint has verified (state: its state.json)."""
        is_sharded = (directory / SHARDED_DIR).is_dir()
        if is_sharded != self.sharded:
            written = "--dist fsdp" if is_sharded else "--dist ddp"
            raise CheckpointError(
                f"{directory}: written by a {written} run, which this trainer (dist={self.config.dist!r}) "
                f"cannot load: continue it with {written}"
            )
        if self.sharded:
            try:
                load_sharded(directory / SHARDED_DIR, self.net, self.optimizer)
            except (RuntimeError, ValueError, KeyError) as err:
                raise CheckpointError(f"{directory / SHARDED_DIR}: does not fit this model ({err})") from None
            self.sharded_ema.load_full(load_tensors(directory / EMA_FILE, self.device))
            self.step = state["step"]
            self._reset_divergence_watch()
            return
        load_module_weights(self.net, directory / MODEL_FILE, self.device)
        if self.ema is not None:
            load_module_weights(self.ema, directory / EMA_FILE, self.device)
        tensors = load_tensors(directory / OPTIMIZER_FILE, self.device)
        try:
            self.optimizer.load_state_dict(_unflatten_optimizer_state(tensors, state["param_groups"]))
        except (KeyError, ValueError, TypeError) as err:
            raise CheckpointError(
                f"{directory / OPTIMIZER_FILE}: does not fit this model's optimizer ({err})"
            ) from None
        self.step = state["step"]
        self._reset_divergence_watch()

    @classmethod
    def resume(
        cls,
        checkpoint: str | os.PathLike,
        out_dir: str | os.PathLike | None = None,
        *,
        process: ProcessInfo | None = None,
        progress: bool = True,
        allow_world_size_change: bool = False,
        dist_timeout_s: float = DIST_TIMEOUT_S,
        **overrides,
    ) -> Trainer:
        """A trainer continuing a checkpoint (a run directory, whose newest complete checkpoint is taken,
        or a checkpoint folder).

        out_dir: where to write; None continues in the checkpoint's run directory. A directory that
            holds another run is refused (its checkpoints would be rotated away).
        allow_world_size_change: continue on another number of processes than wrote the checkpoint;
            each rank's share of the data and its random draws then differ from the uninterrupted
            run, so the run no longer reproduces it.
        overrides: config fields that may change on resume (RESUMABLE_FIELDS).
        """
        unknown = sorted(set(overrides) - set(RESUMABLE_FIELDS))
        if unknown:
            raise ValueError(f"only {sorted(RESUMABLE_FIELDS)} can change on resume, got {unknown}")
        directory, state = open_checkpoint(checkpoint)
        saved = read_run_json(directory)
        config = dataclasses.replace(load_run_config(directory)[0], **overrides)
        source_run = run_directory_of(directory)
        out_dir = source_run if out_dir is None else Path(out_dir)
        if out_dir.resolve() != source_run.resolve() and holds_run(out_dir):
            other = _run_id_of(out_dir)
            if other is None or other != saved.get("run_id"):
                raise ValueError(
                    f"--out {out_dir} holds another run ({other or 'unknown run id'}); resuming {directory} there "
                    "would mix their logs and replace its checkpoints: resume into an empty directory or the run's own"
                )
        trainer = cls(
            config,
            out_dir,
            process=process,
            overwrite=True,
            progress=progress,
            dist_timeout_s=dist_timeout_s,
            run_id=saved.get("run_id"),
        )
        saved_world = saved.get("world_size", 1)
        if saved_world != trainer.process.world_size and not allow_world_size_change:
            raise ValueError(
                f"{directory} was written by {saved_world} process(es) and this run has {trainer.process.world_size}: "
                "each rank's share of every batch and its random draws would change, so the run would no longer "
                "reproduce an uninterrupted one; pass --allow-world-size-change to continue anyway"
            )
        trainer._load_checkpoint(directory, state)
        if trainer.is_logging and out_dir.resolve() != source_run.resolve():
            _copy_log(source_run / LOG_FILE, out_dir / LOG_FILE, trainer.step)
        return trainer


def _finite_or_null(value):
    """value with every non-finite float (also inside dicts and lists) replaced by None: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


def _throughput_model(backbone: nn.Module, device: torch.device):
    """samples/s -> {"tokens_per_s"} for a DiT, plus {"mfu"} on a GPU whose bf16 peak is known."""
    if not isinstance(backbone, DiT):
        return lambda samples_per_s, world_size: {}
    tokens = (backbone.input_size // backbone.patch_size) ** 2
    flops = imm_training_step_flops(backbone)
    peak = peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None

    def measure(samples_per_s: float, world_size: int) -> dict:
        figures = {"tokens_per_s": samples_per_s * tokens, "train_flops_per_sample": flops}
        if peak:
            figures["mfu"] = mfu(samples_per_s / world_size, flops, peak)
        return figures

    return measure


class TrainingDiverged(RuntimeError):
    """The loss, a gradient or the weights went non-finite (or blew up); the message says when and what to try."""


_DIVERGENCE_HINTS = (
    "Try a lower --lr, a longer --warmup, --grad-clip 1, a --sigma-data that matches the data's scale, or "
    "--on-nan skip to skip non-finite batches."
)


def load_module_weights(module: nn.Module, path: Path, device: torch.device) -> None:
    try:
        module.load_state_dict(load_tensors(path, device))
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise CheckpointError(f"{path}: does not fit the model of this config: {' '.join(lines[1:3])}") from None


def load_tensors(path: Path, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """A safetensors file's tensors; a missing, truncated or corrupt file is a CheckpointError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device=str(device))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def run_directory_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint folder belongs to (OUT for OUT/checkpoints/step_N and OUT/checkpoint)."""
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS_DIR else checkpoint.parent


def _run_id_of(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / CONFIG_FILE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def _log_lines_up_to(path: Path, step: int) -> list[str]:
    """The log's complete lines of steps <= step (a line cut short by a crash is dropped)."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            record_step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(record_step, int) and record_step <= step:
            kept.append(line)
    return kept


def _copy_log(source: Path, target: Path, step: int) -> None:
    """The source run's log lines up to `step`, so that a run resumed elsewhere has its whole history."""
    if not source.is_file() or target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(line + "\n" for line in _log_lines_up_to(source, step)))


def _contiguous(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: value.detach().contiguous() for name, value in state.items()}


def _flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, Tensor], list[dict]]:
    """torch optimizer state → ({"<param index>.<name>": tensor}, JSON-able param_groups)."""
    tensors = {}
    for index, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"optimizer state {index}.{name} is a {type(value).__name__}, not a tensor")
            tensors[f"{index}.{name}"] = value.detach().contiguous()
    return tensors, state_dict["param_groups"]


def _unflatten_optimizer_state(tensors: dict[str, Tensor], param_groups: list[dict]) -> dict:
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": param_groups}


def read_run_json(checkpoint: str | os.PathLike) -> dict:
    """A checkpoint's config.json (a run directory's newest complete checkpoint, or the folder given)."""
    path = find_checkpoint(checkpoint) / CONFIG_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None
    if (
        not isinstance(saved, dict)
        or not isinstance(saved.get("config"), dict)
        or not isinstance(saved.get("data_info"), dict)
    ):
        raise CheckpointError(f"{path}: not a run configuration (no 'config' and 'data_info' objects)")
    return saved


def load_run_config(checkpoint: str | os.PathLike) -> tuple[TrainConfig, DataInfo]:
    """The TrainConfig and DataInfo saved with a checkpoint (a run directory or its checkpoint folder)."""
    directory = find_checkpoint(checkpoint)
    saved = read_run_json(directory)
    info = saved["data_info"]
    try:
        return TrainConfig(**saved["config"]), DataInfo(
            info["name"], info["kind"], tuple(info["shape"]), info["num_classes"]
        )
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{directory / CONFIG_FILE}: invalid run configuration: {err}") from None
