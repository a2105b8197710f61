"""FSDP2 for the trainer (`--dist fsdp`): sharding the model, its sharded EMA, and sharded checkpoints.

Everything here is PyTorch's own machinery: `fully_shard` (FSDP2) shards the parameters
over the ranks, `torch.distributed.checkpoint` (DCP) writes and reads the shards.

What is sharded. `fully_shard` wraps each DiT block (its `forward_chained`, which the DiT
calls, is registered as an FSDP forward method) and, as units of their own, each block's adaLN
modulation (the DiT computes every block's modulation from the conditioning before the first
block runs); each SongUNet UNetBlock; the Preconditioner around the backbone, with the
embedders and the final layer, is the root unit. Small backbones (mlp, conv) are one root unit.

Precision. The parameters are float32 and the gradients are reduce-scattered in float32;
the forward computes in bf16 through the Preconditioner's autocast where mixed precision is
on, exactly as the DDP path does, and IMM's target pass still runs in float32. With
`bf16_params=True` the blocks' parameters are all-gathered in bf16 (FSDP's
MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): half the all-gather traffic), and
then the target pass runs with bf16 weights too.

The EMA. Kept sharded like the weights (each rank averages its own shards: no communication
per step) and gathered onto rank 0 in full for samples and checkpoints, where it is written as
the same `ema.safetensors` a single-process run writes, so eval and sample read it unchanged.

Checkpoints. Model and optimizer go through DCP into the checkpoint's `sharded/` folder (one
file per rank and a `.metadata`); DCP reshards on load, so a run continues on another number
of ranks. The ranks must share the file system the checkpoints are on.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn

try:  # torch >= 2.6 exports FSDP2 publicly; earlier releases keep it under _composable
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
except ImportError:  # pragma: no cover - torch < 2.6
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from ..models import DiT, SongUNet
from ..models.unet import UNetBlock
from ..precond import Preconditioner

__all__ = [
    "SHARDED_DIR",
    "join_single_process_group",
    "shard_model",
    "no_gradient_sync",
    "local",
    "full",
    "ShardedEMA",
    "save_sharded",
    "load_sharded",
]

SHARDED_DIR = "sharded"  # the DCP folder inside a checkpoint


def join_single_process_group(backend: str) -> None:
    """A one-rank default process group (FSDP needs one) for a run started without torchrun."""
    if dist.is_initialized():
        return
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def _sharding_units(backbone: nn.Module) -> list[tuple[nn.Module, str | None]]:
    """(submodule, method) pairs that get their own fully_shard unit, inner units first; method names a
    forward method other than `forward` that the model calls (see the module docstring)."""
    if isinstance(backbone, DiT):
        if backbone.batched_modulation:
            raise ValueError(
                "--dist fsdp needs batched_modulation=False: the batched adaLN matmul reads every block's "
                "modulation weights in one packed storage, which sharding replaces"
            )
        modulations = [(block.adaLN_modulation, None) for block in backbone.blocks]
        return modulations + [(block, "forward_chained") for block in backbone.blocks]
    if isinstance(backbone, SongUNet):
        return [(module, None) for module in backbone.modules() if isinstance(module, UNetBlock)]
    return []


def shard_model(net: Preconditioner, device: torch.device, *, bf16_params: bool = False) -> Preconditioner:
    """fully_shard the net in place over the default process group's ranks; returns it.

    net must be on `device` (its parameters are sharded where they are).
    """
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16_params
        else MixedPrecisionPolicy(reduce_dtype=torch.float32)
    )
    for unit, method in _sharding_units(net.backbone):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
        if method is not None:
            register_fsdp_forward_method(unit, method)
    # The root keeps float32 parameters whatever the policy: its forward takes the times t, s, r,
    # which bf16 would round (IMM's targets depend on small differences between them).
    fully_shard(net, mesh=mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))
    return net


@contextlib.contextmanager
def no_gradient_sync(net: nn.Module):
    """Gradient accumulation's micro-steps: no reduce-scatter until the context exits."""
    net.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        net.set_requires_gradient_sync(True)


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a sharded (DTensor) tensor; any other tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full(tensor: Tensor) -> Tensor:
    """The whole of a DTensor (a collective: every rank calls it), any other tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


_FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


class ShardedEMA:
    """The EMA of a sharded net's weights, sharded the same way.

    make_net() builds an unsharded net of the same architecture (on the training device): it
    becomes the sharded EMA here (`module`, whose shards the trainer averages the net's shards
    into), and the full copy that `gather` fills on rank 0.
    """

    def __init__(self, net: Preconditioner, make_net, device: torch.device) -> None:
        self._make_net = make_net
        self.module = shard_model(make_net().to(device), device)
        self.module.eval().requires_grad_(False)
        with torch.no_grad():
            for ema_param, param in zip(self.module.parameters(), net.parameters()):
                local(ema_param).copy_(local(param))
            for ema_buffer, buffer in zip(self.module.buffers(), net.buffers()):
                ema_buffer.copy_(buffer)

    def state_dict_on_rank0(self) -> dict[str, Tensor]:
        """The full EMA state dict on the CPU of rank 0 ({} on the others); a collective."""
        return get_model_state_dict(self.module, options=_FULL_ON_RANK0)

    def gather(self) -> Preconditioner | None:
        """An unsharded float32 copy of the EMA on rank 0, in eval mode (None on the others); a collective."""
        state = self.state_dict_on_rank0()
        if dist.get_rank() != 0:
            return None
        copy = self._make_net()
        copy.load_state_dict(state)
        return copy.to(_device_of(self.module)).eval().requires_grad_(False)

    def load_full(self, state: dict[str, Tensor]) -> None:
        """Loads a full EMA state dict (every rank passes the whole of it) into the shards."""
        set_model_state_dict(self.module, state, options=StateDictOptions(full_state_dict=True))


def _device_of(module: nn.Module) -> torch.device:
    return local(next(module.parameters())).device


def save_sharded(folder: Path, net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model and optimizer state through DCP into `folder` (every rank writes its shards; a collective)."""
    model_state, optimizer_state = get_state_dict(net, optimizer)
    with warnings.catch_warnings():  # DCP warns about its own experimental corners on every call
        warnings.simplefilter("ignore", FutureWarning)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)


def load_sharded(folder: Path, net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Loads save_sharded's folder into this run's shards, whatever the number of ranks that wrote it."""
    model_state, optimizer_state = get_state_dict(net, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        dcp.load(state, checkpoint_id=folder)
    set_state_dict(net, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
