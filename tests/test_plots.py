"""Pictures: the training curves and FD-vs-steps figures (imm_kernels.plots), the labelled sample grids and
the scatter plots over the data's density (imm_kernels.train.data, sampling_helpers)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from imm_kernels.plots import (
    CURVE_FILES,
    fd_vs_steps_figure,
    log_events,
    plot_fd_vs_steps,
    plot_training_curves,
    read_log,
    training_curves,
    training_figures,
)
from imm_kernels.train.data import GRID_MIN_SIDE, grid_upscale, save_image_grid, save_scatter_plot
from imm_kernels.train.evaluation import untrained_net
from imm_kernels.train.sampling_helpers import (
    DENSITY_DRAWS,
    SCATTER_EXTENT,
    data_density_points,
    prior_noise,
    pushforward_sample,
    save_points_scatter,
    save_steps_grid,
    step_label,
)
from imm_kernels.train.trainer import DataInfo, TrainConfig

BINS = ("0.000-0.248", "0.248-0.497", "0.497-0.746", "0.746-0.994")


def png_size(path) -> tuple[int, int]:
    """(width, height) of a file that must be a PNG whole enough to decode."""
    with Image.open(path) as png:
        assert png.format == "PNG"
        png.load()
        return png.size


def write_log(path, lines) -> None:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


# A log as the trainer writes it, plus what older logs, events, crashes and non-finite numbers leave.
SYNTHETIC_LOG = [
    {
        "step": 10,
        "loss": 0.5,
        "samples_per_s": 1000.0,
        "loss_by_t": dict(zip(BINS, [1.0, 0.1, 0.01, None])),
        "groups_by_t": dict(zip(BINS, [3, 2, 1, 0])),
    },
    {"step": 20, "loss": None, "samples_per_s": 1100.0},  # a non-finite loss is logged as null; an old log: no bins
    {"step": 25, "event": "skipped", "loss": 99.0, "grad_norm": 1e9},  # one batch's numbers, not a curve point
    {"step": 30, "loss": 0.25, "loss_by_t": dict(zip(BINS, [0.8, 0.08, 0.008, 0.0008])), "fd": 12.5},
    "",
    "[1, 2]",
    {"loss": 7.0},  # no step
    '{"step": 40, "loss": "0.2", "samples_per_s": Infinity, "fd": null}',  # a string, inf and null: no values
    {"step": 45, "event": "diverged", "message": "loss is nan"},
    '{"step": 50, "loss": 0.1',  # cut short by a crash
]


def test_curves_from_a_log_with_missing_null_and_event_lines(tmp_path):
    write_log(tmp_path / "log.jsonl", SYNTHETIC_LOG)
    records = read_log(tmp_path / "log.jsonl")
    assert [r.get("step") for r in records] == [10, 20, 25, 30, None, 40, 45]

    curves = training_curves(records)
    assert curves["loss"] == {"loss": ([10, 30], [0.5, 0.25])}  # null, a string, an event's loss: left out
    assert curves["samples_per_s"] == {"samples/s": ([10, 20], [1000.0, 1100.0])}
    assert curves["fd"] == {"FD (EMA)": ([30], [12.5])}
    assert curves["loss_by_t"] == {
        f"t in {BINS[0]}": ([10, 30], [1.0, 0.8]),
        f"t in {BINS[1]}": ([10, 30], [0.1, 0.08]),
        f"t in {BINS[2]}": ([10, 30], [0.01, 0.008]),
        f"t in {BINS[3]}": ([30], [0.0008]),  # the bin no group fell in at step 10 is a gap
    }
    assert log_events(records) == [(25, "skipped"), (45, "diverged")]

    # A log with only the fields of old runs: the figures without data are absent.
    old = [{"step": 10, "loss": 0.3}, {"step": 20, "loss": 0.2}]
    assert set(training_curves(old)) == {"loss"}
    assert training_curves([{"step": 1, "event": "diverged"}]) == {}


def test_training_figures_draw_the_curves_and_mark_the_events(tmp_path):
    write_log(tmp_path / "log.jsonl", SYNTHETIC_LOG)
    figures = training_figures(read_log(tmp_path / "log.jsonl"))
    assert set(figures) == {"loss", "loss_by_t", "samples_per_s", "fd"}

    loss_axes = figures["loss"].axes[0]
    curve, *event_lines = loss_axes.lines
    assert curve.get_xdata().tolist() == [10, 30] and curve.get_ydata().tolist() == [0.5, 0.25]
    assert [line.get_xdata()[0] for line in event_lines] == [25, 45]
    assert loss_axes.get_yscale() == "linear"  # 0.25 to 0.5: a log axis would only crowd the ticks

    by_t = figures["loss_by_t"].axes[0]
    assert [line.get_label() for line in by_t.lines[: len(BINS)]] == [f"t in {b}" for b in BINS]
    assert by_t.get_yscale() == "log"  # 0.0008 to 1: three decades
    throughput = figures["samples_per_s"].axes[0].lines[0]
    assert throughput.get_ydata().tolist() == [1000.0, 1100.0]


def test_plot_training_curves_writes_pngs_only_for_the_curves_with_data(tmp_path):
    write_log(tmp_path / "log.jsonl", SYNTHETIC_LOG)
    written = plot_training_curves(read_log(tmp_path / "log.jsonl"), tmp_path / "plots")
    assert written == {name: tmp_path / "plots" / file for name, file in CURVE_FILES.items()}
    for path in written.values():
        width, height = png_size(path)
        assert 500 <= width <= 1000 and 300 <= height <= 800

    old = [{"step": 10, "loss": 0.3, "samples_per_s": 50.0}, {"step": 20, "loss": 0.2, "samples_per_s": 60.0}]
    written = plot_training_curves(old, tmp_path / "old")
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["loss.png", "throughput.png"]
    assert set(written) == {"loss", "samples_per_s"}


def test_fd_vs_steps_draws_the_values_it_is_given(tmp_path):
    series = {
        "M=4": ([1, 2, 4, 8, 16], [30.0, 14.5, 11.0, 10.2, 10.1], [2.0, 1.0, 0.5, 0.5, 0.4]),
        "M=1": ([1, 2, 4], [45.0, 30.0, float("nan")], None),
    }
    figure = fd_vs_steps_figure(series)
    axes = figure.axes[0]
    drawn = {line.get_label(): line.get_xydata().tolist() for line in axes.lines}
    assert drawn["M=4"] == [[1, 30.0], [2, 14.5], [4, 11.0], [8, 10.2], [16, 10.1]]
    assert drawn["M=1"][:2] == [[1, 45.0], [2, 30.0]] and np.isnan(drawn["M=1"][2][1])
    assert len(axes.collections) == 1  # the ±err band of the one series that has errors
    band = axes.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == pytest.approx(10.1 - 0.4) and band[:, 1].max() == pytest.approx(30.0 + 2.0)
    assert [tick.get_text() for tick in axes.get_xticklabels()] == ["1", "2", "4", "8", "16"]

    path = plot_fd_vs_steps(series, tmp_path / "deep" / "fd.png")
    assert path == tmp_path / "deep" / "fd.png" and 500 <= png_size(path)[0] <= 1000
    with pytest.raises(ValueError, match="one value per step count"):
        fd_vs_steps_figure({"x": ([1, 2], [1.0], None)})


# Sample grids.


def test_grid_upscale_makes_small_images_plainly_visible():
    assert GRID_MIN_SIDE >= 64
    assert grid_upscale(8, 8) * 8 >= GRID_MIN_SIDE and grid_upscale(8, 8) == 8
    assert grid_upscale(32, 32) == 2 and grid_upscale(5, 7) == 10 and grid_upscale(256, 256) == 1


def test_image_grid_row_labels_sit_in_a_margin_beside_their_rows(tmp_path):
    images = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    plain = np.asarray(Image.open(save_image_grid(images, tmp_path / "plain.png", nrow=3)))
    labelled = np.asarray(
        Image.open(save_image_grid(images, tmp_path / "labelled.png", nrow=3, row_labels=["1 step", "16 steps"]))
    )
    cell = 8 * grid_upscale(8, 8)
    assert plain.shape == (2 * (cell + 2) + 2, 3 * (cell + 2) + 2)
    margin = labelled.shape[1] - plain.shape[1]
    assert labelled.shape[0] == plain.shape[0] and 20 <= margin <= 200
    assert (labelled[:, margin:] == plain).all()  # the images themselves are untouched
    ink_rows, ink_cols = np.nonzero(labelled[:, :margin] < 128)
    in_rows = [(ink_rows >= top) & (ink_rows < top + cell) for top in (2, cell + 4)]
    assert (in_rows[0] | in_rows[1]).all()  # every label pixel beside a row of images
    for row, in_row in enumerate(in_rows):  # each label centred on its row
        assert in_row.sum() > 20 and abs(ink_rows[in_row].mean() - (2 + row * (cell + 2) + cell / 2)) < 6
    assert ink_cols[in_rows[1]].max() > ink_cols[in_rows[0]].max() + 10  # "16 steps" is longer than "1 step"

    rgb = save_image_grid(torch.zeros(2, 3, 8, 8), tmp_path / "rgb.png", nrow=1, row_labels=["a", "b"])
    assert Image.open(rgb).mode == "RGB"
    for bad in (["only one"], "ab", ["a", 2]):
        with pytest.raises(ValueError, match="row_labels must be 2 strings"):
            save_image_grid(images, tmp_path / "bad.png", nrow=3, row_labels=bad)


@pytest.fixture(scope="module")
def digits_net():
    return untrained_net(TrainConfig(width=16, depth=1, sigma_data=0.5), DataInfo("digits", "image", (1, 8, 8), 0))


def test_steps_grid_is_one_labelled_row_per_step_count_from_the_same_noise(tmp_path, digits_net):
    path = save_steps_grid(digits_net, tmp_path / "grid.png", (1, 8, 8), steps=(1, 3), per_row=4, seed=2)
    noise = prior_noise(digits_net, 4, (1, 8, 8), 2)
    rows = [pushforward_sample(digits_net, noise, n, None) for n in (1, 3)]
    expected = save_image_grid(torch.cat(rows), tmp_path / "expected.png", nrow=4, row_labels=["1 step", "3 steps"])
    assert path.read_bytes() == expected.read_bytes()
    assert step_label(1) == "1 step" and step_label(16) == "16 steps"


# Scatter plots over the data's density.


def pixel(value_x: float, value_y: float, extent: float, size: int) -> tuple[int, int]:
    """(row, col) of the point (x, y) in a scatter plot; y grows upwards."""
    return round((1 - value_y / extent) * (size - 2) / 2), round((value_x / extent + 1) * (size - 2) / 2)


def test_scatter_background_shades_where_the_data_are(tmp_path):
    gen = torch.Generator().manual_seed(0)
    # Data in the square [0.2, 0.8]², three times denser in its left half than its right.
    left = torch.rand(30000, 2, generator=gen) * torch.tensor([0.3, 0.6]) + 0.2
    right = torch.rand(10000, 2, generator=gen) * torch.tensor([0.3, 0.6]) + torch.tensor([0.5, 0.2])
    sample = torch.tensor([[-0.5, -0.5]])
    path = save_scatter_plot(sample, tmp_path / "s.png", extent=1.0, size=128, background=torch.cat([left, right]))
    canvas = np.asarray(Image.open(path)).astype(int)
    dense, sparse = canvas[pixel(0.35, 0.5, 1, 128)], canvas[pixel(0.65, 0.5, 1, 128)]
    assert 170 <= dense < sparse < 255  # grey where the data are, darker where they are denser
    assert canvas[pixel(-0.5, 0.5, 1, 128)] == 255 and canvas[pixel(0.5, -0.5, 1, 128)] == 255
    assert canvas[pixel(-0.5, -0.5, 1, 128)] < 100  # the sample point, drawn over everything

    plain = np.asarray(Image.open(save_scatter_plot(sample, tmp_path / "p.png", extent=1.0, size=128)))
    assert plain[pixel(0.35, 0.5, 1, 128)] == 255
    with pytest.raises(ValueError, match=r"background must be an \(N, 2\)"):
        save_scatter_plot(sample, tmp_path / "bad.png", background=torch.zeros(5, 3))


def test_scatter_label_is_written_in_the_top_left_corner(tmp_path):
    far = torch.tensor([[0.9, -0.9]])
    plain = np.asarray(Image.open(save_scatter_plot(far, tmp_path / "a.png", extent=1.0, size=256)))
    labelled = np.asarray(Image.open(save_scatter_plot(far, tmp_path / "b.png", extent=1.0, size=256, label="4 steps")))
    assert (plain[:30, :100] > 128).all() and (labelled[:30, :100] < 128).sum() > 20
    assert (plain[40:] == labelled[40:]).all()


def test_toy_density_points_are_the_toy_and_nothing_else():
    checkerboard = data_density_points("toy2d:checkerboard")
    assert checkerboard.shape == (DENSITY_DRAWS, 2)
    # In the data's units (std 1 per coordinate, squares of side 1 / 1.1547): (0.43, 0.43) is in an
    # occupied square, (0.43, -0.43) in an empty one.
    near = lambda x, y: ((checkerboard - torch.tensor([x, y])).abs().max(1).values < 0.1).sum()  # noqa: E731
    assert near(0.43, 0.43) > 1000 and near(0.43, -0.43) == 0
    assert data_density_points("8gaussians").shape == (DENSITY_DRAWS, 2)
    assert data_density_points("digits") is None and data_density_points(None) is None
    assert data_density_points("/data/points.npy") is None


def test_points_scatter_of_a_toy_run_is_drawn_over_its_density(tmp_path):
    net = untrained_net(
        TrainConfig(data="toy2d", width=16, depth=1, sigma_data=1.0), DataInfo("toy2d:checkerboard", "vector", (2,), 0)
    )
    with_density = save_points_scatter(net, tmp_path / "d.png", 2, num_points=10, data_name="toy2d:checkerboard")
    without = save_points_scatter(net, tmp_path / "n.png", 2, num_points=10)
    shaded, plain = np.asarray(Image.open(with_density)), np.asarray(Image.open(without))
    occupied, empty = pixel(0.43, 0.43, SCATTER_EXTENT, 512), pixel(0.43, -0.43, SCATTER_EXTENT, 512)
    assert 170 <= shaded[occupied] < 250 and shaded[empty] == 255 and plain[occupied] == 255
    assert (plain[:30, :100] < 128).sum() > 20  # "2 steps"
