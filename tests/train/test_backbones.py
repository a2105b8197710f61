"""The trainer's backbones (DiT, SongUNet) and speed switches: each switch equals the plain path.

Tolerances: checkpointed activations recompute the same operations in the same order (bitwise);
torch.compile (here with the aot_eager backend, which traces and decomposes but does not fuse)
may reorder nothing either, so it is compared bitwise too; where a comparison allows a
tolerance, the line says why.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

from imm_kernels.models import DiT, SongUNet, imm_training_step_flops
from imm_kernels.train import trainer as trainer_module
from imm_kernels.train.trainer import TrainConfig, Trainer

from helpers import cli_fails, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL_DIT = {"hidden_size": 32, "depth": 2, "num_heads": 2}
SMALL_UNET = {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4]}
DIGITS = dict(data="digits", batch=16, group_size=4, sample_every=0, ckpt_every=0, device="cpu", backend="torch")


def gradients(trainer: Trainer, step: int = 0):
    loss, _ = trainer.compute_loss_and_gradients(step)
    return loss.detach(), {name: p.grad.clone() for name, p in trainer.net.named_parameters() if p.grad is not None}


def randomise_output_layers(trainer: Trainer) -> None:
    """DiT and the U-Net start with (near-)zero output layers; give every weight a value so gradients flow."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in trainer.net.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))


def test_dit_and_songunet_train_on_digits_and_sample_end_to_end(tmp_path, capsys):
    dit = tmp_path / "dit"
    # --backend torch: the references of the fused ops (their parity is tests/ops' and tests/models' business)
    common = ["--data", "digits", "--steps", "4", "--batch", "32", "--log-every", "2", "--backend", "torch"]
    kwargs = '{"hidden_size": 32, "depth": 2, "num_heads": 2}'
    printed = run_cli(
        capsys, "train", *common, "--model", "dit-s2", "--model-kwargs", kwargs, "--conditional", "--out", str(dit)
    )
    assert "done: step 4" in printed.out
    printed = run_cli(
        capsys,
        "sample",
        "--checkpoint",
        str(dit),
        "--steps",
        "1,2",
        "--cfg-scale",
        "1.5",
        "--out",
        str(tmp_path / "dit.png"),
    )
    assert (tmp_path / "dit.png").is_file()

    unet = str(tmp_path / "unet")
    unet_kwargs = '{"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4]}'
    printed = run_cli(
        capsys, "train", *common, "--model", "songunet", "--model-kwargs", unet_kwargs, "--out", str(unet)
    )
    assert "done: step 4" in printed.out
    run_cli(capsys, "eval", "--checkpoint", unet, "--steps", "1", "--num-samples", "100")


def test_the_configured_backbones_are_built():
    dit = Trainer(TrainConfig(model="dit-s2", model_kwargs=SMALL_DIT, conditional=True, **DIGITS), progress=False)
    backbone = dit.net.backbone
    assert isinstance(backbone, DiT) and backbone.patch_size == 2 and backbone.num_classes == 10
    assert backbone.backend == "torch" and len(backbone.blocks) == 2  # model_kwargs override DiT-S's depth
    assert dit.config.width is None and dit.config.depth is None
    full = Trainer(TrainConfig(model="dit-s4", **DIGITS), progress=False).net.backbone
    assert (len(full.blocks), full.pos_embed.shape[-1], full.num_heads) == (12, 384, 6)  # DiT-S/4 as named
    unet = Trainer(TrainConfig(model="songunet", model_kwargs=SMALL_UNET, **DIGITS), progress=False)
    assert isinstance(unet.net.backbone, SongUNet)


def test_label_dropout_feeds_the_dits_null_class():
    config = TrainConfig(model="dit-s2", model_kwargs=SMALL_DIT, conditional=True, label_dropout=1.0, **DIGITS)
    trainer = Trainer(config, progress=False)
    randomise_output_layers(trainer)
    _, grads = gradients(trainer)
    table = grads["backbone.y_embedder.embedding_table.weight"]
    assert table.shape[0] == 11  # 10 classes and the null row (the official layout)
    assert table[10].abs().sum() > 0 and table[:10].abs().sum() == 0  # every label dropped to the null row


def test_checkpointed_activations_equal_the_plain_path():
    plain = Trainer(TrainConfig(model="dit-s2", model_kwargs=SMALL_DIT, dropout=0.1, **DIGITS), progress=False)
    checkpointed = Trainer(
        TrainConfig(model="dit-s2", model_kwargs=SMALL_DIT, dropout=0.1, checkpoint_activations=True, **DIGITS),
        progress=False,
    )
    assert checkpointed.net.backbone.checkpoint_activations
    for trainer in (plain, checkpointed):
        randomise_output_layers(trainer)
    loss, grads = gradients(plain, step=3)
    loss_ckpt, grads_ckpt = gradients(checkpointed, step=3)
    assert torch.equal(loss, loss_ckpt)  # the dropout masks replay (the RNG state is restored)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        assert torch.equal(grads[name], grads_ckpt[name]), name


def test_compile_equals_the_plain_path_and_has_no_graph_break(monkeypatch):
    # aot_eager: Dynamo's capture and AOTAutograd's joint graph without Inductor's code generation
    # (minutes on a CPU); fullgraph=True turns any graph break into an error.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager", fullgraph=True))
    config = TrainConfig(model="dit-s2", model_kwargs=SMALL_DIT, conditional=True, **DIGITS)
    plain = Trainer(config, progress=False)
    compiled = Trainer(TrainConfig(**{**config.__dict__, "compile": True}), progress=False)
    for trainer in (plain, compiled):
        randomise_output_layers(trainer)
    loss, grads = gradients(plain, step=2)
    loss_compiled, grads_compiled = gradients(compiled, step=2)
    torch.testing.assert_close(loss_compiled, loss, rtol=0, atol=0)
    for name in grads:
        # AOTAutograd's decompositions may reassociate a reduction: float32 rounding, no more.
        torch.testing.assert_close(grads_compiled[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 and the fused AdamW apply on CUDA")
def test_tf32_and_fused_adamw_switches_on_cuda():
    config = TrainConfig(model="dit-s2", model_kwargs=SMALL_DIT, **{**DIGITS, "device": "cuda"})
    trainer = Trainer(config, progress=False)
    assert torch.backends.cuda.matmul.allow_tf32 and trainer.optimizer.defaults["fused"]
    trainer = Trainer(TrainConfig(**{**config.__dict__, "tf32": False, "fused_optimizer": False}), progress=False)
    assert not torch.backends.cuda.matmul.allow_tf32 and not trainer.optimizer.defaults["fused"]


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"model": "dit-s2", "width": 16}, ValueError, "width and depth size the mlp and conv models"),
        ({"model": "conv", "checkpoint_activations": True}, ValueError, "checkpoint_activations applies to the DiT"),
        ({"model": "dit-s3"}, ValueError, "model must be one of"),
        ({"model": "dit-s2", "model_kwargs": [1]}, TypeError, "model_kwargs must be a dict"),
        ({"compile": "yes"}, TypeError, "compile must be a bool"),
    ],
)
def test_bad_backbone_configs(options, error, match):
    with pytest.raises(error, match=match):
        TrainConfig(**{**DIGITS, **options})


def test_backbones_that_do_not_fit_the_data(tmp_path, capsys):
    with pytest.raises(ValueError, match="model 'mlp' takes vector data; digits holds images"):
        Trainer(TrainConfig(model="mlp", **DIGITS), progress=False)
    with pytest.raises(ValueError, match="model 'dit-s2' takes images or latents"):
        Trainer(TrainConfig(model="dit-s2", **{**DIGITS, "data": "toy2d"}), progress=False)
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        Trainer(TrainConfig(model="dit-s2", model_kwargs={"hidden": 3}, **DIGITS), progress=False)
    err = cli_fails(capsys, "train", "--model", "dit-s2", "--model-kwargs", "[1]", "--out", str(tmp_path))
    assert "expected a JSON object" in err
    err = cli_fails(capsys, "train", "--model", "dit-s2", "--model-kwargs", '{"patch_size": 3}', "--out", str(tmp_path))
    assert "input_size (8) must be a multiple of patch_size (3)" in err


def test_gradient_accumulation_equals_the_whole_batch():
    """The step's draws (times, label dropout, noise) are made once and sliced, so two micro-batches
    compute the whole batch's loss; only the order of the sums differs (float32 rounding: rtol 1e-5).
    No backbone dropout here: its masks are drawn per forward call, so they would differ."""
    config = TrainConfig(conditional=True, label_dropout=0.3, **{**DIGITS, "batch": 32, "width": 16, "depth": 1})
    whole = Trainer(config, progress=False)
    split = Trainer(TrainConfig(**{**config.__dict__, "accum": 2}), progress=False)
    for trainer in (whole, split):
        randomise_output_layers(trainer)
    (loss, grads), (loss_split, grads_split) = gradients(whole, step=5), gradients(split, step=5)
    torch.testing.assert_close(loss_split, loss, rtol=1e-5, atol=0)
    for name in grads:
        torch.testing.assert_close(grads_split[name], grads[name], rtol=1e-5, atol=1e-8, msg=name)
    with pytest.raises(ValueError, match=r"accum=3 must divide each rank's 8 groups"):
        Trainer(TrainConfig(**{**config.__dict__, "accum": 3}), progress=False)


def test_the_log_holds_throughput_the_step_phases_and_the_loss_by_time(tmp_path):
    config = TrainConfig(model="dit-s2", model_kwargs=SMALL_DIT, steps=4, **{**DIGITS, "log_every": 2})
    Trainer(config, tmp_path, progress=False).train()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    for record in records:
        assert record["tokens_per_s"] == pytest.approx(record["samples_per_s"] * 16)  # (8/2)² tokens a sample
        assert record["train_flops_per_sample"] == imm_training_step_flops(
            DiT(input_size=8, in_channels=1, num_classes=0, **SMALL_DIT)
        )
        assert set(record["step_ms"]) == {"data", "forward", "loss", "backward", "optimizer", "ema"}
        assert all(ms > 0 for ms in record["step_ms"].values())
        # The bins split the logged loss: their group-weighted mean is it (4 groups x 2 steps).
        counts, means = record["groups_by_t"], record["loss_by_t"]
        assert list(counts) == ["0.000-0.248", "0.248-0.497", "0.497-0.746", "0.746-0.994"]
        assert sum(counts.values()) == 8
        pooled = sum(counts[name] * means[name] for name in counts if counts[name]) / 8
        assert pooled == pytest.approx(record["loss"], rel=1e-5)  # float32 step losses vs float64 bin sums
        assert "mfu" not in record  # a GPU figure


# Data too large for memory streams from its files: the same batches, the same training.


def _image_array(path):
    generator = np.random.default_rng(0)
    np.savez(path, x=generator.normal(size=(200, 1, 8, 8)).astype(np.float32), y=generator.integers(0, 3, 200))
    return path


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_data_trains_exactly_as_data_in_memory(tmp_path, monkeypatch, workers):
    data = str(_image_array(tmp_path / "images.npz"))
    config = TrainConfig(steps=4, flip=True, conditional=True, workers=workers, **{**DIGITS, "data": data, "width": 8})
    in_memory = Trainer(config, progress=False)
    assert not in_memory.streaming
    in_memory.train()
    monkeypatch.setattr(trainer_module, "IN_MEMORY_LIMIT_BYTES", 0)
    streamed = Trainer(config, progress=False)
    assert streamed.streaming and streamed.train_x is None
    streamed.train()
    for name, value in in_memory.net.state_dict().items():
        assert torch.equal(streamed.net.state_dict()[name], value), name


def test_a_streamed_run_resumes_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "IN_MEMORY_LIMIT_BYTES", 0)
    data = str(_image_array(tmp_path / "images.npz"))
    config = TrainConfig(steps=6, flip=True, **{**DIGITS, "data": data, "width": 8, "ckpt_every": 3})
    straight = Trainer(config, tmp_path / "straight", progress=False)
    straight.train()
    Trainer(TrainConfig(**{**config.__dict__, "steps": 3}), tmp_path / "halves", progress=False).train()
    resumed = Trainer.resume(tmp_path / "halves", steps=6, progress=False)
    assert resumed.streaming
    resumed.train()
    for name, value in straight.net.state_dict().items():
        assert torch.equal(resumed.net.state_dict()[name], value), name


def test_flip_is_for_images():
    with pytest.raises(ValueError, match="flip mirrors images, but toy2d:8gaussians holds vectors"):
        Trainer(TrainConfig(flip=True, **{**DIGITS, "data": "8gaussians"}), progress=False)
