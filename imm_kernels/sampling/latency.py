"""Latency of one sampling call: the eager sampler, torch.compile of its loop, and GraphedSampler.

Shared by `imm-kernels bench-sampling` and benchmarks/bench_sampling.py. A call is the
whole N-step loop for one batch (with guidance when cfg_scale is set), timed on the host
from launch to a synchronised result: what a caller of the sampler waits.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..validation import check_choice
from .graphs import GraphedSampler
from .samplers import one_hot_labels, pushforward, pushforward_loop

__all__ = [
    "PROVIDERS",
    "BENCH_MODELS",
    "PRECISIONS",
    "bench_net",
    "sampling_inputs",
    "sampling_providers",
    "interleaved_medians_ms",
    "kernel_time_ms",
]

PROVIDERS = ("eager", "torch.compile(reduce-overhead)", "GraphedSampler")


def sampling_inputs(net, batch: int, sample_shape: tuple[int, ...], cfg_scale: float | None, seed: int = 0):
    """Prior noise (B, *sample_shape) and class labels (None for an unconditional net) on the net's device."""
    device = next(net.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    noise = (net.sigma_data * torch.randn(batch, *sample_shape, generator=gen)).to(device)
    labels = torch.randint(0, net.label_dim, (batch,), generator=gen).to(device) if net.label_dim else None
    return noise, labels


def sampling_providers(
    net,
    noise: Tensor,
    labels: Tensor | None,
    times: list[float],
    cfg_scale: float | None,
    providers: tuple[str, ...] = PROVIDERS,
) -> dict[str, Callable[[], Tensor]]:
    """One zero-argument sampling call per provider, all on the same inputs and grid.

    The compiled provider is torch.compile(mode="reduce-overhead") of the same loop the
    eager sampler runs (on CUDA it records CUDA graphs of what it compiles).
    """
    net.eval()
    calls: dict[str, Callable[[], Tensor]] = {}
    if "eager" in providers:
        calls["eager"] = lambda: pushforward(net, noise, times, labels, cfg_scale)
    if "torch.compile(reduce-overhead)" in providers:
        pairs = list(zip(times[:-1], times[1:]))
        one_hot = one_hot_labels(net, labels, noise.shape[0], noise.device)

        def loop(x: Tensor, label_rows: Tensor | None) -> Tensor:
            return pushforward_loop(net, x, pairs, label_rows, cfg_scale)

        torch.compiler.reset()  # each grid and batch compiles afresh, not against a recompile limit
        compiled = torch.compile(loop, mode="reduce-overhead")

        def compiled_call() -> Tensor:
            with torch.no_grad():
                return compiled(noise, one_hot)

        calls["torch.compile(reduce-overhead)"] = compiled_call
    if "GraphedSampler" in providers:
        sampler = GraphedSampler(net, noise.shape[0], times, cfg_scale, sample_shape=tuple(noise.shape[1:]))
        calls["GraphedSampler"] = lambda: sampler(noise, labels)
    return calls


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved_medians_ms(calls: dict[str, Callable[[], Tensor]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median wall time per call of each provider, timed round-robin so that drift hits all alike."""
    for fn in calls.values():
        for _ in range(warmup):  # compilation, graph capture, allocator
            fn()
    times: dict[str, list[float]] = {label: [] for label in calls}
    for _ in range(repeats):
        for label, fn in calls.items():
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            times[label].append((time.perf_counter() - start) * 1e3)
    return {label: statistics.median(t) for label, t in times.items()}


def kernel_time_ms(call: Callable[[], Tensor]) -> float:
    """Summed device time (kernels and copies) of one call, from torch.profiler: with the call's
    wall time it gives the fraction of the call during which the GPU was busy."""
    from torch.profiler import ProfilerActivity, profile

    call()
    _sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        _sync()
    device_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.time_range.elapsed_us() for e in device_events) / 1e3


# The models timed by `imm-kernels bench-sampling` and benchmarks/bench_sampling.py.

BENCH_MODELS = ("tiny", "dit-s2", "dit-xl2", "songunet-cifar10")
PRECISIONS = ("fp32", "bf16", "bf16-autocast")
_DIT_CONFIGS = {"dit-s2": "DiT_S_2", "dit-xl2": "DiT_XL_2"}
# The released IMM CIFAR-10 model's SongUNet arguments (lumalabs/imm configs/cifar10_generate_images.yaml).
SONGUNET_CIFAR10 = dict(
    model_channels=128, channel_mult=(2, 2, 2), resample_filter=(1, 1), dropout=0.2, embedding_type="positional"
)


class _CastInput(nn.Module):
    """Runs a low-precision backbone from the Preconditioner's float32 input (weights stored in bf16,
    as a sampling service holds them; autocast would re-cast float32 weights on every call)."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner, self.dtype = inner.to(dtype), dtype

    def forward(self, x: Tensor, c_noise_t: Tensor, c_noise_s: Tensor, class_labels: Tensor | None) -> Tensor:
        return self.inner(x.to(self.dtype), c_noise_t, c_noise_s, class_labels)


def bench_net(model: str, device: torch.device | str, precision: str | None = None, num_classes: int = 1000):
    """(net, sample_shape): a conditional Preconditioner with random weights, in eval mode on device.

    model: "tiny", a small conv backbone on 8×8 images (10 classes), quick on a CPU; "dit-s2" or
    "dit-xl2", DiT-S/2 or DiT-XL/2 on 32×32×4 latents (num_classes classes); "songunet-cifar10",
    the released IMM CIFAR-10 U-Net's configuration (unconditional, 3×32×32 pixels).
    precision: "fp32"; "bf16", weights stored in bf16; "bf16-autocast", float32 weights under
    bf16 autocast (the training setting). None: bf16 for a DiT on CUDA, fp32 otherwise.
    """
    from ..precond import Preconditioner

    check_choice("model", model, BENCH_MODELS)
    device = torch.device(device)
    if precision is None:
        precision = "bf16" if device.type == "cuda" and model != "tiny" else "fp32"
    check_choice("precision", precision, PRECISIONS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if model == "tiny":
            from ..models.small import ConvBackbone

            backbone = ConvBackbone(1, 8, channels=32, num_blocks=2, label_dim=10)
            sample_shape, label_dim = (1, 8, 8), 10
        elif model == "songunet-cifar10":
            from ..models import SongUNet

            backbone = SongUNet(32, 3, **SONGUNET_CIFAR10)
            sample_shape, label_dim = (3, 32, 32), 0
        else:
            from .. import models  # imported only when a DiT is asked for

            backbone = getattr(models, _DIT_CONFIGS[model])(input_size=32, in_channels=4, num_classes=num_classes)
            sample_shape, label_dim = (4, 32, 32), num_classes
        for param in backbone.parameters():  # random weights: the zero-initialised layers too
            param.data.normal_(0, 0.02)
    if precision == "bf16":
        backbone = _CastInput(backbone, torch.bfloat16)
    mixed_precision = "bf16" if precision == "bf16-autocast" else None
    net = Preconditioner(backbone, label_dim=label_dim, mixed_precision=mixed_precision)
    return net.to(device).eval().requires_grad_(False), sample_shape
