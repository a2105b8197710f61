"""The IMM DiT on the fused ops against itself on the references: `pytest benchmarks/ --benchmark-only`.

DiT-B/2 and DiT-XL/2 on 32×32×4 latents (ImageNet-256 in SD-VAE space), 1000 classes, at
batch 1 (sampling latency) and 64, under bf16 autocast, in two modes:
- `inference`: one forward under torch.no_grad (one step of a sampler);
- `training`: forward and backward to every parameter gradient.

Providers: `eager` (DiT(fused=False): every adaLN and the timestep embedding on their PyTorch
references), `compiled` (torch.compile of that model), `imm_kernels` (the fused ops),
`imm_kernels[batched]` (fused ops plus all adaLN modulations in one matmul) and
`imm_kernels[compiled]` (torch.compile of the fused model; the ops are custom ops). Rows record the
median device time (triton's do_bench) and the peak memory of one call above what was
allocated before it; GB/s is left empty (a whole model has no byte floor).
GPU only: on a CPU the Triton kernels would run in the interpreter, which is not timed.
"""

from __future__ import annotations

import gc
import itertools

import pytest
import torch

from imm_kernels.models import DiT_models

from timing import ON_CUDA, cuda_peak_memory_mib, device_time_ms

pytestmark = pytest.mark.skipif(
    not ON_CUDA, reason="DiT benchmarks need a CUDA GPU (Triton's CPU interpreter is not timed)"
)

CONFIGS = ("DiT-B/2", "DiT-XL/2")
BATCHES = (1, 64)
MODES = ("inference", "training")
PROVIDERS = ("eager", "compiled", "imm_kernels", "imm_kernels[batched]", "imm_kernels[compiled]")
REFERENCE_PROVIDERS = ("eager", "compiled")
COMPILED_PROVIDERS = ("compiled", "imm_kernels[compiled]")
LATENT = (4, 32, 32)
NUM_CLASSES = 1000

_models: dict[str, torch.nn.Module] = {}
_compiled: dict[tuple, object] = {}


def model_for(config: str):
    """One model per config, kept for all its cases, its adaLN weights packed (batched_modulation
    is switched per provider). Weights ~ normal(0.02): DiT's zero init would make every output 0."""
    if config not in _models:
        _models.clear()
        _compiled.clear()
        torch.compiler.reset()
        gc.collect()
        torch.cuda.empty_cache()
        torch.manual_seed(0)
        model = DiT_models[config](
            input_size=LATENT[1], in_channels=LATENT[0], num_classes=NUM_CLASSES, batched_modulation=True
        ).cuda()
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.normal_(0, 0.02)
        _models[config] = model
    return _models[config]


def make_inputs(batch: int):
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, *LATENT, device="cuda", generator=generator)
    t = torch.rand(batch, device="cuda", generator=generator) * 1000
    s = torch.rand(batch, device="cuda", generator=generator) * t
    labels = torch.nn.functional.one_hot(torch.arange(batch, device="cuda") % NUM_CLASSES, NUM_CLASSES).float()
    return x, t, s, labels


def make_step(config: str, provider: str, batch: int, mode: str):
    model = model_for(config)
    model.backend = "torch" if provider in REFERENCE_PROVIDERS else "auto"
    model.batched_modulation = provider == "imm_kernels[batched]"
    net = model
    if provider in COMPILED_PROVIDERS:
        key = (config, batch, mode, provider)
        if key not in _compiled:
            torch.compiler.reset()
            _compiled.clear()
            _compiled[key] = torch.compile(model, dynamic=False)
        net = _compiled[key]
    x, t, s, labels = make_inputs(batch)
    params = [p for p in model.parameters() if p.requires_grad]

    def inference():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return net(x, t, s, labels)

    def training():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = net(x, t, s, labels)
        # autograd.grad returns the gradients instead of accumulating them: no zeroing, no extra add.
        return torch.autograd.grad(out.float().square().mean(), params)

    return inference if mode == "inference" else training


@pytest.mark.parametrize(
    "config,batch,mode,provider",
    [
        pytest.param(config, batch, mode, provider, id=f"{config}-B{batch}-{mode}-{provider}")
        for config, batch, mode, provider in itertools.product(CONFIGS, BATCHES, MODES, PROVIDERS)
    ],
)
def test_dit(benchmark, record_result, config, batch, mode, provider):
    if not benchmark.enabled:
        pytest.skip("pytest-benchmark is disabled")
    info = benchmark.extra_info
    shape = f"{config} B={batch} {'x'.join(map(str, LATENT))}"
    info.update(
        op="dit",
        shape_label="model B= latent",
        floor_note="no byte floor (compute-bound model)",
        provider=provider,
        backend="torch" if provider in REFERENCE_PROVIDERS else "auto",
        shape=shape,
        dtype="bf16 autocast",
        mode=mode,
        gbps=None,
        pct_copy_bw=None,
    )
    benchmark.group = f"{shape} {mode}"
    step = make_step(config, provider, batch, mode)
    try:
        step()  # compilation, autotuning
        torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError as err:
        del step
        gc.collect()
        torch.cuda.empty_cache()
        status = f"OOM: {str(err).splitlines()[0]}"
        info.update(status=status, device_ms=None, peak_mem_mib=None)
        record_result(dict(info))
        pytest.skip(status)
    peak_mib = cuda_peak_memory_mib(step)
    ms = device_time_ms(benchmark, step)
    info.update(status="ok", device_ms=ms, peak_mem_mib=peak_mib)
    record_result(dict(info))
