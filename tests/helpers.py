"""What several test files share: the device, backend parameters and skips, MMD inputs and
gradients, and running the `imm-kernels` command in-process. (Fixtures and collection hooks
live in conftest.py, which also sets TRITON_INTERPRET before anything imports Triton.)"""

import math
import socket
import sys

import pytest
import torch

import imm_kernels
from imm_kernels import mmd_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------
# MMD backends and inputs
# ----------------------------------------------------------------------------

REASONS = imm_kernels.backends()


def _needs(backend):
    reason = REASONS[backend]
    return pytest.mark.skipif(reason is not None, reason=f"{backend} unavailable: {reason}")


needs_triton, needs_native, needs_cuda = _needs("triton"), _needs("native"), _needs("cuda")


KERNEL_BACKENDS = [
    pytest.param("triton", marks=needs_triton),
    pytest.param("native", marks=needs_native),
    pytest.param("cuda", marks=needs_cuda),
]


ALL_BACKENDS = ["torch", *KERNEL_BACKENDS]


CUDA_MAX_GROUP_SIZE = 8


def skip_beyond_cuda_limit(backend, group_size):
    if backend == "cuda" and group_size > CUDA_MAX_GROUP_SIZE:
        pytest.skip(f"the cuda backend takes group_size <= {CUDA_MAX_GROUP_SIZE}")


def make_inputs(group_size, num_groups, num_features, dtype=torch.float32, device="cpu", seed=0):
    """x ~ N(0, 1), y ~ N(0.3, 0.8^2) and per-group bandwidths that keep k in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    batch = group_size * num_groups
    x = torch.randn(batch, num_features, generator=gen, dtype=torch.float64)
    y = 0.8 * torch.randn(batch, num_features, generator=gen, dtype=torch.float64) + 0.3
    # Typical distance ~ sqrt(2D): bandwidth ~ sqrt(D) puts b*d/D near 1.
    bandwidth = math.sqrt(num_features) * (0.3 + 1.2 * torch.rand(num_groups, generator=gen, dtype=torch.float64))
    weight = 0.5 + torch.rand(num_groups, generator=gen, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (x, y)] + [t.to(device) for t in (bandwidth, weight)]


def rel_err(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def loss_and_grads(x, y, group_size, bandwidth, weight, backend, reduction="mean", **kw):
    """The loss and its gradients in x, y, bandwidth, weight (all four require grad)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, y, bandwidth, weight)]
    loss = mmd_loss(leaves[0], leaves[1], group_size, leaves[2], leaves[3], reduction=reduction, backend=backend, **kw)
    grads = torch.autograd.grad(loss.sum(), leaves)
    return loss.detach(), [g.detach() for g in grads]


# ----------------------------------------------------------------------------
# The imm-kernels command, in this process
# ----------------------------------------------------------------------------


def run_cli(capsys, *argv):
    """Runs `imm-kernels ARGV` in this process; returns what it printed (capsys.readouterr())."""
    from imm_kernels.cli import main

    main(list(argv))
    return capsys.readouterr()


def cli_fails(capsys, *argv) -> str:
    """Runs `imm-kernels ARGV`, which must exit with status 2 (a bad argument); returns its stderr."""
    from imm_kernels.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# ----------------------------------------------------------------------------
# Several processes
# ----------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on this machine now, for a process group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(nproc: int) -> list[str]:
    """The head of a torchrun command line: nproc processes on this machine, rendezvous on a free port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_port",
        str(free_port()),
    ]


# ----------------------------------------------------------------------------
# Models with every weight in play
# ----------------------------------------------------------------------------


def randomise_parameters(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Weights ~ N(0, 1/fan_in), vectors ~ N(0, 0.1²): activations stay O(1) and no layer is zero
    (DiT and the U-Net start with zero or near-zero output layers, which would hide everything)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if not param.requires_grad:
                continue
            std = 1 / math.sqrt(param[0].numel()) if param.dim() >= 2 else 0.1
            param.copy_(torch.randn(param.shape, generator=generator).to(param.device) * std)
    return model


def save_tiny_vae(folder, sample_size: int = 32):
    """A tiny random diffusers AutoencoderKL (4 blocks of 8 channels: the Stable Diffusion VAEs' 8x
    upsampling, 4 latent channels) saved to folder with save_pretrained; needs diffusers."""
    import diffusers

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=sample_size,
    )
    vae.save_pretrained(folder)
    return folder


class TinyInception(torch.nn.Module):
    """A stand-in for the FID Inception with its interface: uint8 (N, 3, H, W) -> (N, 6) float32 features
    (the same weights on every construction; the global RNG is left as it was)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 6, 3)

    def forward(self, images):
        assert images.dtype == torch.uint8 and images.shape[1] == 3, (images.dtype, images.shape)
        x = torch.tanh(self.conv(images.float() / 128 - 1))
        return torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1) + x.amax((2, 3))
