"""Fault injection: a save killed at every filesystem step, NaN at step k, corrupted checkpoint files,
runs mixed up on resume. Every case must end in a clear error or correct behaviour, and no path may
lose a complete checkpoint.

A "kill" is a forked child that calls os._exit at the chosen filesystem operation of a checkpoint
save (before it, after it, or, for file writes, with the file cut in half): nothing after that point
runs, as when the process is killed. The parent then looks at what is on disk.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import traceback

import pytest
import torch

from imm_kernels.train import checkpoints as checkpoints_module
from imm_kernels.train import trainer as trainer_module
from imm_kernels.train.checkpoints import CheckpointError, complete_checkpoints, find_checkpoint, verify_checkpoint
from imm_kernels.train.evaluation import load_ema_net
from imm_kernels.train.trainer import TrainConfig, Trainer, TrainingDiverged

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(data="8gaussians", batch=16, group_size=4, width=8, depth=1, log_every=1, device="cpu")
CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "config.json", "state.json")


def trained_run(path, steps=2, **options):
    trainer = Trainer(
        TrainConfig(steps=steps, ckpt_every=2, sample_every=0, **{**TINY, **options}), path, progress=False
    )
    trainer.train()
    return trainer


def log_records(run):
    """Every line of the run's log, parsed as strict JSON (a bare NaN or a torn line fails)."""
    lines = (run / "log.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in log.jsonl")) for line in lines]


# ---------------------------------------------------------------------------
# A checkpoint save killed at every filesystem step
# ---------------------------------------------------------------------------


class _Kill(Exception):
    pass


def _patched_operations(monkeypatch, on_operation):
    """Routes every filesystem step of a save through on_operation(name, run) (which runs the step)."""
    import safetensors.torch

    def wrap(owner, name, label):
        original = getattr(owner, name)

        def step(*args, **kwargs):
            return on_operation(label, lambda: original(*args, **kwargs), args)

        monkeypatch.setattr(owner, name, step)

    wrap(safetensors.torch, "save_file", "save_file")
    wrap(checkpoints_module, "write_json_durably", "write_json")
    wrap(trainer_module, "write_json_durably", "write_json")
    wrap(checkpoints_module, "_fsync_file", "fsync_file")
    wrap(checkpoints_module, "_fsync_dir", "fsync_dir")
    wrap(checkpoints_module.os, "rename", "rename")
    wrap(checkpoints_module.os, "replace", "replace")
    wrap(checkpoints_module.shutil, "rmtree", "rmtree")


def _count_save_operations(tmp_path, monkeypatch) -> list[str]:
    run = tmp_path / "count"
    trainer = trained_run(run, keep=1)
    names: list[str] = []

    def record(label, operation, args):
        names.append(label)
        return operation()

    with monkeypatch.context() as patch:
        _patched_operations(patch, record)
        trainer.config = dataclasses.replace(trainer.config, steps=4)
        trainer.train()
    return names


def _killed_save(run, index: int, mode: str) -> None:
    """Child: continue the run from step 2 to 4, dying at filesystem step `index` of the step-4 save."""
    torch.set_num_threads(1)
    trainer = Trainer.resume(run, steps=4, progress=False)
    counter = {"n": 0}

    def maybe_die(label, operation, args):
        index_now = counter["n"]
        counter["n"] += 1
        if index_now != index:
            return operation()
        if mode == "before":
            os._exit(17)
        result = operation()
        if mode == "torn" and label in ("save_file", "write_json"):
            target = args[1] if label == "save_file" else args[0]
            size = os.path.getsize(target)
            with open(target, "r+b") as file:
                file.truncate(size // 2)
        os._exit(17)
        return result

    monkeypatch = pytest.MonkeyPatch()
    _patched_operations(monkeypatch, maybe_die)
    trainer.train()
    os._exit(0)  # the save finished (index beyond its last step)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a child per kill point")
def test_a_save_killed_at_any_filesystem_step_loses_no_checkpoint(tmp_path, monkeypatch):
    operations = _count_save_operations(tmp_path, monkeypatch)
    # model, EMA, optimizer; the run's config.json (at the start), the checkpoint's config.json and state.json;
    # the folder's rename, the pointer's replace, the old checkpoint's removal
    counts = [operations.count(name) for name in ("save_file", "write_json", "rename", "replace", "rmtree")]
    assert counts == [3, 3, 1, 1, 1]
    cases = [(index, mode) for index in range(len(operations)) for mode in ("before", "after")]
    cases += [(i, "torn") for i, name in enumerate(operations) if name in ("save_file", "write_json")]
    context = multiprocessing.get_context("fork")
    outcomes = {}
    for index, mode in cases:
        run = tmp_path / f"kill-{index}-{mode}"
        trained_run(run, keep=1)  # keep=1: rotation deletes the old checkpoint once the new one is complete
        child = context.Process(target=_killed_save, args=(run, index, mode))
        child.start()
        child.join(120)
        assert child.exitcode == 17, (index, mode, child.exitcode)

        found = find_checkpoint(run)  # the newest complete checkpoint, whatever the crash left
        state = verify_checkpoint(found)
        assert state["step"] in (2, 4), (index, mode)
        assert complete_checkpoints(run), (index, mode)
        net, _, _ = load_ema_net(run)
        assert all(torch.isfinite(p).all() for p in net.parameters())
        resumed = Trainer.resume(run, steps=6, progress=False)
        assert resumed.step == state["step"]
        resumed.train()
        assert verify_checkpoint(find_checkpoint(run))["step"] == 6
        outcomes[(index, mode)] = state["step"]
    # The kill points before the final rename leave step 2; the ones from the rename on, step 4.
    assert set(outcomes.values()) == {2, 4}


# ---------------------------------------------------------------------------
# NaN at step k: stop (no host sync per step) or skip
# ---------------------------------------------------------------------------


def _nan_at(trainer, bad_steps):
    """Makes the loss of the given 1-based steps NaN (a bad batch), leaving the rest untouched."""
    compute = trainer.compute_loss_and_gradients

    def poisoned(step, batch=None):
        loss, stats = compute(step, batch)
        if step + 1 in bad_steps:
            for param in trainer.net.parameters():
                if param.grad is not None:
                    param.grad.fill_(math.nan)
            loss = torch.full_like(loss, math.nan)
        return loss, stats

    trainer.compute_loss_and_gradients = poisoned


def test_nan_at_step_k_stops_the_run_and_keeps_finite_checkpoints(tmp_path):
    config = TrainConfig(steps=12, ckpt_every=4, sample_every=0, **{**TINY, "log_every": 5})
    trainer = Trainer(config, tmp_path, progress=False)
    _nan_at(trainer, {7})
    with pytest.raises(TrainingDiverged, match=r"diverged at step 7: .*last finite loss [\d.]+ at step 6"):
        trainer.train()
    assert trainer.step == 8  # found where the host waits anyway (step 8's checkpoint), not by a sync at step 7
    assert verify_checkpoint(find_checkpoint(tmp_path))["step"] == 4  # step 8's save never happened
    records = log_records(tmp_path)
    assert records[-1]["event"] == "diverged" and "step 7" in records[-1]["message"]
    assert "newest checkpoint" in records[-1]["message"]


def test_stop_mode_reads_nothing_from_the_device_between_log_lines(monkeypatch):
    """The trainer's own code reads no tensor value in a step (the divergence flags stay on the device).

    Reads elsewhere in a CPU step are host-side by construction (AdamW's CPU step counters, eta of
    Python-float times, the native backend's host-side check); the GPU test below runs a whole CUDA
    step with PyTorch's sync check set to error.
    """
    config = TrainConfig(steps=6, ckpt_every=0, sample_every=0, **{**TINY, "log_every": 100})
    trainer = Trainer(config, None, progress=False)
    trainer.train_step()  # warm-up outside the watch
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def watched(self, *args, _original=original, _name=name, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            if caller.filename.endswith(os.path.join("train", "trainer.py")):
                reads.append(f"{_name} at trainer.py:{caller.lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, watched)
    for _ in range(3):
        trainer.train_step()
    monkeypatch.undo()
    assert reads == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_step_never_syncs():
    config = TrainConfig(steps=6, ckpt_every=0, sample_every=0, **{**TINY, "device": "cuda", "log_every": 100})
    trainer = Trainer(config, None, progress=False)
    trainer.train_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    trainer.check_divergence()


def test_skip_mode_skips_a_bad_batch_and_stops_when_nothing_is_finite(tmp_path):
    config = TrainConfig(steps=8, ckpt_every=4, sample_every=0, on_nan="skip", **TINY)
    skipping = Trainer(config, tmp_path / "skip", progress=False)
    _nan_at(skipping, {3})
    summary = skipping.train()
    assert summary["skipped_steps"] == 1 and skipping.step == 8 and math.isfinite(summary["loss"])
    skipped = [r for r in log_records(tmp_path / "skip") if r.get("event") == "skipped"]
    assert [r["step"] for r in skipped] == [3] and skipped[0]["loss"] is None
    assert all(torch.isfinite(p).all() for p in skipping.net.parameters())

    hopeless = Trainer(dataclasses.replace(config, steps=40), tmp_path / "hopeless", progress=False)
    _nan_at(hopeless, set(range(1, 41)))
    with pytest.raises(TrainingDiverged, match=r"25 batches in a row .*\(steps 1 to 25\).*step_0000024, is kept"):
        hopeless.train()  # (its checkpoints hold the finite, never updated weights)


def test_a_checkpoint_is_never_written_from_non_finite_weights(tmp_path):
    trainer = trained_run(tmp_path)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with torch.no_grad():
        next(trainer.net.parameters()).view(-1)[0] = math.inf
    with pytest.raises(TrainingDiverged, match="model weights hold non-finite values at step 2; no checkpoint"):
        trainer.save_checkpoint()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_blown_up_weights_stop_the_run(tmp_path):
    """Finite weights near 1e30 once left the loss flat and the run going (a huge learning rate)."""
    trainer = Trainer(TrainConfig(steps=4, sample_every=0, **TINY), tmp_path, progress=False)
    trainer.check_divergence()
    with torch.no_grad():
        for param in trainer.net.parameters():
            param.fill_(2e6)
    with pytest.raises(TrainingDiverged, match=r"weights' root mean square is 2e\+06 \(> 1e\+06\), though the loss"):
        trainer.check_divergence()


# ---------------------------------------------------------------------------
# Corrupted checkpoint files
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_corrupted_files_are_found_and_the_previous_checkpoint_is_used(tmp_path, name):
    trained_run(tmp_path, steps=4)  # checkpoints at steps 2 and 4
    newest = find_checkpoint(tmp_path)
    data = bytearray((newest / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newest / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{newest.name}/{name}: (checksum mismatch|unreadable)|state.json"):
        verify_checkpoint(newest)
    assert verify_checkpoint(find_checkpoint(tmp_path))["step"] == 2  # the run falls back to step 2
    assert Trainer.resume(tmp_path, progress=False).step == 2
    with pytest.raises(CheckpointError, match=name if name != "state.json" else "state.json"):
        load_ema_net(newest)  # asked for by name: an error, not a silent fallback


def test_truncated_weights_without_checksums_and_other_damage(tmp_path):
    trained_run(tmp_path)
    folder = find_checkpoint(tmp_path)
    state = json.loads((folder / "state.json").read_text())
    del state["files"]  # as a checkpoint from before checksums
    (folder / "state.json").write_text(json.dumps(state))
    weights = folder / "ema.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="ema.safetensors: not a readable safetensors file"):
        load_ema_net(folder)

    (folder / "state.json").write_text("{")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        find_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("../../etc\n")  # a pointer out of the run is never followed
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        find_checkpoint(tmp_path)


def test_edited_config_json_is_named(tmp_path):
    trained_run(tmp_path)
    folder = find_checkpoint(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["config"]["lr"] = "fast"
    (folder / "config.json").write_text(json.dumps(config))
    state = json.loads((folder / "state.json").read_text())  # re-sign it, as someone editing it by hand might
    state["files"]["config.json"] = checkpoints_module.file_sha256(folder / "config.json")
    (folder / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="config.json: invalid run configuration: lr"):
        load_ema_net(folder)


# ---------------------------------------------------------------------------
# Resume: the right run, the right number of processes
# ---------------------------------------------------------------------------


def test_resume_refuses_an_out_dir_that_holds_another_run(tmp_path):
    trained_run(tmp_path / "a")
    trained_run(tmp_path / "b", seed=1)
    b_files = {p: p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"--out .*b holds another run"):
        Trainer.resume(tmp_path / "a", tmp_path / "b", steps=4, progress=False)
    assert {p: p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()} == b_files

    moved = Trainer.resume(tmp_path / "a", tmp_path / "c", steps=4, progress=False)  # an empty directory: fine
    moved.train()
    assert [r["step"] for r in log_records(tmp_path / "c")] == [1, 2, 3, 4]  # a's history, then its own


def test_resume_trims_the_log_after_the_checkpoint_and_keeps_the_run_id(tmp_path):
    trainer = trained_run(tmp_path)
    with open(tmp_path / "log.jsonl", "a") as log:  # a crash after step 2's checkpoint, logged to step 3
        log.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + '{"step": 4, "lo')
    resumed = Trainer.resume(tmp_path, steps=3, progress=False)
    assert resumed.run_id == trainer.run_id
    resumed.train()
    assert [r["step"] for r in log_records(tmp_path)] == [1, 2, 3]


def test_a_different_world_size_needs_consent(tmp_path):
    trained_run(tmp_path)
    folder = find_checkpoint(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["world_size"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    state = json.loads((folder / "state.json").read_text())
    state["files"]["config.json"] = checkpoints_module.file_sha256(folder / "config.json")
    (folder / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"written by 2 process\(es\) and this run has 1: .*--allow-world-size-change"):
        Trainer.resume(tmp_path, steps=4, progress=False)
    assert Trainer.resume(tmp_path, steps=4, progress=False, allow_world_size_change=True).step == 2


def test_stale_partial_folders_are_ignored_and_cleaned(tmp_path):
    trained_run(tmp_path)
    stale = tmp_path / "checkpoints" / "step_0000004.partial"
    shutil.copytree(find_checkpoint(tmp_path), stale)
    assert find_checkpoint(tmp_path).name == "step_0000002"  # a .partial folder is never a checkpoint
    Trainer.resume(tmp_path, steps=4, progress=False).train()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]


# ---------------------------------------------------------------------------
# The command: exit statuses and --auto-resume
# ---------------------------------------------------------------------------


def test_a_diverging_command_exits_non_zero_with_the_step_and_hints(tmp_path, capsys):
    from imm_kernels.cli import main

    with pytest.raises(SystemExit) as exit_info:  # sigma_d 1e-30: the first loss is already NaN
        main([*"train --data toy2d --steps 5 --sigma-data 1e-30 --ckpt-every 1 --out".split(), str(tmp_path)])
    assert exit_info.value.code == 3
    err = capsys.readouterr().err
    assert "training diverged at step 1" in err and "no checkpoint had been written" in err and "--lr" in err
    assert not (tmp_path / "checkpoints").exists() or not complete_checkpoints(tmp_path)
    assert log_records(tmp_path)[-1]["event"] == "diverged"


def test_auto_resume_starts_or_continues_and_refuses_a_changed_config(tmp_path, capsys):
    from helpers import cli_fails, run_cli

    base = [*"train --data 8gaussians --batch 16 --width 8 --depth 1 --auto-resume --out".split(), str(tmp_path)]
    assert "done: step 2" in run_cli(capsys, *base, "--steps", "2").out
    assert "done: step 4" in run_cli(capsys, *base, "--steps", "4").out  # the same command, continued
    assert [r["step"] for r in log_records(tmp_path) if "loss" in r][-1] == 4
    err = cli_fails(capsys, *base, "--steps", "6", "--lr", "0.1")
    assert "--auto-resume: --lr 0.1 (the run has 0.002) differ from the run in" in err
