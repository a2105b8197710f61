"""`imm-kernels report`: the backends available here, their accuracy against float64, and
forward+backward timings of mmd_loss against the eager reference."""

from __future__ import annotations

import importlib.util

import torch

from ..ops.backends import MMD_AUTO, backends, choose_backend
from ..ops.mmd import mmd_loss
from ..ops.reference import mmd_loss_reference
from ..sampling.latency import interleaved_medians_ms
from .common import fail


def add_parser(commands) -> None:
    parser = commands.add_parser("report", help="backends, accuracy and timings of mmd_loss here")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per provider (median)")
    parser.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="skip the torch.compile provider (its warm-up takes a while on a CPU)",
    )
    parser.set_defaults(run=run)


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


def run(args) -> None:
    if args.repeats < 1:
        fail("report", ValueError(f"--repeats must be >= 1, got {args.repeats}"))
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
    auto_name = choose_backend("auto", x.device, MMD_AUTO, dtype=x.dtype, group_size=group_size).name
    if auto_name != "torch":  # otherwise it is the eager reference again
        providers[f"mmd_loss (auto -> {auto_name})"] = step(mmd_loss)

    print(
        f"\nforward+backward, B={batch} M={group_size} D={num_features} {str(dtype)[6:]} on {name}, "
        f"median of {args.repeats}:"
    )
    medians = interleaved_medians_ms(providers, args.repeats, warmup=1)
    baseline = medians["eager reference"]
    for label, ms in medians.items():
        print(f"  {label:<28} {ms:9.3f} ms   {baseline / ms:5.2f}x vs eager")
    if device.type == "cpu" and auto_name == "torch":
        print(
            "  mmd_loss (auto) runs the eager reference here: the native C++ backend is not built"
            " (see `backends` above)."
        )
