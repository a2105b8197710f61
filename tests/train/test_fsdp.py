"""FSDP2 (`dist="fsdp"`): two gloo processes on the CPU against the same ranks computed serially without
sharding; a sharded checkpoint written by two ranks and loaded by one; the CLI under torchrun.

Every FSDP trainer runs in a spawned process: FSDP needs a process group, and one left in the pytest
process would change what later tests see."""

import dataclasses
import json
import subprocess

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from imm_kernels.train.checkpoints import CheckpointError
from imm_kernels.train.evaluation import load_ema_net
from imm_kernels.train.fsdp import SHARDED_DIR
from imm_kernels.train.trainer import ProcessInfo, TrainConfig, Trainer, build_net, find_checkpoint

from helpers import free_port, torchrun_command

WORLD_SIZE = 2
STEP = 3
TINY_DIT = {"hidden_size": 32, "depth": 2, "num_heads": 2}
CONFIG = TrainConfig(
    data="digits",
    batch=32,
    group_size=4,
    model="dit-s2",
    model_kwargs=TINY_DIT,
    conditional=True,
    label_dropout=0.2,
    seed=5,
    device="cpu",
    dist="fsdp",
    backend="torch",  # the reference ops: what is tested here is the sharding, and Triton's interpreter is slow
)
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _join(rank: int, port: int, world_size: int) -> None:
    torch.set_num_threads(1)  # as in the serial computation, so that every kernel sums in the same order
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)


def _start_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The net's initial weights plus noise: the DiT's zero-initialised output and adaLN layers would
    otherwise leave most gradients zero. The same on every rank and process."""
    net = build_net(trainer.config, trainer.data_info)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in net.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    return net.state_dict()


def _fsdp_step_worker(rank: int, port: int, accum: int, results: dict) -> None:
    _join(rank, port, WORLD_SIZE)
    try:
        trainer = Trainer(dataclasses.replace(CONFIG, accum=accum), None, progress=False)
        assert trainer.process == ProcessInfo(rank, WORLD_SIZE, 0)
        assert trainer.ema is None and trainer.sharded_ema is not None  # sharded on every rank
        start = _start_weights(trainer)
        set_model_state_dict(trainer.net, start, options=StateDictOptions(full_state_dict=True))
        trainer.sharded_ema.load_full(start)
        param = max(trainer.net.parameters(), key=lambda p: p.numel())
        assert param.to_local().numel() < param.numel()  # each rank holds a shard only

        loss, stats = trainer.compute_loss_and_gradients(STEP)
        grads = {name: p.grad.full_tensor() for name, p in trainer.net.named_parameters() if p.requires_grad}
        trainer.step = STEP
        trainer.train_step()
        after = get_model_state_dict(trainer.net, options=_FULL)
        ema = trainer.sharded_ema.state_dict_on_rank0()
        results[rank] = (loss.item(), stats["t"], grads, after, ema)
    finally:
        dist.destroy_process_group()


def _serial_step(accum: int):
    """The two ranks' losses, times and gradients without sharding or a process group, then one
    optimizer step and EMA update on their mean gradients."""
    config = dataclasses.replace(CONFIG, dist="ddp", accum=accum)
    ranks = []
    for rank in range(WORLD_SIZE):
        trainer = Trainer(config, None, process=ProcessInfo(rank, WORLD_SIZE), progress=False)
        trainer.net.load_state_dict(_start_weights(trainer))
        loss, stats = trainer.compute_loss_and_gradients(STEP)
        grads = {name: p.grad.clone() for name, p in trainer.net.named_parameters() if p.requires_grad}
        ranks.append((loss.item(), stats, grads))
    mean = {name: (ranks[0][2][name] + ranks[1][2][name]) / WORLD_SIZE for name in ranks[0][2]}

    stepper = Trainer(config, None, process=ProcessInfo(0, WORLD_SIZE), progress=False)
    start = _start_weights(stepper)
    stepper.net.load_state_dict(start)
    stepper.ema.load_state_dict(start)

    def mean_gradients(step, batch=None):
        for name, param in stepper.net.named_parameters():
            if param.requires_grad:
                param.grad = mean[name].clone()
        return torch.tensor(ranks[0][0]), ranks[0][1]

    stepper.compute_loss_and_gradients = mean_gradients
    stepper.step = STEP
    stepper.train_step()
    return ranks, mean, stepper.net.state_dict(), stepper.ema.state_dict()


@pytest.mark.parametrize("accum", [1, 2])
def test_fsdp_gradients_and_one_step_equal_the_serial_ranks(accum):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_fsdp_step_worker, args=(free_port(), accum, results), nprocs=WORLD_SIZE, join=True)
        fsdp = dict(results)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ranks, mean, after, ema = _serial_step(accum)
    finally:
        torch.set_num_threads(threads)
    for rank in range(WORLD_SIZE):  # each rank's loss is its own batch and draws, computed on gathered weights
        assert fsdp[rank][0] == ranks[rank][0]
        assert torch.equal(fsdp[rank][1], ranks[rank][1]["t"])
    assert not torch.equal(ranks[0][1]["t"], ranks[1][1]["t"])
    # The reduce-scatter sums the ranks' gradients in its own order (and may scale before summing):
    # equal to float32 rounding, not bit for bit.
    for name, expected in mean.items():
        assert expected.abs().sum() > 0, name
        for rank in range(WORLD_SIZE):
            torch.testing.assert_close(fsdp[rank][2][name], expected, rtol=1e-5, atol=1e-7, msg=name)
    for name, expected in after.items():  # the clipped AdamW step, then the EMA
        torch.testing.assert_close(fsdp[0][3][name], expected, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(fsdp[0][4][name], ema[name], rtol=1e-5, atol=1e-6, msg=name)
    start = _start_weights(Trainer(dataclasses.replace(CONFIG, dist="ddp"), None, progress=False))
    assert any(not torch.equal(value, start[name]) for name, value in after.items())  # the step moved the weights


# A sharded checkpoint: written by two ranks, loaded by one.


def _full_state(trainer: Trainer) -> dict:
    """Model, optimizer (flattened to tensors), EMA and step, whole, on rank 0 ({} elsewhere); a collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = get_model_state_dict(trainer.net, options=_FULL)
    optimizer = get_optimizer_state_dict(trainer.net, trainer.optimizer, options=_FULL)
    ema = trainer.sharded_ema.state_dict_on_rank0()
    if dist.get_rank() != 0:
        return {}
    flat = {f"model.{k}": v for k, v in model.items()} | {f"ema.{k}": v for k, v in ema.items()}
    for name, param_state in optimizer["state"].items():
        flat |= {f"optimizer.{name}.{key}": torch.as_tensor(value) for key, value in param_state.items()}
    # Copies: on one rank the state dicts hold the live tensors, which a later step would change (and
    # the Manager passes tensors by shared memory).
    flat = {name: value.clone() for name, value in flat.items()}
    return {"tensors": flat, "step": trainer.step, "lr": [group["lr"] for group in optimizer["param_groups"]]}


def _train_worker(rank: int, port: int, world_size: int, out: str, results: dict) -> None:
    _join(rank, port, world_size)
    try:
        config = dataclasses.replace(CONFIG, steps=3, ckpt_every=3, sample_every=3)
        trainer = Trainer(config, out, progress=False)
        trainer.train()
        results[rank] = _full_state(trainer)
    finally:
        dist.destroy_process_group()


def _resume_worker(rank: int, port: int, world_size: int, out: str, results: dict) -> None:
    _join(rank, port, world_size)
    try:
        trainer = Trainer.resume(out, progress=False, allow_world_size_change=True, steps=5)
        results["loaded"] = _full_state(trainer)
        trainer.train()  # and it trains on
        results["step"] = trainer.step
    finally:
        dist.destroy_process_group()


def test_a_sharded_checkpoint_of_two_ranks_resumes_on_one_bit_identically(tmp_path):
    out = str(tmp_path / "run")
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_train_worker, args=(free_port(), WORLD_SIZE, out, results), nprocs=WORLD_SIZE, join=True)
        saved = results[0]
        checkpoint = find_checkpoint(out)
        files = json.loads((checkpoint / "state.json").read_text())["files"]
        assert {f"{SHARDED_DIR}/__0_0.distcp", f"{SHARDED_DIR}/__1_0.distcp", f"{SHARDED_DIR}/.metadata"} <= set(files)
        assert (tmp_path / "run" / "samples" / "step_000003.png").is_file()  # the gathered EMA's samples

        mp.spawn(_resume_worker, args=(free_port(), 1, out, results), nprocs=1, join=True)
        loaded = results["loaded"]
        assert results["step"] == 5
    assert loaded["step"] == saved["step"] == 3
    assert loaded["lr"] == saved["lr"]
    assert saved["tensors"].keys() == loaded["tensors"].keys()
    assert any(name.startswith("optimizer.") and name.endswith("exp_avg_sq") for name in saved["tensors"])
    for name, value in saved["tensors"].items():
        assert torch.equal(loaded["tensors"][name], value), name

    # eval and sample read the gathered EMA as they read a single process's.
    net, _, _ = load_ema_net(checkpoint)  # the 2-rank checkpoint (the resumed run wrote a newer one)
    for name, value in net.state_dict().items():
        assert torch.equal(value, saved["tensors"][f"ema.{name}"]), name


def test_an_unsharded_checkpoint_is_refused_by_an_fsdp_trainer(tmp_path):
    config = dataclasses.replace(CONFIG, dist="ddp", steps=1)
    Trainer(config, tmp_path / "run", progress=False).train()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_load_worker, args=(free_port(), str(tmp_path / "run"), results), nprocs=1, join=True)
        assert results["error"] == (
            f"{find_checkpoint(tmp_path / 'run')}: written by a --dist ddp run, which this trainer "
            "(dist='fsdp') cannot load: continue it with --dist ddp"
        )


def _load_worker(rank: int, port: int, out: str, results: dict) -> None:
    _join(rank, port, 1)
    try:
        trainer = Trainer(CONFIG, None, progress=False)
        try:
            trainer.load_checkpoint(out)
        except CheckpointError as err:
            results["error"] = str(err)
    finally:
        dist.destroy_process_group()


def test_fsdp_options_are_checked():
    with pytest.raises(ValueError, match="dist must be one of"):
        TrainConfig(dist="zero3")
    with pytest.raises(ValueError, match='fsdp_bf16_params applies to dist="fsdp"'):
        TrainConfig(fsdp_bf16_params=True)
    with pytest.raises(ValueError, match="rank 1 of 2 has none"):
        Trainer(CONFIG, None, process=ProcessInfo(1, 2), progress=False)


def test_torchrun_fsdp_trains_an_mlp_and_a_dit_and_writes_a_sharded_checkpoint(tmp_path):
    for model in ("mlp", "dit"):
        out = tmp_path / model
        data = (
            "--data toy2d --width 16 --depth 1"
            if model == "mlp"
            else f"--data digits --model dit-s2 --model-kwargs {json.dumps(TINY_DIT).replace(' ', '')}"
        )
        command = [
            *torchrun_command(2),
            *f"-m imm_kernels train {data} --steps 2 --batch 32 --device cpu --dist fsdp --accum 2".split(),
            *"--backend torch".split(),
            "--out",
            str(out),
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "2 process(es) on cpu" in result.stdout
        checkpoint = find_checkpoint(out)
        assert (checkpoint / SHARDED_DIR / ".metadata").is_file() and (checkpoint / "ema.safetensors").is_file()
        assert not (checkpoint / "model.safetensors").exists()
