"""Few-step sampling: grids against their formulas, pushforward and restart against a plain
transcription of docs/design.md §1.4 in float64, GraphedSampler against the eager sampler, clear errors."""

import contextlib
import gc
import math
import weakref

import pytest
import torch
from torch import nn

from imm_kernels import Preconditioner, schedules
from imm_kernels.models.small import ConvBackbone, MLPBackbone
from imm_kernels.sampling import GraphedSampler, pushforward, restart, time_grid
from imm_kernels.sampling.graphs import WARMUP_RUNS

from helpers import cli_fails, run_cli

SIGMA_D = 0.5
LABEL_DIM = 4
DIM = 3
CUDA = torch.cuda.is_available()

pytestmark = pytest.mark.usefixtures("one_thread")


def make_net(
    param="euler_fm", schedule="fm", time_embed="identity", label_dim=LABEL_DIM, dtype=torch.float64, eps=0.0, seed=0
):
    """A tiny conditional MLP whose output layer is random (the library initialises it to zero, G = 0)."""
    torch.manual_seed(seed)
    backbone = MLPBackbone(DIM, hidden=16, depth=1, label_dim=label_dim, cond_dim=8)
    nn.init.normal_(backbone.out.weight, std=0.5)
    nn.init.normal_(backbone.out.bias, std=0.5)
    net = Preconditioner(
        backbone.to(dtype),
        schedule=schedule,
        param=param,
        time_embed=time_embed,
        sigma_data=SIGMA_D,
        eps=eps,
        label_dim=label_dim,
    )
    return net.eval()


# The public algorithm, transcribed with Python-float coefficients and direct backbone calls.


def alpha_sigma(schedule, t):
    if schedule == "fm":
        return 1 - t, t
    return math.cos(math.pi * t / 2), math.sin(math.pi * t / 2)


def transcribed_f(net, param, schedule, time_embed, x, t, s, one_hot, cfg_scale):
    """f_{s,t}(x): c_skip·x + c_out·G(c_in·x, 1000t, 1000s or 1000(t - s), labels), G guided if cfg_scale."""
    a_t, s_t = alpha_sigma(schedule, t)
    a_s, s_s = alpha_sigma(schedule, s)
    c_in = 1 / (SIGMA_D * math.sqrt(a_t**2 + s_t**2))
    second = s if time_embed == "identity" else t - s
    batch = x.shape[0]

    def backbone(labels):
        return net.backbone(
            c_in * x,
            torch.full((batch,), 1000 * t, dtype=torch.float64),
            torch.full((batch,), 1000 * second, dtype=torch.float64),
            labels,
        )

    if cfg_scale is None:
        g = backbone(one_hot)
    else:
        g_cond, g_null = backbone(one_hot), backbone(torch.zeros_like(one_hot))
        g = g_null + cfg_scale * (g_cond - g_null)
    if param == "euler_fm":
        return x - (t - s) * SIGMA_D * g
    if param == "simple_edm":
        c_skip = (a_t * a_s + s_t * s_s) / (a_t**2 + s_t**2)
        c_out = -SIGMA_D * (a_s * s_t - a_t * s_s) / math.sqrt(a_t**2 + s_t**2)
        return c_skip * x + c_out * g
    return (a_s - a_t * s_s / s_t) * g + (s_s / s_t) * x


def transcribed_pushforward(net, param, schedule, time_embed, x, grid, one_hot, cfg_scale):
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        x = transcribed_f(net, param, schedule, time_embed, x, t_cur, t_next, one_hot, cfg_scale)
    return x


def transcribed_restart(net, param, schedule, time_embed, x, grid, one_hot, cfg_scale, fresh):
    for i, t in enumerate(grid[:-1]):
        x = transcribed_f(net, param, schedule, time_embed, x, t, grid[-1], one_hot, cfg_scale)
        if i < len(grid) - 2:
            a, s = alpha_sigma(schedule, grid[i + 1])
            x = a * x + s * SIGMA_D * fresh[i]
    return x


CASES = [  # (param, schedule, time_embed): every param, both schedules, both time embeddings
    ("euler_fm", "fm", "identity"),
    ("euler_fm", "fm", "stride"),
    ("simple_edm", "fm", "stride"),
    ("simple_edm", "vp_cosine", "identity"),
    ("identity", "fm", "identity"),
    ("identity", "vp_cosine", "stride"),
]


def _inputs(batch=5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    noise = SIGMA_D * torch.randn(batch, DIM, generator=gen, dtype=torch.float64)
    labels = torch.arange(batch) % LABEL_DIM
    return noise, labels, nn.functional.one_hot(labels, LABEL_DIM).double()


@pytest.mark.parametrize("param, schedule, time_embed", CASES)
@pytest.mark.parametrize("cfg_scale", [None, 1.7])
def test_pushforward_equals_the_transcribed_algorithm_in_float64(param, schedule, time_embed, cfg_scale):
    net = make_net(param, schedule, time_embed)
    noise, labels, one_hot = _inputs()
    grid = time_grid("edm", 4, 0.994, 0.0, schedule=schedule).tolist()
    out = pushforward(net, noise, grid, labels, cfg_scale, dtype=torch.float64)
    expected = transcribed_pushforward(net, param, schedule, time_embed, noise, grid, one_hot, cfg_scale)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    assert (out - noise).abs().max() > 0.1  # the steps did move the samples


@pytest.mark.parametrize("param, schedule, time_embed", CASES[::2])
@pytest.mark.parametrize("cfg_scale", [None, 2.0])
def test_restart_equals_the_transcribed_algorithm_with_the_same_fresh_noise(param, schedule, time_embed, cfg_scale):
    net = make_net(param, schedule, time_embed)
    noise, labels, one_hot = _inputs()
    grid = time_grid("uniform", 3, 0.994, 0.0).tolist()
    fresh = torch.randn(2, *noise.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out = restart(net, noise, grid, labels, cfg_scale, restart_noise=fresh, dtype=torch.float64)
    expected = transcribed_restart(net, param, schedule, time_embed, noise, grid, one_hot, cfg_scale, fresh)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    # The fresh noise matters, and a list of per-step tensors is the same input.
    other = restart(net, noise, grid, labels, cfg_scale, restart_noise=-fresh, dtype=torch.float64)
    assert not torch.allclose(out, other)
    torch.testing.assert_close(
        restart(net, noise, grid, labels, cfg_scale, restart_noise=list(fresh), dtype=torch.float64),
        out,
        rtol=0,
        atol=0,
    )


def test_restart_with_one_step_is_pushforward_and_a_generator_is_reproducible():
    net = make_net()
    noise, labels, _ = _inputs()
    grid = [0.994, 0.0]
    torch.testing.assert_close(
        restart(net, noise, grid, labels, dtype=torch.float64),
        pushforward(net, noise, grid, labels, dtype=torch.float64),
        rtol=0,
        atol=0,
    )
    grid = time_grid("uniform", 4, 0.994, 0.0)
    f64 = torch.float64
    first = restart(net, noise, grid, labels, generator=torch.Generator().manual_seed(3), dtype=f64)
    again = restart(net, noise, grid, labels, generator=torch.Generator().manual_seed(3), dtype=f64)
    other = restart(net, noise, grid, labels, generator=torch.Generator().manual_seed(4), dtype=f64)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_float32_state_is_the_default_and_close_to_float64():
    net64 = make_net(param="simple_edm")
    net32 = make_net(param="simple_edm", dtype=torch.float32)
    noise, labels, _ = _inputs()
    grid = time_grid("uniform", 4, 0.994, 0.0)
    out32 = pushforward(net32, noise, grid, labels, 1.5)
    out64 = pushforward(net64, noise, grid, labels, 1.5, dtype=torch.float64)
    assert out32.dtype == torch.float32 and out64.dtype == torch.float64
    torch.testing.assert_close(out32.double(), out64, rtol=1e-5, atol=1e-5)


def test_sampling_runs_in_eval_mode_and_restores_the_mode():
    torch.manual_seed(0)
    backbone = ConvBackbone(1, 8, channels=8, num_blocks=1, dropout=0.5)
    nn.init.normal_(backbone.out.weight, std=0.1)
    net = Preconditioner(backbone).train()
    noise = SIGMA_D * torch.randn(2, 1, 8, 8)
    first, second = pushforward(net, noise, [0.994, 0.5, 0.0]), pushforward(net, noise, [0.994, 0.5, 0.0])
    assert torch.equal(first, second) and net.training


# Grids.


def test_uniform_grid_is_the_linspace_formula():
    grid = time_grid("uniform", 5, 0.994, 0.002)
    expected = torch.tensor([0.994 + i / 5 * (0.002 - 0.994) for i in range(6)], dtype=torch.float64)
    assert grid.dtype == torch.float64 and grid.shape == (6,)
    torch.testing.assert_close(grid, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("schedule", ["fm", "vp_cosine"])
@pytest.mark.parametrize("steps, T, eps", [(1, 0.994, 0.0), (4, 0.994, 0.0), (8, 0.9, 0.01)])
def test_edm_grid_is_rho7_in_eta(schedule, steps, T, eps):
    if schedule == "fm":
        eta, eta_inv = (lambda t: t / (1 - t)), (lambda e: e / (1 + e))
    else:
        eta, eta_inv = (lambda t: math.tan(math.pi * t / 2)), (lambda e: 2 / math.pi * math.atan(e))
    hi, lo = eta(T) ** (1 / 7), eta(eps) ** (1 / 7)
    expected = [eta_inv((hi + i / steps * (lo - hi)) ** 7) for i in range(steps + 1)]
    grid = time_grid("edm", steps, T, eps, schedule=schedule)
    assert grid[0] == T and grid[-1] == eps  # endpoints exact
    torch.testing.assert_close(grid, torch.tensor(expected, dtype=torch.float64), rtol=1e-13, atol=1e-15)
    assert torch.all(grid[1:] < grid[:-1])


def test_explicit_eta_grid_cifar_two_steps():
    grid = time_grid("eta", 2, 0.994, 0.0, mid_eta=[1.4])
    assert grid.tolist() == [0.994, pytest.approx(1.4 / 2.4, rel=1e-15), 0.0]
    assert grid[1].item() == schedules.fm.eta_inv(1.4)
    grid = time_grid("eta", 3, 0.994, 0.0, mid_eta=[10.0, 0.5], schedule="vp_cosine")
    torch.testing.assert_close(
        grid[1:3],
        torch.tensor([2 / math.pi * math.atan(10.0), 2 / math.pi * math.atan(0.5)], dtype=torch.float64),
        rtol=1e-15,
        atol=0,
    )


@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        (("uniform", 0, 0.994, 0.0), {}, ValueError, "steps must be an int >= 1, got 0"),
        (("uniform", 2.0, 0.994, 0.0), {}, ValueError, "steps must be an int >= 1"),
        (("cosine", 2, 0.994, 0.0), {}, ValueError, "kind must be one of"),
        (("uniform", 2, 0.5, 0.5), {}, ValueError, "0 <= eps < T <= 1"),
        (("edm", 2, 1.0, 0.0), {}, ValueError, "needs a finite eta"),
        (("uniform", 2, 0.994, 0.0), {"mid_eta": [1.4]}, ValueError, "mid_eta is only used with kind='eta'"),
        (("eta", 2, 0.994, 0.0), {}, ValueError, "kind='eta' needs mid_eta"),
        (("eta", 3, 0.994, 0.0), {"mid_eta": [1.4]}, ValueError, "mid_eta must hold steps - 1 = 2"),
        (("eta", 3, 0.994, 0.0), {"mid_eta": [0.5, 1.4]}, ValueError, "mid_eta must be strictly decreasing"),
        (("eta", 2, 0.994, 0.0), {"mid_eta": [500.0]}, ValueError, "strictly between"),
        (("uniform", 2, 0.994, 0.0), {"schedule": "cosine"}, ValueError, "schedule must be one of"),
    ],
)
def test_time_grid_rejects_bad_arguments(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        time_grid(*args, **kwargs)


# Bad sampler inputs.


def test_samplers_reject_bad_inputs():
    net = make_net(dtype=torch.float32)
    unconditional = make_net(label_dim=0, dtype=torch.float32)
    noise, labels, _ = _inputs()
    noise = noise.float()
    with pytest.raises(ValueError, match=r"t_steps must hold at least 2 times \(steps >= 1\)"):
        pushforward(net, noise, [0.9])
    with pytest.raises(ValueError, match="t_steps must be strictly decreasing"):
        pushforward(net, noise, [0.1, 0.9])
    with pytest.raises(ValueError, match=r"t_steps must be finite times in \[0, 1\]"):
        restart(net, noise, [1.5, 0.0])
    with pytest.raises(ValueError, match="class_labels were given but the model is unconditional"):
        pushforward(unconditional, noise, [0.9, 0.0], labels)
    with pytest.raises(ValueError, match="cfg_scale needs class_labels"):
        pushforward(net, noise, [0.9, 0.0], None, 2.0)
    with pytest.raises(ValueError, match="cfg_scale needs a conditional model"):
        restart(unconditional, noise, [0.9, 0.0], None, 2.0)
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.float64"):
        pushforward(net, noise, [0.9, 0.0], dtype=torch.float16)
    with pytest.raises(ValueError, match=r"restart_noise must have shape \(steps - 1, B, \*feature\) = \(1, 5, 3\)"):
        restart(net, noise, [0.9, 0.5, 0.0], restart_noise=torch.zeros(2, 5, 3))
    with pytest.raises(TypeError, match="noise must be a floating-point tensor"):
        pushforward(net, labels, [0.9, 0.0])


def test_graphed_sampler_rejects_bad_inputs():
    net = make_net(dtype=torch.float32)
    unconditional = make_net(label_dim=0, dtype=torch.float32)
    noise, labels, _ = _inputs(batch=4)
    noise = noise.float()
    with pytest.raises(ValueError, match=r"t_steps must hold at least 2 times \(steps >= 1\)"):
        GraphedSampler(net, 4, [0.5])
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        GraphedSampler(net, 0, [0.9, 0.0])
    with pytest.raises(ValueError, match="cfg_scale needs a conditional model"):
        GraphedSampler(unconditional, 4, [0.9, 0.0], cfg_scale=1.5)
    with pytest.raises(ValueError, match="sampler must be one of"):
        GraphedSampler(net, 4, [0.9, 0.0], sampler="heun")
    with pytest.raises(ValueError, match="dtype must be"):
        GraphedSampler(net, 4, [0.9, 0.0], dtype=torch.bfloat16)
    sampler = GraphedSampler(net, (2, 4), [0.9, 0.0], cfg_scale=1.5)
    with pytest.raises(ValueError, match=r"noise has batch 3, but this sampler serves batch_size \(2, 4\)"):
        sampler(noise[:3], labels[:3])
    with pytest.raises(ValueError, match="cfg_scale needs class_labels"):
        sampler(noise)
    with pytest.raises(ValueError, match="class_labels were given but the model is unconditional"):
        GraphedSampler(unconditional, 4, [0.9, 0.0])(noise, labels)
    with pytest.raises(ValueError, match="restart_noise is only used with sampler='restart'"):
        sampler(noise, labels, restart_noise=torch.zeros(0, 4, 3))
    shaped = GraphedSampler(net, 4, [0.9, 0.0], sample_shape=(3,))
    with pytest.raises(ValueError, match=r"noise must have shape \(B, \(3,\)\)"):
        shaped(torch.zeros(4, 2))


@pytest.mark.parametrize("sampler_kind", ["pushforward", "restart"])
def test_graphed_sampler_on_cpu_is_the_eager_sampler(sampler_kind):
    net = make_net(param="simple_edm", dtype=torch.float32)
    noise, labels, _ = _inputs(batch=4)
    noise = noise.float()
    grid = time_grid("edm", 3, 0.994, 0.0)
    fresh = torch.randn(2, 4, DIM)
    sampler = GraphedSampler(net, 4, grid, cfg_scale=1.5, sampler=sampler_kind)
    assert not sampler.graphed and "eager (CPU)" in repr(sampler)
    extra = {"restart_noise": fresh} if sampler_kind == "restart" else {}
    eager = (pushforward if sampler_kind == "pushforward" else restart)(net, noise, grid, labels, 1.5, **extra)
    assert torch.equal(sampler(noise, labels, **extra), eager)


def test_samplers_take_the_official_label_forms():
    """Official scripts pass F.one_hot rows (int64) and, for the null label, one (1, label_dim) row of zeros."""
    net = make_net(param="simple_edm", dtype=torch.float32)
    noise, labels, _ = _inputs(batch=4)
    noise, grid = noise.float(), time_grid("uniform", 2, 0.994, 0.0)
    one_hot_rows = torch.nn.functional.one_hot(labels, LABEL_DIM)
    expected = pushforward(net, noise, grid, labels, 1.5)
    assert torch.equal(pushforward(net, noise, grid, one_hot_rows, 1.5), expected)
    assert torch.equal(GraphedSampler(net, 4, grid, cfg_scale=1.5)(noise, one_hot_rows), expected)
    assert torch.equal(pushforward(net, noise, grid, torch.zeros(1, LABEL_DIM)), pushforward(net, noise, grid))


# Capture keeps what the graph reads alive.


class _FakeCudaGraphs:
    """Stand-ins for the torch.cuda calls of a capture, so that it runs (eagerly) on the CPU."""

    class Stream:
        def wait_stream(self, other):
            pass

    class CUDAGraph:
        def replay(self):
            pass

    @staticmethod
    def install(monkeypatch):
        fake = _FakeCudaGraphs
        monkeypatch.setattr(torch.cuda, "Stream", fake.Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda *args: fake.Stream())
        monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "CUDAGraph", fake.CUDAGraph)
        monkeypatch.setattr(torch.cuda, "graph", lambda graph, pool=None: contextlib.nullcontext())


@pytest.mark.parametrize("sampler_kind", ["pushforward", "restart"])
def test_captured_loop_keeps_the_time_and_guidance_tensors_alive(monkeypatch, sampler_kind):
    """A CUDA graph holds raw addresses: a tensor it reads that nothing keeps alive is freed once the
    capture returns, and the allocator hands its memory to the next tensor of that size."""
    net = make_net(param="simple_edm", dtype=torch.float32)
    read = []  # weak references to the times and guidance scales the captured steps read

    def recording(call):
        def record(x, t, s, labels, *cfg_scale, **kwargs):
            read.extend(weakref.ref(value) for value in (t, s, *cfg_scale))
            return call(x, t, s, labels, *cfg_scale, **kwargs)

        return record

    monkeypatch.setattr(net, "forward", recording(net.forward))
    monkeypatch.setattr(net, "guided", recording(net.guided))
    _FakeCudaGraphs.install(monkeypatch)
    noise, labels, _ = _inputs(batch=4)
    sampler = GraphedSampler(net, 4, time_grid("edm", 3, 0.994, 0.0), cfg_scale=1.5, sampler=sampler_kind)
    sampler.graphed = True  # capture through the fakes, as on a GPU
    sampler(noise.float(), labels)
    gc.collect()
    assert len(read) == 3 * 3 * (WARMUP_RUNS + 1)  # t, s and the scale of 3 steps, in each warm-up and the capture
    freed = [ref for ref in read if ref() is None]
    assert not freed, f"{len(freed)} of the {len(read)} time and scale tensors the graph reads were freed"


# On a GPU: the graph replays the eager sampler bit for bit.


def _cuda_net(param, label_dim=LABEL_DIM):
    return make_net(param, dtype=torch.float32, label_dim=label_dim).cuda()


def _cuda_inputs(batch: int, sampler_kind: str, gen: torch.Generator):
    """(noise, labels, the sampler's extra arguments): restart's fresh noise for its 4-step grid."""
    noise = SIGMA_D * torch.randn(batch, DIM, device="cuda", generator=gen)
    labels = torch.randint(0, LABEL_DIM, (batch,), device="cuda", generator=gen)
    if sampler_kind != "restart":
        return noise, labels, {}
    return noise, labels, {"restart_noise": torch.randn(3, batch, DIM, device="cuda", generator=gen)}


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("sampler_kind", ["pushforward", "restart"])
@pytest.mark.parametrize("cfg_scale", [None, 1.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_graphed_replay_equals_eager_bit_for_bit(sampler_kind, cfg_scale, dtype):
    net = make_net("simple_edm", dtype=dtype).cuda()
    grid = time_grid("edm", 4, 0.994, 0.0)
    sampler = GraphedSampler(net, (1, 4, 16), grid, cfg_scale=cfg_scale, dtype=dtype, sampler=sampler_kind)
    assert sampler.graphed
    eager_fn = pushforward if sampler_kind == "pushforward" else restart
    gen = torch.Generator(device="cuda").manual_seed(0)
    for batch in (4, 1, 16, 4):  # new inputs each call, batch sizes interleaved over one memory pool
        noise, labels, extra = _cuda_inputs(batch, sampler_kind, gen)
        out = sampler(noise, labels, **extra)
        expected = eager_fn(net, noise, grid, labels, cfg_scale, dtype=dtype, **extra)
        assert out.dtype == dtype and torch.equal(out, expected)
    assert len(sampler._loops) == 3


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("sampler_kind", ["pushforward", "restart"])
def test_graphed_replay_is_unchanged_by_reuse_of_freed_memory(sampler_kind):
    """Between capture and replay, tensors of the time tensors' size come and go, then every free block
    of the allocator's small pool holds NaN: a graph reading a freed time or scale tensor would read one."""
    net = _cuda_net("simple_edm")
    grid = time_grid("edm", 4, 0.994, 0.0)
    batch = 4
    sampler = GraphedSampler(net, batch, grid, cfg_scale=1.5, sampler=sampler_kind, sample_shape=(DIM,))

    def nan_times() -> torch.Tensor:  # the size of a captured (B,) float64 time
        return torch.full((batch,), math.nan, dtype=torch.float64, device="cuda")

    for _ in range(1000):
        nan_times()
    reserved = torch.cuda.memory_stats()["reserved_bytes.small_pool.current"]
    garbage = []
    while torch.cuda.memory_stats()["reserved_bytes.small_pool.current"] == reserved:  # until a new segment
        garbage.extend(nan_times() for _ in range(256))
    gen = torch.Generator(device="cuda").manual_seed(0)
    noise, labels, extra = _cuda_inputs(batch, sampler_kind, gen)
    out = sampler(noise, labels, **extra)
    expected = (pushforward if sampler_kind == "pushforward" else restart)(net, noise, grid, labels, 1.5, **extra)
    assert torch.equal(out, expected)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_graphed_sampler_zero_copy_output_and_conv_backbone():
    torch.manual_seed(0)
    backbone = ConvBackbone(1, 8, channels=8, num_blocks=1)
    nn.init.normal_(backbone.out.weight, std=0.1)
    net = Preconditioner(backbone).cuda().eval()
    grid = time_grid("uniform", 8, 0.994, 0.0)
    sampler = GraphedSampler(net, 2, grid, sample_shape=(1, 8, 8))
    first_noise, second_noise = SIGMA_D * torch.randn(2, 2, 1, 8, 8, device="cuda")
    first = sampler(first_noise, copy=False)
    kept = first.clone()
    second = sampler(second_noise, copy=False)
    assert second.data_ptr() == first.data_ptr()  # the graph's own output, overwritten by the replay
    assert not torch.equal(second, kept)
    assert torch.equal(second, pushforward(net, second_noise, grid))
    assert torch.equal(sampler(first_noise), kept)


# The CLI.


def test_cli_sample_writes_the_rows_pushforward_gives(tmp_path, capsys):
    from imm_kernels.train.data import save_image_grid
    from imm_kernels.train.evaluation import load_ema_net
    from imm_kernels.train.sampling_helpers import balanced_labels, prior_noise

    run = tmp_path / "digits"
    run_cli(
        capsys,
        *"train --data digits --steps 3 --batch 32 --width 16 --depth 1 --conditional --out".split(),
        str(run),
    )
    out = tmp_path / "grid.png"
    printed = run_cli(
        capsys,
        "sample",
        "--checkpoint",
        str(run),
        *"--steps 1,3 --cfg-scale 1.5 --batch 4 --grid edm --seed 5 --out".split(),
        str(out),
    )
    assert f"samples: {out} (one row per step count)" in printed.out

    # The command samples on the GPU when there is one (a CUDA graph, which equals the eager sampler there).
    net = load_ema_net(run)[0].to("cuda" if CUDA else "cpu")
    noise, labels = prior_noise(net, 4, (1, 8, 8), 5), balanced_labels(net, 4)
    rows = [pushforward(net, noise, time_grid("edm", n, net.T, net.eps), labels, 1.5).cpu() for n in (1, 3)]
    expected = save_image_grid(torch.cat(rows), tmp_path / "expected.png", nrow=4, row_labels=["1 step", "3 steps"])
    assert out.read_bytes() == expected.read_bytes()

    err = cli_fails(capsys, "sample", "--checkpoint", str(run), "--steps", "2", "--grid", "eta", "--out", str(out))
    assert "--grid eta needs --mid-eta" in err
    err = cli_fails(
        capsys,
        "sample",
        "--checkpoint",
        str(run),
        *"--steps 2,4 --grid eta --mid-eta 1.4 --out".split(),
        str(out),
    )
    assert "--mid-eta needs --grid eta and a single step count" in err
    assert "--batch must be >= 1" in cli_fails(
        capsys, "sample", "--checkpoint", str(run), "--batch", "0", "--out", str(out)
    )
    assert "argument --steps: expected step counts" in cli_fails(
        capsys, "sample", "--checkpoint", str(run), "--steps", "0", "--out", str(out)
    )
    assert "argument --sampler: invalid choice" in cli_fails(
        capsys, "sample", "--checkpoint", str(run), "--sampler", "heun", "--out", str(out)
    )
    assert "is not a checkpoint" in cli_fails(
        capsys, "sample", "--checkpoint", str(tmp_path / "none"), "--out", str(out)
    )


def test_cli_sample_restart_on_2d_points_and_the_unconditional_cfg_error(tmp_path, capsys):
    run = tmp_path / "toy"
    run_cli(
        capsys,
        *"train --data toy2d --steps 2 --batch 32 --width 16 --depth 1 --out".split(),
        str(run),
    )
    out = tmp_path / "points.png"
    printed = run_cli(
        capsys,
        "sample",
        "--checkpoint",
        str(run),
        *"--steps 1,2 --sampler restart --batch 200 --out".split(),
        str(out),
    )
    assert "one panel per step count" in printed.out
    from PIL import Image

    assert Image.open(out).size == (2 * 512 + 8, 512)
    err = cli_fails(capsys, "sample", "--checkpoint", str(run), "--cfg-scale", "2", "--out", str(out))
    assert "--cfg-scale needs a conditional checkpoint" in err


def test_cli_bench_sampling_rows_and_what_graphed_means_here(capsys):
    # The tiny model without torch.compile: the GPU defaults (DiT-S/2, compiled) take minutes.
    printed = run_cli(capsys, *"bench-sampling --quick --steps 1 --repeats 1 --model tiny --no-compile".split())
    lines = printed.out.splitlines()
    if CUDA:
        assert "GPU busy" in printed.out and "no GPU" not in printed.out
    else:
        assert "no GPU: GraphedSampler runs the eager sampler here" in printed.out
    rows = [line.split() for line in lines if line.strip() and line.split()[0] == "1"]
    assert [row[:3] for row in rows] == [["1", "1", "-"], ["1", "1", "1.5"]]
    assert all(float(row[3]) > 0 and float(row[4]) > 0 for row in rows)  # eager and graphed milliseconds
    assert "argument --batch: expected batch sizes" in cli_fails(capsys, "bench-sampling", "--batch", "0")


@pytest.mark.skipif(not CUDA, reason="host-sync detection needs a GPU")
@pytest.mark.parametrize("guided", [False, True])
def test_eager_samplers_never_wait_for_the_gpu(guided):
    net = _cuda_net("identity")
    noise = SIGMA_D * torch.randn(4, DIM, device="cuda")
    labels = torch.arange(4, device="cuda") % LABEL_DIM
    fresh = torch.randn(3, 4, DIM, device="cuda")
    grid = time_grid("edm", 4, 0.994, 0.0).tolist()
    cfg_scale = 1.5 if guided else None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync (.item(), a device-to-host copy) raises
    try:
        pushforward(net, noise, grid, labels, cfg_scale)
        restart(net, noise, grid, labels, cfg_scale, restart_noise=fresh)
    finally:
        torch.cuda.set_sync_debug_mode("default")
