"""GraphedSampler: the whole few-step sampling loop replayed as one CUDA graph.

At batch 1–64 a PyTorch sampler is launch-bound: hundreds of small kernels per
network call, each launched from Python. Here every network call, the guidance
batch and its combination, and the update arithmetic of all N steps are captured
once in a single torch.cuda.CUDAGraph; a call copies the inputs into the graph's
static tensors and replays it. The times, c_noise inputs and guidance scale are
fixed per sampler, so their (B,) tensors are made before the capture and kept with
the graph (it reads them by address: freed, their memory would be handed to other
tensors); restart's fresh noise is drawn outside the graph and copied in like the
prior noise.

Replay runs exactly the kernels the eager sampler runs, on the same values, so
it equals the eager sampler bit for bit (warm-up runs on a side stream before
the capture, so Triton kernels are compiled, and grids sized, by then).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import torch
from torch import Tensor

from ..validation import check_choice
from .samplers import (
    SAMPLERS,
    check_dtype,
    check_guidance,
    check_noise,
    check_restart_noise,
    check_time_steps,
    eval_mode,
    label_dim_of,
    one_hot_labels,
    pushforward,
    pushforward_loop,
    restart,
    restart_coefficients,
    restart_loop,
)

__all__ = ["GraphedSampler"]

WARMUP_RUNS = 2


@dataclass
class _CapturedLoop:
    """One batch size's graph and every tensor made outside it that it reads or writes.

    The graph holds addresses, not references: each tensor it reads lives here as long as it may replay.
    """

    graph: torch.cuda.CUDAGraph
    noise: Tensor
    labels: Tensor | None
    restart_noise: Tensor | None
    step_times: list[tuple[Tensor, Tensor]]
    cfg: Tensor | None
    out: Tensor


def _device_of(net) -> torch.device:
    tensor = next(iter(net.parameters()), None) if hasattr(net, "parameters") else None
    return tensor.device if tensor is not None else torch.device("cpu")


def _batch_sizes(batch_size) -> tuple[int, ...]:
    sizes = (batch_size,) if isinstance(batch_size, Integral) else batch_size
    if (
        isinstance(sizes, Sequence)
        and sizes
        and all(isinstance(b, Integral) and not isinstance(b, bool) and b >= 1 for b in sizes)
    ):
        return tuple(sorted({int(b) for b in sizes}))
    raise ValueError(f"batch_size must be an int >= 1 or a non-empty sequence of them, got {batch_size!r}")


class GraphedSampler:
    """A pushforward or restart sampler for fixed times, guidance scale and batch sizes.

    On CUDA the loop of each batch size is captured as one CUDA graph on its first call
    (or at construction when sample_shape is given); the graphs share one memory pool.
    On a CPU the same calls run the eager sampler.

    Args:
        net: an `imm_kernels.Preconditioner` on the device to sample on. Captured graphs
            read its weights in place: `load_state_dict` into it is seen by later replays,
            new parameter tensors are not. It is captured in eval mode.
        batch_size: the batch size, or a sequence of the batch sizes to serve.
        t_steps: the N + 1 decreasing times (e.g. from `time_grid`).
        cfg_scale: None for no guidance, or the guidance scale w (a number; needs a conditional net).
        dtype: the state's dtype, torch.float32 or torch.float64.
        sampler: "pushforward" or "restart".
        sample_shape: the per-sample shape; given, every batch size is captured now.

    Calls replay serially on the current stream; they are not thread-safe.
    """

    def __init__(
        self,
        net,
        batch_size: int | Sequence[int],
        t_steps,
        cfg_scale: float | None = None,
        dtype: torch.dtype = torch.float32,
        sampler: str = "pushforward",
        *,
        sample_shape: Sequence[int] | None = None,
    ) -> None:
        if not callable(net):
            raise TypeError(f"net must be a Preconditioner (callable module), got {type(net).__name__}")
        self.batch_sizes = _batch_sizes(batch_size)
        self.times = check_time_steps(t_steps)
        self.steps = len(self.times) - 1
        if cfg_scale is not None:
            if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, Real):
                raise TypeError(f"cfg_scale must be None or a number, got {type(cfg_scale).__name__}")
            if label_dim_of(net) == 0:
                raise ValueError("cfg_scale needs a conditional model (label_dim > 0); use cfg_scale=None")
            cfg_scale = float(cfg_scale)
        check_choice("sampler", sampler, SAMPLERS)
        self.net = net
        self.cfg_scale = cfg_scale
        self.dtype = check_dtype(dtype)
        self.sampler = sampler
        self.device = _device_of(net)
        self.graphed = self.device.type == "cuda"
        self._pool = torch.cuda.graph_pool_handle() if self.graphed else None
        self._loops: dict[int, _CapturedLoop] = {}
        self.sample_shape: tuple[int, ...] | None = None
        if sample_shape is not None:
            if not all(isinstance(n, Integral) and n >= 1 for n in sample_shape):
                raise ValueError(f"sample_shape must be a sequence of ints >= 1, got {sample_shape!r}")
            self.sample_shape = tuple(int(n) for n in sample_shape)
            if self.graphed:
                for batch in self.batch_sizes:
                    self._loops[batch] = self._capture(batch)

    def __call__(
        self,
        noise: Tensor,
        class_labels: Tensor | None = None,
        restart_noise: Tensor | Sequence[Tensor] | None = None,
        *,
        generator: torch.Generator | None = None,
        copy: bool = True,
    ) -> Tensor:
        """Samples from noise (B, *feature), B one of batch_sizes.

        class_labels: (B,) class indices or (B, label_dim) one-hot rows (conditional nets).
        restart_noise: restart's (N - 1, B, *feature) standard normal draws; None draws them
            (outside the graph) from `generator` on the net's device.
        copy: False returns the graph's output tensor itself, which the next call of this
            batch size overwrites (no copy; CUDA only).
        """
        check_noise(noise)
        batch = noise.shape[0]
        if batch not in self.batch_sizes:
            raise ValueError(f"noise has batch {batch}, but this sampler serves batch_size {self.batch_sizes}")
        if self.sample_shape is not None and tuple(noise.shape[1:]) != self.sample_shape:
            raise ValueError(f"noise must have shape (B, {self.sample_shape}), got {tuple(noise.shape)}")
        check_guidance(self.net, class_labels, self.cfg_scale)
        if self.sampler == "pushforward" and restart_noise is not None:
            raise ValueError("restart_noise is only used with sampler='restart'")
        if not self.graphed:
            return self._eager(noise, class_labels, restart_noise, generator)

        if self.sample_shape is None:
            self.sample_shape = tuple(noise.shape[1:])
        loop = self._loops.get(batch)
        if loop is None:
            loop = self._loops[batch] = self._capture(batch)
        loop.noise.copy_(noise)
        if loop.labels is not None:  # a conditional net; no labels is the null label
            labels = one_hot_labels(self.net, class_labels, batch, self.device)
            if labels is None:
                loop.labels.zero_()
            else:
                loop.labels.copy_(labels)
        if loop.restart_noise is not None:
            fresh = check_restart_noise(restart_noise, self.steps, loop.noise)
            if fresh is None:
                loop.restart_noise.normal_(generator=generator)
            else:
                loop.restart_noise.copy_(fresh)
        loop.graph.replay()
        return loop.out.clone() if copy else loop.out

    def _eager(self, noise, class_labels, restart_noise, generator) -> Tensor:
        if self.sampler == "pushforward":
            return pushforward(self.net, noise, self.times, class_labels, self.cfg_scale, dtype=self.dtype)
        return restart(
            self.net,
            noise,
            self.times,
            class_labels,
            self.cfg_scale,
            generator,
            restart_noise=restart_noise,
            dtype=self.dtype,
        )

    def _capture(self, batch: int) -> _CapturedLoop:
        """Warm-up on a side stream, then the whole loop captured into one graph from the shared pool."""
        device, net = self.device, self.net
        make = dict(device=device, dtype=self.dtype)
        noise = torch.zeros((batch, *self.sample_shape), **make)
        label_dim = label_dim_of(net)
        labels = torch.zeros(batch, label_dim, device=device) if label_dim else None
        restart_noise = (
            torch.zeros((self.steps - 1, batch, *self.sample_shape), **make) if (self.sampler == "restart") else None
        )

        def per_sample(value: float) -> Tensor:
            return torch.full((batch,), value, dtype=torch.float64, device=device)

        cfg = None if self.cfg_scale is None else per_sample(self.cfg_scale)
        times = self.times
        if self.sampler == "pushforward":
            step_times = [(per_sample(t), per_sample(s)) for t, s in zip(times[:-1], times[1:])]
            renoise = None
        else:
            step_times = [(per_sample(t), per_sample(times[-1])) for t in times[:-1]]
            renoise = restart_coefficients(net, times)

        def run() -> Tensor:
            if renoise is None:
                return pushforward_loop(net, noise, step_times, labels, cfg)
            return restart_loop(net, noise, step_times, renoise, restart_noise, labels, cfg)

        with torch.cuda.device(device), torch.no_grad(), eval_mode(net):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = run()
        return _CapturedLoop(graph, noise, labels, restart_noise, step_times, cfg, out)

    def __repr__(self) -> str:
        mode = "CUDA graph" if self.graphed else "eager (CPU)"
        return (
            f"GraphedSampler({self.sampler}, {self.steps} steps, batch_size={self.batch_sizes}, "
            f"cfg_scale={self.cfg_scale}, {str(self.dtype)[6:]}, {mode})"
        )
