"""imm_kernels.models.flops: the DiT FLOP formula against torch's FlopCounterMode on real forwards and
training steps (tiny DiTs, and DiT-XL/2 on the meta device), the training-step count, MFU.

FlopCounterMode counts the matrix products (mm, addmm, bmm, convolution), 2·m·n·k each, as the
formula does. Attention runs on SDPA's math backend, two bmm forward and four backward: on a CPU
FlopCounterMode has no formula for the fused kernel (aten._scaled_dot_product_flash_attention_for_cpu
would count 0), and on CUDA it counts the fused backward at five products (it recomputes the
scores: hardware FLOPs, not the model FLOPs of the formula).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from imm_kernels import IMMLoss, Preconditioner
from imm_kernels.models import DiT, DiT_models
from imm_kernels.models.flops import (
    PEAK_BF16_FLOPS,
    dit_forward_flops,
    dit_forward_flops_by_part,
    imm_training_step_flops,
    mfu,
    peak_bf16_flops,
)

from helpers import needs_triton

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=4, num_classes=5)
OPTION_CASES = {  # on top of TINY
    "default": {},
    "qk_norm": dict(qk_norm=True),
    "temb_mult_3": dict(temb_mult=3),
    "no_s_embed": dict(s_embed=False),
    "unconditional": dict(num_classes=0),
    "batched_modulation": dict(batched_modulation=True),
    "mlp_ratio_3": dict(mlp_ratio=3.0),
    "patch_1_depth_3": dict(patch_size=1, depth=3),
    "fourier_64": dict(embedding_kwargs=dict(embedding_type="fourier", frequency_embedding_size=64)),
    "no_time_mlp": dict(embedding_kwargs=dict(use_mlp=False, frequency_embedding_size=32)),
    "all": dict(qk_norm=True, temb_mult=2, s_embed=False, num_classes=0, batched_modulation=True, mlp_ratio=2.0),
}
LINEAR_PARTS = ("time_embedding", "adaln_modulation", "qkv", "proj", "mlp", "final_layer")


def tiny_dit(**options) -> DiT:
    torch.manual_seed(0)
    return DiT(**{**TINY, "backend": "torch", **options}).to(DEVICE)


def dit_inputs(model: DiT, batch: int):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=generator)
    t = torch.rand(batch, generator=generator) * 1000
    s = t * torch.rand(batch, generator=generator)
    labels = None
    if model.num_classes:
        labels = torch.nn.functional.one_hot(torch.arange(batch) % model.num_classes, model.num_classes).float()
        labels = labels.to(DEVICE)
    return x.to(DEVICE), t.to(DEVICE), s.to(DEVICE), labels


def counted_by_kind(run) -> dict[str, int]:
    """FlopCounterMode's count of run(), split into convolution, linear (mm/addmm) and the rest (the
    attention's bmm)."""
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        run()
    by_op = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    conv = by_op.pop("aten.convolution", 0) + by_op.pop("aten.convolution_backward", 0)
    linear = by_op.pop("aten.addmm", 0) + by_op.pop("aten.mm", 0)
    return {"conv": conv, "linear": linear, "attention": sum(by_op.values()), "total": counter.get_total_flops()}


@pytest.mark.parametrize("options", OPTION_CASES.values(), ids=OPTION_CASES.keys())
def test_forward_flops_are_what_flop_counter_mode_counts(options):
    model = tiny_dit(**options)
    batch = 3
    x, t, s, labels = dit_inputs(model, batch)
    with torch.no_grad():
        counted = counted_by_kind(lambda: model(x, t, s, labels))
    parts = dit_forward_flops_by_part(model)
    assert counted["conv"] == batch * parts["patch_embedding"]
    assert counted["attention"] == batch * parts["attention"]
    assert counted["linear"] == batch * sum(parts[name] for name in LINEAR_PARTS)
    assert counted["total"] == dit_forward_flops(model, batch)


def test_dit_xl_2_forward_on_the_meta_device():
    """The full-size model at no cost: the meta device runs shapes only, and FlopCounterMode counts them."""
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](backend="torch")
        x, t, s = torch.empty(2, 4, 32, 32), torch.empty(2), torch.empty(2)
        labels = torch.zeros(2, 1000)
    with torch.no_grad():
        counted = counted_by_kind(lambda: model(x, t, s, labels))
    assert counted["total"] == dit_forward_flops("DiT-XL/2", batch=2) == 2 * 237_236_649_984


def test_dit_paper_gflops_are_multiply_adds():
    """The DiT paper's DiT-XL/2 "118.6 Gflops" (32×32×4 latents) is half our FLOP count: multiply-adds.
    Its model has 8 output channels (learn_sigma) and no s embedder; either way it rounds to 118.6."""
    parts = dit_forward_flops_by_part("DiT-XL/2")
    ours = sum(parts.values())
    papers_model = ours + parts["final_layer"] - parts["time_embedding"] // 2
    assert round(ours / 2e9, 1) == round(papers_model / 2e9, 1) == 118.6
    assert round(dit_forward_flops("DiT-S/2") / 2e9, 2) == 6.05


@needs_triton
def test_fused_ops_add_no_matrix_products():
    model = tiny_dit()
    x, t, s, labels = dit_inputs(model, 2)
    model.backend = "triton"  # the Triton interpreter on a CPU
    with torch.no_grad():
        assert counted_by_kind(lambda: model(x, t, s, labels))["total"] == dit_forward_flops(model, 2)


def input_gradients_skipped(model: DiT) -> int:
    """Per sample: the backward computes no input gradient for the patch embedding (x needs none) nor
    for the time embedders' first Linear (the time features need none); the convention counts them."""
    parts = dit_forward_flops_by_part(model)
    time_mlps = [e for e in (model.t_embedder, model.s_embedder) if e is not None and e.use_mlp]
    return parts["patch_embedding"] + sum(2 * e.frequency_embedding_size * model.temb_size for e in time_mlps)


TRAINING_CASES = {name: OPTION_CASES[name] for name in ("default", "no_s_embed", "batched_modulation", "all")}


@pytest.mark.parametrize("options", TRAINING_CASES.values(), ids=TRAINING_CASES.keys())
def test_training_step_flops_are_what_flop_counter_mode_counts(options):
    """One IMMLoss step, forward and backward: the student pass with gradients, the target pass without."""
    model = tiny_dit(**options)
    net = Preconditioner(model, label_dim=model.num_classes)
    loss_fn = IMMLoss(net, group_size=4, backend="torch")
    batch = 8
    x, _, _, labels = dit_inputs(model, batch)

    def step():
        loss, _ = loss_fn(x, labels)
        loss.backward()

    counted = counted_by_kind(step)
    assert counted["total"] == imm_training_step_flops(model, batch) - batch * input_gradients_skipped(model)
    assert counted["attention"] == batch * (3 + 1) * dit_forward_flops_by_part(model)["attention"]


def test_training_step_is_three_forwards_with_gradients_and_one_without():
    for config in ("DiT-S/2", "DiT-XL/2", {**TINY, "s_embed": False}):
        forward = dit_forward_flops(config)
        assert imm_training_step_flops(config) == 3 * forward + forward
        assert imm_training_step_flops(config, batch=64) == 64 * imm_training_step_flops(config)
    assert imm_training_step_flops("DiT-XL/2") == 948_946_599_936


def test_every_way_to_name_a_model_gives_its_count():
    model = tiny_dit(qk_norm=True, temb_mult=2)
    expected = dit_forward_flops(model)
    assert dit_forward_flops({**TINY, "qk_norm": True, "temb_mult": 2}) == expected
    net = Preconditioner(model, label_dim=5)
    assert dit_forward_flops(net) == expected
    assert imm_training_step_flops(IMMLoss(net)) == 4 * expected
    assert dit_forward_flops(torch.compile(model)) == expected  # compiles nothing until called
    with torch.device("meta"):
        xl_2 = DiT_models["DiT-XL/2"]()
    assert dit_forward_flops("DiT_XL_2") == dit_forward_flops("DiT-XL/2") == dit_forward_flops(xl_2)
    assert dit_forward_flops("DiT-S/2", batch=0) == 0
    assert dit_forward_flops(model, batch=5) == 5 * expected


def test_what_is_not_a_dit_is_refused():
    with pytest.raises(ValueError, match="unknown DiT"):
        dit_forward_flops("DiT-XXL/2")
    with pytest.raises(TypeError, match="must be a DiT"):
        dit_forward_flops(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="must be a DiT"):
        dit_forward_flops(42)
    with pytest.raises(TypeError, match="unexpected keyword"):
        dit_forward_flops({"hidden": 32})  # DiT's own validation
    with pytest.raises(ValueError, match="batch"):
        dit_forward_flops("DiT-S/2", batch=-1)


def test_mfu_arithmetic():
    assert mfu(1000, 1e12, 1e15) == 1.0
    assert mfu(250, 4e11, "H200") == pytest.approx(1e14 / 989e12)
    assert mfu(250, 4e11, "A100") == pytest.approx(1e14 / 312e12)
    assert mfu(0, 4e11, 1e12) == 0.0
    assert PEAK_BF16_FLOPS == {"H100 SXM": 989e12, "H200": 989e12, "A100": 312e12}
    with pytest.raises(ValueError, match="unknown device"):
        mfu(1, 1, "B200")
    for bad in (0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="peak_flops"):
            mfu(1, 1, bad)
    with pytest.raises(ValueError, match="samples_per_s"):
        mfu(-1, 1, 1e12)
    with pytest.raises(ValueError, match="flops_per_sample"):
        mfu(1, float("nan"), 1e12)


@pytest.mark.parametrize(
    "device_name, expected",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A100 80GB PCIe", "A100"),
        ("NVIDIA H100 PCIe", None),  # 756 TFLOP/s dense bf16, not the SXM part's 989
        ("NVIDIA H100 NVL", None),
        ("NVIDIA H200 NVL", None),
        ("NVIDIA GH200 480GB", None),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_of_a_device_name(device_name, expected):
    found = peak_bf16_flops(device_name)
    assert (found and found[0]) == expected
    if expected:
        assert found[1] == PEAK_BF16_FLOPS[expected]
