"""DDP: two gloo processes on the CPU against the same two ranks computed serially in one process;
which GPU a rank takes, and the process group's backend, when ranks outnumber the GPUs."""

import datetime
import json
import subprocess

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from imm_kernels.cli.train import EXIT_PEER_LOST, _exit_status
from imm_kernels.train import trainer as trainer_module
from imm_kernels.train.trainer import ProcessInfo, TrainConfig, Trainer, find_checkpoint

from helpers import free_port, torchrun_command

WORLD_SIZE = 2
STEP = 3  # any step: the data slice and the draws are functions of (seed, rank, step)
# On the CPU also where a GPU exists: the serial ranks must repeat the DDP ranks' kernels exactly.
CONFIG = TrainConfig(
    data="digits",
    batch=32,
    group_size=4,
    width=16,
    depth=1,
    dropout=0.1,
    conditional=True,
    label_dropout=0.2,
    seed=5,
    device="cpu",
)


def _gradients(trainer: Trainer) -> tuple[float, torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, the groups' times t, gradients) of one rank's batch at STEP."""
    # The output layer starts at zero, which would leave every other gradient zero: give it weights.
    with torch.no_grad():
        trainer.net.backbone.out.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    loss, stats = trainer.compute_loss_and_gradients(STEP)
    return loss.item(), stats["t"], {name: p.grad.clone() for name, p in trainer.net.named_parameters()}


def _ddp_worker(rank: int, port: int, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.set_num_threads(1)
        trainer = Trainer(CONFIG, None, progress=False)  # joins the initialised group: DDP
        assert isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel)
        assert trainer.process == ProcessInfo(rank, WORLD_SIZE, 0)
        assert (trainer.ema is not None) == (rank == 0)  # the EMA lives on rank 0 only
        results[rank] = _gradients(trainer)
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_equal_the_mean_of_the_ranks_computed_serially():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(free_port(), results), nprocs=WORLD_SIZE, join=True)
        ddp = dict(results)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers, so that every kernel sums in the same order
    try:
        serial = [
            _gradients(Trainer(CONFIG, None, process=ProcessInfo(rank, WORLD_SIZE), progress=False))
            for rank in range(WORLD_SIZE)
        ]
    finally:
        torch.set_num_threads(threads)
    for rank in range(WORLD_SIZE):  # each rank's loss is its own batch and draws, as in the serial run
        assert ddp[rank][0] == serial[rank][0]
        assert torch.equal(ddp[rank][1], serial[rank][1])
    assert not torch.equal(serial[0][1], serial[1][1])  # the ranks draw different times
    for name, serial_grad in serial[0][2].items():
        expected = (serial_grad + serial[1][2][name]) / WORLD_SIZE
        for rank in range(WORLD_SIZE):
            torch.testing.assert_close(ddp[rank][2][name], expected, rtol=1e-5, atol=1e-7, msg=name)
        assert serial_grad.abs().sum() > 0 and not torch.equal(serial_grad, serial[1][2][name]), name


def test_ranks_take_disjoint_whole_group_slices_of_the_global_batch():
    config = TrainConfig(data="toy2d", batch=48, group_size=4, width=8, depth=1)
    single = Trainer(config, None, progress=False)
    ranks = [Trainer(config, None, process=ProcessInfo(rank, 3), progress=False) for rank in range(3)]
    for step in (0, 7, 250):  # 250 crosses an epoch boundary (8000 training points / 48)
        parts = [trainer.batch_indices(step) for trainer in ranks]
        assert all(len(part) == 16 for part in parts)
        assert torch.equal(torch.cat(parts), single.batch_indices(step))
    with pytest.raises(ValueError, match=r"batch=48 must be a multiple of group_size × world size = 4 × 5"):
        Trainer(config, None, process=ProcessInfo(0, 5), progress=False)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")),
    ],
)
def test_torchrun_two_processes_train_and_checkpoint(device, tmp_path):
    """Two ranks under torchrun; on CUDA also with one GPU, both ranks then on cuda:0 over gloo."""
    out = tmp_path / "run"
    command = [
        *torchrun_command(2),
        *"-m imm_kernels train --data toy2d --steps 4 --batch 32 --width 16 --depth 1 --device".split(),
        device,
        "--out",
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"2 process(es) on {'cuda:0' if device == 'cuda' else 'cpu'}" in result.stdout
    if device == "cuda" and torch.cuda.device_count() == 1:
        assert "2 ranks share 1 GPU(s) on this node" in result.stderr
    assert (find_checkpoint(out) / "model.safetensors").is_file()


# Ranks and GPUs, checked on any machine by faking the GPU count.


class _DeviceChosen(Exception):
    """Stops a Trainer at torch.cuda.set_device, before it moves anything to the (fake) GPU."""


@pytest.mark.parametrize("gpus, local_rank, expected", [(1, 0, 0), (1, 1, 0), (2, 1, 1), (4, 5, 1)])
def test_a_rank_takes_its_local_rank_modulo_the_gpu_count(monkeypatch, gpus, local_rank, expected):
    chosen = []

    def set_device(device):
        chosen.append(device)
        raise _DeviceChosen

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    with pytest.raises(_DeviceChosen):
        Trainer(
            TrainConfig(data="toy2d", batch=32, device="cuda"),
            None,
            process=ProcessInfo(local_rank, 2 * gpus, local_rank),
            progress=False,
        )
    assert chosen == [torch.device("cuda", expected)]


@pytest.mark.parametrize(
    "device_type, local_ranks, gpus, backend",
    [
        ("cuda", 2, 2, "nccl"),
        ("cuda", 1, 4, "nccl"),
        ("cuda", 2, 1, "gloo"),
        ("cpu", 2, 2, "gloo"),
    ],
)
def test_the_process_group_is_nccl_only_with_a_gpu_per_rank(
    monkeypatch, recwarn, device_type, local_ranks, gpus, backend
):
    joined = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda name, timeout: joined.append((name, timeout)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2 * local_ranks)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setenv("WORLD_SIZE", str(2 * local_ranks))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_ranks))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert trainer_module._process_from_env(device_type, 42.0) == ProcessInfo(1, 2 * local_ranks, 1)
    assert joined == [(backend, datetime.timedelta(seconds=42))]  # never PyTorch's 30-minute default
    shared = [str(w.message) for w in recwarn if "share" in str(w.message)]
    if device_type == "cuda" and backend == "gloo":
        assert shared == [
            f"{local_ranks} ranks share {gpus} GPU(s) on this node: NCCL needs a GPU per rank, "
            "so the process group uses gloo (slower)"
        ]
    else:
        assert shared == []


# A lost peer, and the restart that continues the run.

_LEAVING_RANK = """
import os
import sys

from imm_kernels.cli import main
from imm_kernels.train import trainer as trainer_module

if os.environ["RANK"] == "1":  # this rank leaves the run after two steps, without a word
    train_step = trainer_module.Trainer.train_step

    def leave_at_step_2(self, *args):
        if self.step == 2:
            os._exit(0)
        return train_step(self, *args)

    trainer_module.Trainer.train_step = leave_at_step_2
main(sys.argv[1:])
"""


def test_a_lost_peer_ends_the_run_with_a_message_and_auto_resume_continues(tmp_path):
    script, out = tmp_path / "leave.py", tmp_path / "run"
    script.write_text(_LEAVING_RANK)
    train = [*"train --data toy2d --batch 32 --width 16 --depth 1 --device cpu --ckpt-every 1".split()]
    train += ["--out", str(out), "--dist-timeout", "20", "--auto-resume"]
    command = torchrun_command(2)
    result = subprocess.run(
        [*command, str(script), *train, "--steps", "50"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    assert "rank 0 lost contact with the other processes" in result.stderr, result.stderr[-3000:]
    assert f"(exitcode: {EXIT_PEER_LOST})" in result.stderr  # the status survives the rank's os._exit
    assert "--auto-resume" in result.stderr
    assert json.loads((find_checkpoint(out) / "state.json").read_text())["step"] == 2  # the last complete one

    # What torchrun --max-restarts repeats: the same command, now continuing the run.
    result = subprocess.run(
        [*command, "-m", "imm_kernels", *train, "--steps", "4"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: step 4" in result.stdout


@pytest.mark.parametrize(("stop", "status", "printed"), [(None, 0, ""), (3, 3, ""), ("no data", 1, "no data\n")])
def test_a_torchrun_rank_exits_with_the_status_and_message_python_would_give(stop, status, printed, capsys):
    assert _exit_status(SystemExit(stop)) == status
    assert capsys.readouterr().err == printed
