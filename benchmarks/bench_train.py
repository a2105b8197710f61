"""One IMM training step: `pytest benchmarks/bench_train.py --benchmark-only`.

The step of imm_kernels' trainer, without its EMA and gradient clipping: IMMLoss (group size 4,
label dropout 0.1) of Preconditioner(DiT) (the official ImageNet-256 parameterisation: fm,
euler_fm, stride time embedding), forward and backward, then an AdamW step (fused on CUDA). The
backbone runs under bf16 autocast; the target pass in float32 with TF32 matmuls (IMMLoss's
target_fp32 and the trainer's tf32 defaults; IMM_BENCH_TRAIN_TARGET=bf16 runs it under autocast).

GPU: DiT-S/2 at batch 256 and DiT-XL/2 at batch 64 (per GPU), 32×32×4 latents, 1000 classes.
Providers: `eager` (every fused op, the MMD's included, on its PyTorch reference: backend
"torch"), `compiled` (that model with torch.compile of the backbone), `imm_kernels` (backend
"auto": the fused ops) and `imm_kernels[compiled]` (the fused model, backbone compiled). A row's
time is the median step time (triton's do_bench), its peak memory the largest allocation during a
step (torch.cuda.max_memory_allocated: weights, gradients and AdamW state included), and its note
the samples/s and the MFU: samples/s · model FLOPs per sample / the GPU's dense bf16 peak. Model
FLOPs per sample: `imm_kernels.models.flops.imm_training_step_flops`, 4 DiT forwards (3 for the
student pass with its backward, 1 for the target); the peak: `PEAK_BF16_FLOPS` by device name,
or IMM_BENCH_PEAK_FLOPS (FLOP/s). The float32 target pass runs on TF32 tensor cores, whose peak
is half the bf16 one: with target_fp32 the MFU against the bf16 peak cannot reach 100%.

CPU: a smoke run of the same step on a tiny DiT (see CPU_CASE), eager providers only (the first
compiled step builds C++ for about 40 s on a 2-core CPU). Benchmarks run without Triton's
interpreter, so there `auto` means the native MMD kernel and the adaLN references. It checks that
the step runs; it claims no speed.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import pytest
import torch

from imm_kernels import IMMLoss, Preconditioner
from imm_kernels.models import DiT, DiT_models
from imm_kernels.models.flops import imm_training_step_flops, mfu, peak_bf16_flops

from timing import CUDA_ROUNDS, ON_CUDA, device_time_ms

DEVICE = "cuda" if ON_CUDA else "cpu"
GROUP_SIZE = 4
LABEL_DROPOUT = 0.1
TARGET_FP32 = os.environ.get("IMM_BENCH_TRAIN_TARGET", "fp32") != "bf16"
PROVIDERS = ("eager", "compiled", "imm_kernels", "imm_kernels[compiled]")
REFERENCE_PROVIDERS = ("eager", "compiled")
COMPILED_PROVIDERS = ("compiled", "imm_kernels[compiled]")
# do_bench's default 200 ms would time one or two DiT-XL/2 steps; 2 s times about ten.
CUDA_WARMUP_MS, CUDA_REP_MS = 500, 2000


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    latent: tuple[int, int, int]  # (C, S, S)
    num_classes: int
    dit_kwargs: dict | None = None  # None: DiT_models[name]; else DiT's own arguments

    def build_dit(self, backend: str) -> DiT:
        channels, size, _ = self.latent
        common = dict(input_size=size, in_channels=channels, num_classes=self.num_classes, backend=backend)
        if self.dit_kwargs is None:
            return DiT_models[self.name](**common)
        return DiT(**self.dit_kwargs, **common)

    def flops_per_sample(self) -> int:
        """Model FLOPs of one training step per sample, counted on a meta-device model (no memory)."""
        with torch.device("meta"):
            return imm_training_step_flops(self.build_dit("torch"))

    @property
    def label(self) -> str:
        return f"{self.name} B={self.batch} {'x'.join(map(str, self.latent))} M={GROUP_SIZE}"


GPU_CASES = (Case("DiT-S/2", 256, (4, 32, 32), 1000), Case("DiT-XL/2", 64, (4, 32, 32), 1000))
CPU_CASE = Case("tiny-DiT", 16, (4, 16, 16), 10, dict(patch_size=2, hidden_size=64, depth=2, num_heads=4))
# Every case is collected on every machine (the other machine's skip), so that a `-k` selection
# (benchmarks/run_gpu.sh's chunks) names the same benchmarks on a CPU and on a GPU.
CASES = (*GPU_CASES, CPU_CASE)


@pytest.fixture
def tf32_matmuls(monkeypatch):
    """The trainer's default (tf32=True): float32 matmuls and convolutions on TF32 tensor cores."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)


def free_device_memory() -> None:
    torch.compiler.reset()  # compiled code holds on to its model; the next model gets a fresh cache
    gc.collect()
    if ON_CUDA:
        torch.cuda.empty_cache()


def make_step(case: Case, provider: str):
    """A closure running one training step; it holds its model, loss, optimizer and batch."""
    backend = "torch" if provider in REFERENCE_PROVIDERS else "auto"
    torch.manual_seed(0)
    with torch.device(DEVICE):
        dit = case.build_dit(backend)
    with torch.no_grad():  # DiT's zero init would make every output (and most gradients) 0
        for param in dit.parameters():
            if param.requires_grad:
                param.normal_(0, 0.02)
    net = Preconditioner(dit, time_embed="stride", label_dim=case.num_classes, mixed_precision="bf16")
    if provider in COMPILED_PROVIDERS:
        net.backbone = torch.compile(dit, dynamic=False)
    loss_fn = IMMLoss(net, GROUP_SIZE, label_dropout=LABEL_DROPOUT, target_fp32=TARGET_FP32, backend=backend)
    optimizer = torch.optim.AdamW(dit.parameters(), lr=1e-4, fused=True if ON_CUDA else None)
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(case.batch, *case.latent, device=DEVICE, generator=generator) * 0.5
    labels = torch.randint(case.num_classes, (case.batch,), device=DEVICE, generator=generator)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss, _ = loss_fn(x, labels)
        loss.backward()
        optimizer.step()

    return step


def step_time_ms(benchmark, step) -> float:
    if not ON_CUDA:
        return device_time_ms(benchmark, step)
    import triton.testing

    benchmark.pedantic(lambda: (step(), torch.cuda.synchronize()), rounds=CUDA_ROUNDS)
    return triton.testing.do_bench(step, warmup=CUDA_WARMUP_MS, rep=CUDA_REP_MS, return_mode="median")


def step_peak_memory_mib(step) -> float | None:
    """torch.cuda.max_memory_allocated during one step, everything allocated counted."""
    if not ON_CUDA:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def device_peak() -> tuple[str, float] | None:
    """(name, dense bf16 FLOP/s) of this device: IMM_BENCH_PEAK_FLOPS, else PEAK_BF16_FLOPS by name."""
    if os.environ.get("IMM_BENCH_PEAK_FLOPS"):
        return "IMM_BENCH_PEAK_FLOPS", float(os.environ["IMM_BENCH_PEAK_FLOPS"])
    return peak_bf16_flops(torch.cuda.get_device_name()) if ON_CUDA else None


def throughput_note(samples_per_s: float, flops_per_sample: int) -> tuple[str, float | None, float | None]:
    """(note, MFU, peak FLOP/s): samples/s, and the MFU where the device's peak is known."""
    achieved_tflops = samples_per_s * flops_per_sample / 1e12
    note = f"{samples_per_s:.5g} samples/s, {achieved_tflops:.4g} TFLOP/s"
    peak = device_peak()
    if peak is None:
        reason = "CPU smoke run" if not ON_CUDA else "unknown GPU: set IMM_BENCH_PEAK_FLOPS"
        return f"{note}, MFU n/a ({reason})", None, None
    name, peak_flops = peak
    utilisation = mfu(samples_per_s, flops_per_sample, peak_flops)
    return f"{note}, MFU {100 * utilisation:.1f}% of {name} {peak_flops / 1e12:.0f} TFLOP/s", utilisation, peak_flops


@pytest.mark.usefixtures("tf32_matmuls")
@pytest.mark.parametrize(
    "case,provider",
    [
        pytest.param(case, provider, id=f"{case.name}-B{case.batch}-train-{provider}")
        for case in CASES
        for provider in PROVIDERS
    ],
)
def test_train_step(benchmark, record_result, case, provider):
    if not benchmark.enabled:
        pytest.skip("pytest-benchmark is disabled")
    if (case is CPU_CASE) == ON_CUDA:
        pytest.skip("the CPU smoke case" if ON_CUDA else "a GPU case (a CPU runs the tiny DiT)")
    if provider in COMPILED_PROVIDERS and not ON_CUDA:
        pytest.skip("CPU smoke run, eager only: torch.compile's C++ build (~40 s here) would dominate it")
    flops_per_sample = case.flops_per_sample()
    info = benchmark.extra_info
    info.update(
        op="train_step",
        shape_label="model B= latent M=",
        floor_note="no byte floor (compute-bound step)",
        provider=provider,
        backend="torch" if provider in REFERENCE_PROVIDERS else "auto",
        shape=case.label,
        dtype="bf16 autocast" + (", fp32 target" if TARGET_FP32 else ""),
        mode="train step",
        gbps=None,
        pct_copy_bw=None,
        flops_per_sample=flops_per_sample,
    )
    benchmark.group = f"{case.label} train step"
    free_device_memory()
    step = None
    try:
        step = make_step(case, provider)
        step()  # compilation, autotuning, the AdamW state
        if ON_CUDA:
            torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError as err:
        del step
        free_device_memory()
        status = f"OOM: {str(err).splitlines()[0]}"
        info.update(status=status, device_ms=None, peak_mem_mib=None)
        record_result(dict(info))
        pytest.skip(status)
    peak_mib = step_peak_memory_mib(step)
    ms = step_time_ms(benchmark, step)
    samples_per_s = case.batch / (ms * 1e-3)
    note, utilisation, peak_flops = throughput_note(samples_per_s, flops_per_sample)
    info.update(
        status="ok",
        device_ms=ms,
        peak_mem_mib=peak_mib,
        peak_mem_note=note,
        samples_per_s=samples_per_s,
        mfu=utilisation,
        peak_flops=peak_flops,
    )
    record_result(dict(info))
    del step
    free_device_memory()
