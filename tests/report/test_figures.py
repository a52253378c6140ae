"""Report figures on tiny synthetic inputs: files written, and the numbers behind the pictures."""

import csv
import math
from dataclasses import dataclass
from types import SimpleNamespace

import matplotlib.image
import numpy as np
import pytest
import xarray as xr
from matplotlib.container import ErrorbarContainer
from matplotlib.patches import Rectangle
from matplotlib.text import Text

from smoe.core.errors import InputError
from smoe.core.report import figures as S
from smoe.families.heat import figures as F
from smoe.families.heat import kernel_figure as K
from smoe.families.heat import prediction_figure as P
from smoe.families.heat.mask import generate_mask
from smoe.families.heat.metrics import ATOL

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A 6 x 5 region map with 3 types, and a router that learned it under a permuted numbering.
MASK = np.array(
    [
        [0, 0, 1, 1, 2],
        [0, 0, 1, 2, 2],
        [0, 1, 1, 2, 2],
        [1, 1, 0, 0, 2],
        [2, 1, 0, 0, 1],
        [2, 2, 2, 0, 1],
    ]
)
EXPERT_TO_TYPE = {"0": 2, "1": 0, "2": 1}
TYPE_TO_EXPERT = np.array([1, 2, 0])
WRONG = [(0, 0), (2, 3), (5, 4)]  # cells whose majority expert is wrong


def stencil(a):
    return [[0.0, a, 0.0], [a, 1.0 - 4.0 * a, a], [0.0, a, 0.0]]


STENCILS = np.array([stencil(a) for a in (0.0025, 0.025, 0.25)])


def expert_map():
    experts = TYPE_TO_EXPERT[MASK].copy()
    for r, c in WRONG:
        experts[r, c] = (experts[r, c] + 1) % 3
    return experts


def smoe_result(seed=0, experts=3, noise=1e-3):
    """A metrics dict like ``smoe evaluate`` writes, for an SMoE model."""
    rng = np.random.default_rng(seed)
    matching = {e: t for e, t in EXPERT_TO_TYPE.items() if int(e) < experts}
    kernels = np.zeros((experts, 3, 3))
    for e, t in matching.items():
        kernels[int(e)] = STENCILS[t]
    kernels += rng.uniform(-noise, noise, kernels.shape)
    return {
        "model": "smoe",
        "kind": "smoe",
        "seed": seed,
        "metrics": {"prcntclose1.0": 99.0 - seed, "prcntclose1.0s": 99.5, "nrmse": 1e-6},
        "routing": {
            "agreement": 90.0,
            "map_agreement": 90.0,
            "expert_to_type": matching,
            "map": expert_map().tolist(),
            "kernels": kernels.tolist(),
            "stencils": STENCILS.tolist(),
            "kernel_max_abs_error": noise,
        },
    }


def baseline_result(model="cnn", seed=0, close=30.0):
    return {
        "model": model,
        "kind": model,
        "seed": seed,
        "metrics": {"prcntclose1.0": close, "prcntclose1.0s": close / 2, "nrmse": 0.05},
        "routing": None,
    }


def assert_figure(paths, folder):
    """Both files exist, are what they claim, and nothing partial is left beside them."""
    png, svg = paths
    assert png.suffix == ".png" and svg.suffix == ".svg" and png.stem == svg.stem
    assert png.read_bytes()[:8] == PNG_MAGIC
    height, width = matplotlib.image.imread(png).shape[:2]
    assert height > 150 and width > 300
    text = svg.read_text()
    assert text.startswith("<?xml") and "<svg" in text and text.rstrip().endswith("</svg>")
    assert not [p for p in folder.rglob("*") if "partial" in p.name]


@dataclass
class Panel:
    """What a test needs of one drawn axes."""

    title: str
    xlabel: str
    yscale: str
    ylim: tuple[float, float]
    rectangles: int  # bars
    errorbars: list[int]  # data points of each error bar set
    caps: int  # error bar caps drawn (Line2D markers of ErrorbarContainers)
    markers: list[str]  # markers of the plotted lines (points, seed dots)


@dataclass
class Drawn:
    """A figure as save_figure got it, after its layout: the texts and the panels."""

    size: tuple[float, float]
    suptitle: str
    texts: list[str]
    axes: list[Panel]

    @property
    def titles(self) -> list[str]:
        return [ax.title for ax in self.axes]


def snapshot(fig) -> Drawn:
    axes = []
    for ax in fig.axes:
        errorbars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        axes.append(
            Panel(
                title=ax.get_title(),
                xlabel=ax.get_xlabel(),
                yscale=ax.get_yscale(),
                ylim=tuple(float(v) for v in ax.get_ylim()),
                rectangles=sum(isinstance(p, Rectangle) for p in ax.patches),
                errorbars=[len(c.lines[2][0].get_segments()) for c in errorbars],
                caps=sum(len(c.lines[1]) for c in errorbars),
                markers=[str(line.get_marker()) for line in ax.lines],
            )
        )
    return Drawn(
        size=tuple(fig.get_size_inches()),
        suptitle=fig._suptitle.get_text() if fig._suptitle else "",
        texts=[t.get_text() for t in fig.findobj(Text) if t.get_text()],
        axes=axes,
    )


@pytest.fixture
def drawn(monkeypatch):
    """Every figure the test saves, laid out and snapshotted just before it is written.

    Each must lie inside its canvas: no title, label or legend cut off at an edge.
    """
    figures = []
    save = S.save_figure

    def checked(fig, out):
        S.fix_layout(fig)  # what save_figure does first; it keeps this layout
        box = fig.get_tightbbox(fig.canvas.get_renderer())
        width, height = fig.get_size_inches()
        slack = 1 / S.DPI  # one pixel
        assert box.x0 >= -slack and box.y0 >= -slack, f"clipped at the left/bottom: {box}"
        assert box.x1 <= width + slack and box.y1 <= height + slack, (
            f"clipped at the right/top: {box} in a {width:.2f} x {height:.2f} in figure"
        )
        figures.append(snapshot(fig))
        return save(fig, out)

    for module in (F, P, K):  # every heat figure module saves through the core's save_figure
        monkeypatch.setattr(module, "save_figure", checked)
    return figures


# --- saving -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("out", "name"),
    [("fig", "fig"), ("fig.png", "fig"), ("fig.svg", "fig"), ("fig.seed0", "fig.seed0")],
)
def test_figure_paths_drop_only_image_suffixes(tmp_path, out, name):
    png, svg = S.figure_paths(tmp_path / out)
    assert (png, svg) == (tmp_path / f"{name}.png", tmp_path / f"{name}.svg")


def test_save_figure_creates_folders_and_is_reproducible(tmp_path):
    def draw(out):
        fig = S.new_figure(4, 3)
        fig.subplots().plot([0, 1], [1, 0])
        return S.save_figure(fig, out)

    first = draw(tmp_path / "a" / "b" / "line.png")
    assert_figure(first, tmp_path)
    svg = first[1].read_bytes()
    draw(tmp_path / "a" / "b" / "line")
    assert first[1].read_bytes() == svg
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["line.png", "line.svg"]


def test_png_size_and_the_viewer_limit(tmp_path):
    def png(width, height):
        fig = S.new_figure(width, height)
        fig.subplots().plot([0, 1], [1, 0])
        return S.save_figure(fig, tmp_path / f"{width}x{height}")[0]

    assert S.png_size(png(8, 4)) == (1200, 600)
    assert S.fits_report_viewer(png(8, 4))  # ratio 0.5, 600 px
    assert not S.fits_report_viewer(png(8, 6))  # ratio 0.75 and 900 px: too tall for its width
    assert S.fits_report_viewer(png(4, 3))  # ratio 0.75 but 450 px: shown at natural size
    assert not S.fits_report_viewer(png(14, 7))  # ratio 0.5 but 1050 px high
    (tmp_path / "fake.png").write_bytes(b"GIF89a" + bytes(30))
    with pytest.raises(InputError, match="not a PNG"):
        S.png_size(tmp_path / "fake.png")


@pytest.mark.parametrize("size", [(4, 3), (30, 8), (6, 20), (20, 20), (1, 1), (11, 6)])
def test_viewer_size_stays_inside_the_limits(size):
    width, height = S.viewer_size(*size)
    assert height <= S.MAX_HEIGHT + 1e-9 and width <= S.MAX_WIDTH + 1e-9
    assert height <= S.MAX_RATIO * width + 1e-9
    assert height <= size[1] + 1e-9  # never made taller


# --- routing ------------------------------------------------------------------------------


def test_expert_map_translates_to_types_through_the_matching():
    types = F.expert_types(TYPE_TO_EXPERT[MASK], EXPERT_TO_TYPE)
    np.testing.assert_array_equal(types, MASK)
    # an expert the matching left out becomes -1
    lone = F.expert_types(np.array([[3, 0]]), EXPERT_TO_TYPE)
    np.testing.assert_array_equal(lone, [[-1, 2]])


def test_misrouted_cells_are_exactly_the_wrong_ones():
    wrong = F.misrouted_cells(expert_map(), EXPERT_TO_TYPE, MASK)
    expected = np.zeros(MASK.shape, dtype=bool)
    expected[tuple(np.array(WRONG).T)] = True
    np.testing.assert_array_equal(wrong, expected)
    with pytest.raises(ValueError, match="differ"):
        F.misrouted_cells(expert_map()[:, :4], EXPERT_TO_TYPE, MASK)


def test_marked_cells_sit_on_the_misrouted_cells():
    cells = F.misrouted_cells(expert_map(), EXPERT_TO_TYPE, MASK)
    fig = S.new_figure(3, 3)
    ax = fig.subplots()
    F.mark_cells(ax, cells)
    (collection,) = ax.collections
    corners = sorted(
        tuple(np.round(path.vertices.min(axis=0) + 0.5).astype(int)[::-1])
        for path in collection.get_paths()
    )
    assert corners == sorted(WRONG)  # (row, column) of every marked cell, nothing else


def test_routing_figure(tmp_path):
    runs = [smoe_result(0), baseline_result(), smoe_result(1)]
    paths = F.routing_figure(MASK, runs, tmp_path / "routing")
    assert_figure(paths, tmp_path)
    assert [r["seed"] for r in F.routing_runs(runs)] == [0, 1]


# --- predictions --------------------------------------------------------------------------


def truth(runs=2, times=7, height=6, width=5):
    rng = np.random.default_rng(0)
    return rng.uniform(0.1, 1.0, (runs, times, height, width)).astype(np.float32)


def write_predictions(path, model, first, noise, seed=0):
    """A file in ``smoe evaluate --predictions`` layout; predicted steps start at ``first``."""
    u = truth()
    times = np.arange(first, u.shape[1])
    rng = np.random.default_rng(len(model))
    frames = u[:, first:]
    prediction = frames + rng.normal(0, noise, frames.shape).astype(np.float32)
    ds = xr.Dataset(
        {
            "prediction": (("run", "time", "y", "x"), prediction),
            "u": (("run", "time", "y", "x"), frames),
            "mask": (("y", "x"), MASK.astype(np.int8)),
            "diffusivity": (("region",), np.array([0.0025, 0.025, 0.25])),
        },
        coords={
            "run": np.arange(u.shape[0]),
            "time": times,
            "y": np.arange(u.shape[2]),
            "x": np.arange(u.shape[3]),
            "region": np.arange(3),
        },
        attrs={"model": model, "seed": seed},
    )
    ds.to_netcdf(path)
    return path


@pytest.fixture
def prediction_files(tmp_path):
    # context 1 predicts steps 1..6, context 2 predicts steps 2..6
    return [
        write_predictions(tmp_path / "cnn.nc", "cnn", first=1, noise=0.05),
        write_predictions(tmp_path / "smoe.nc", "smoe", first=2, noise=1e-4, seed=3),
    ]


def open_all(files):
    return [xr.load_dataset(f) for f in files]


def test_every_model_shows_the_same_sample(prediction_files):
    u = truth()
    datasets = open_all(prediction_files)
    samples = P.select_samples(datasets, run=1)
    assert [s.model for s in samples] == ["cnn", "smoe"]
    assert {(s.run, s.time) for s in samples} == {(1, 4)}  # middle of the shared steps 2..6
    for sample, ds in zip(samples, datasets, strict=True):
        np.testing.assert_array_equal(sample.target, u[1, 4])
        np.testing.assert_array_equal(sample.input, u[1, 3])
        np.testing.assert_array_equal(sample.prediction, ds["prediction"].sel(run=1, time=4))


def test_sample_input_comes_from_any_file_and_steps_must_be_shared(prediction_files):
    u = truth()
    cnn, smoe = open_all(prediction_files)
    # step 2's input (step 1) is only in the cnn file
    samples = P.select_samples([smoe, cnn], run=0, time=2)
    np.testing.assert_array_equal(samples[0].input, u[0, 1])
    assert P.select_samples([smoe], run=0, time=2)[0].input is None
    with pytest.raises(ValueError, match="smoe.*time step 1"):
        P.select_samples([cnn, smoe], run=0, time=1)
    with pytest.raises(ValueError, match="run 5"):
        P.select_samples([cnn], run=5)


def test_sample_close_matches_the_metric_definition(prediction_files):
    (sample,) = P.select_samples(open_all(prediction_files[:1]), run=0, time=3)
    d, y = sample.prediction - sample.target, sample.target
    expected = 100 * np.mean(np.abs(d) <= ATOL + 0.01 * np.abs(y))
    assert sample.close == pytest.approx(expected)
    assert 0 < sample.close < 100


def test_error_limit_is_shared_and_symmetric(prediction_files):
    samples = P.select_samples(open_all(prediction_files), run=0)
    pooled = np.concatenate([np.abs(s.error).ravel() for s in samples])
    assert P.error_limit(samples) == pytest.approx(np.percentile(pooled, 99))


def test_predictions_figure(tmp_path, prediction_files, drawn):
    paths = P.predictions_figure(prediction_files, tmp_path / "out" / "predictions.svg", run=1)
    assert_figure(paths, tmp_path)
    (figure,) = drawn
    samples = P.select_samples(open_all(prediction_files), run=1)
    # models are columns: each prediction says its frame-level number is of this sample
    labels = [ax.xlabel for ax in figure.axes if ax.xlabel.startswith("this sample")]
    assert labels == [P.sample_label(s) for s in samples]
    assert all(
        f"{s.close:.1f} % within 1 %" in label for s, label in zip(samples, labels, strict=True)
    )
    assert {"cnn seed 0", "smoe seed 3"} <= set(figure.titles)  # seeds differ: named
    assert "one test sample" in figure.suptitle


@pytest.mark.parametrize("models", range(1, 21))
def test_prediction_layout_stays_in_the_viewer(models):
    layout = P.prediction_layout(models)
    width, height = layout.size
    assert height <= S.MAX_RATIO * width + 1e-9 and height <= S.MAX_HEIGHT + 1e-9
    assert width <= S.MAX_WIDTH + 1e-9
    assert layout.bands * layout.per_band >= models > (layout.bands - 1) * layout.per_band
    assert layout.side > 0.4
    if models <= 8:  # one row of models: the figure is wide, not tall
        assert layout.bands == 1


def test_sample_label_never_rounds_to_a_whole_hundred():
    def label(close):
        return P.sample_label(SimpleNamespace(close=close))

    assert label(95.94) == "this sample:\n95.9 % within 1 %"
    assert label(99.97) == "this sample:\n> 99.9 % within 1 %"
    assert label(100.0) == "this sample:\n100.0 % within 1 %"
    assert label(0.01) == "this sample:\n< 0.1 % within 1 %"


# --- learning curves ----------------------------------------------------------------------


def write_history(path, columns, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def test_learning_curves_figure(tmp_path):
    trained = ["epoch", "train_loss", "val_mse", "val_prcntclose1.0", "lr", "time_s"]
    paths = [
        write_history(
            tmp_path / "models" / "smoe" / f"seed{seed}" / "history.csv",
            trained,
            [[e, 10.0 ** -(e + seed), 1e-3, 50 + 10 * e, 0.01, e] for e in range(4)],
        )
        for seed in range(2)
    ]
    paths.append(
        write_history(
            tmp_path / "models" / "persistence" / "seed0" / "history.csv",
            ["epoch", "val_mse", "val_prcntclose1.0"],
            [[0, 1e-3, 87.5]],
        )
    )
    histories = F.load_histories(paths)
    assert histories == {"smoe": paths[:2], "persistence": paths[2:]}
    columns = F.read_history(paths[0])
    np.testing.assert_allclose(columns["train_loss"], [1, 0.1, 0.01, 0.001])
    out = F.learning_curves_figure(histories, tmp_path / "figs" / "curves")
    assert_figure(out, tmp_path)


# --- metric bars --------------------------------------------------------------------------


def test_metric_stats_equal_numpy():
    closes = [20.0, 35.0, 41.0]
    summary = [baseline_result("cnn", s, c) for s, c in enumerate(closes)]
    summary += [smoe_result(0), baseline_result("lcn", 0, 70.0), baseline_result("lcn", 1, 80.0)]
    summary[-1]["metrics"]["nrmse"] = math.nan  # a missing value is left out
    stats = F.metric_stats(summary, ("prcntclose1.0", "nrmse", "absent"))
    assert list(stats) == ["cnn", "smoe", "lcn"]
    cnn = stats["cnn"]["prcntclose1.0"]
    assert cnn.mean == pytest.approx(np.mean(closes))
    assert cnn.std == pytest.approx(np.std(closes, ddof=1))
    assert cnn.n == 3
    assert stats["smoe"]["prcntclose1.0"] == F.Stat(99.0, 0.0, 1)
    assert stats["lcn"]["nrmse"] == F.Stat(0.05, 0.0, 1)
    assert math.isnan(stats["lcn"]["absent"].mean) and stats["lcn"]["absent"].n == 0


def test_metric_bars_figure(tmp_path, drawn):
    summary = [baseline_result("cnn", s, 20.0 + s) for s in range(3)]
    summary += [smoe_result(s) for s in range(2)] + [baseline_result("persistence", 0, 87.0)]
    paths = F.metric_bars_figure(summary, tmp_path / "bars.png")
    assert_figure(paths, tmp_path)
    (figure,) = drawn
    # seeds per model 3, 2 and 1: error bars for cnn and smoe only
    assert "mean ± std over 1-3 seeds" in figure.suptitle
    close, _, nrmse = figure.axes
    assert close.errorbars == [2]
    assert close.rectangles == 3 and close.ylim == (0, 100)


def test_one_seed_bars_have_no_error_bars(tmp_path, drawn):
    summary = [baseline_result("cnn", 0, 40.0), smoe_result(0), baseline_result("lcn", 0)]
    F.metric_bars_figure(summary, tmp_path / "bars")
    (figure,) = drawn
    assert "one seed" in figure.suptitle and "±" not in figure.suptitle
    for ax in figure.axes:
        assert ax.errorbars == [] and ax.caps == 0


def test_several_seeds_bars_show_mean_seeds_and_std(tmp_path, drawn):
    summary = [
        baseline_result(m, s, c + s) for m, c in (("cnn", 30), ("lcn", 70)) for s in range(3)
    ]
    summary += [smoe_result(s) for s in range(3)]
    F.metric_bars_figure(summary, tmp_path / "bars")
    (figure,) = drawn
    assert "mean ± std over 3 seeds" in figure.suptitle
    close, scaled, nrmse = figure.axes
    for ax in (close, scaled):  # percentages: bars on a linear 0-100 axis
        assert ax.yscale == "linear" and ax.ylim == (0, 100)
        assert ax.rectangles == 3 and ax.errorbars == [3]
        assert ax.markers.count(".") == 3  # each model's seeds as dots
    # nrmse spans decades (1e-6 against 0.05): points on a log axis, no bars
    assert nrmse.yscale == "log" and nrmse.rectangles == 0
    assert nrmse.markers.count("o") == 3 and nrmse.errorbars == [3]
    assert nrmse.title == "nrmse"


def test_a_metric_no_result_has_is_drawn_as_not_available(tmp_path, drawn):
    summary = [baseline_result("cnn", 0), smoe_result(0)]
    F.metric_bars_figure(summary, tmp_path / "bars", metrics=("prcntclose1.0", "absent"))
    (figure,) = drawn
    assert figure.texts.count("n/a") == 2  # both models, above the empty panel
    assert figure.axes[1].rectangles == 2 and figure.axes[1].ylim[0] == 0


def test_metric_scales_and_region_type_labels(tmp_path, drawn):
    assert F.metric_scale("prcntclose1.0", [3.0, 99.0]) == "percent"
    assert F.metric_scale("mask2-prcntclose1.0s") == "percent"
    assert F.metric_scale("nrmse", [0.01, 0.02]) == "log"
    assert F.metric_scale("mask0-mse", [1e-3]) == "log"
    assert F.metric_scale("time_s", [1.0, 500.0]) == "log"  # spans decades
    assert F.metric_scale("time_s", [1.0, 5.0]) == "linear"
    assert F.metric_label("mask1-prcntclose1.0") == "type 1 prcntclose1.0"
    summary = [smoe_result(0), baseline_result("cnn", 0)]
    for result in summary:
        result["metrics"].update({"mask0-prcntclose1.0": 50.0, "mask1-nrmse": 0.1})
    F.metric_bars_figure(summary, tmp_path / "bars", metrics=("mask0-prcntclose1.0", "mask1-nrmse"))
    (figure,) = drawn
    assert [ax.title for ax in figure.axes] == ["type 0 prcntclose1.0", "type 1 nrmse"]
    assert not [text for text in figure.texts if "mask" in text]


# --- kernels ------------------------------------------------------------------------------


def test_each_expert_is_paired_with_its_matched_stencil():
    result = smoe_result(0, experts=3, noise=1e-3)
    pairs = K.kernel_pairs(result["routing"])
    assert [(p.expert, p.region) for p in pairs] == [(0, 2), (1, 0), (2, 1)]
    for pair in pairs:
        np.testing.assert_array_equal(pair.stencil, STENCILS[EXPERT_TO_TYPE[str(pair.expert)]])
        assert pair.error == pytest.approx(np.abs(pair.kernel - pair.stencil).max())
        assert pair.error < 1e-3  # the permuted pairing is the right one


def test_unmatched_expert_has_no_stencil():
    result = smoe_result(0)
    routing = result["routing"]
    routing["kernels"].append(np.eye(3).tolist())  # a fourth expert, left unmatched
    last = K.kernel_pairs(routing)[-1]
    assert (last.expert, last.region, last.stencil) == (3, None, None)
    assert math.isnan(last.error)


def test_kernel_table_aligns_experts_under_their_types():
    spare = smoe_result(1)
    spare["routing"]["kernels"].append(np.eye(3).tolist())  # a fourth expert, unmatched
    table = K.kernel_table([smoe_result(0), spare])
    assert table.column_labels == ["type 0", "type 1", "type 2", "unmatched"]
    assert table.row_labels[0] == "true stencil"
    assert table.row_labels[1].startswith("smoe seed 0\nmax |err|")
    true, first, second = table.cells
    for t in range(3):  # each column: a type's stencil above the kernel matched to it
        np.testing.assert_array_equal(true[t].values, STENCILS[t])
        expert = int(TYPE_TO_EXPERT[t])
        np.testing.assert_array_equal(first[t].values, smoe_result(0)["routing"]["kernels"][expert])
        assert first[t].title.startswith(f"expert {expert}: |err|")
    assert true[3].values is None and first[3].values is None
    np.testing.assert_array_equal(second[3].values, np.eye(3))
    assert second[3].title == "expert 3"
    other = smoe_result(2)
    other["routing"]["stencils"] = (2 * STENCILS).tolist()
    with pytest.raises(InputError, match="different true stencils"):
        K.kernel_table([smoe_result(0), other])


def test_kernels_figure(tmp_path, drawn):
    runs = [smoe_result(0), baseline_result(), smoe_result(1)]
    assert_figure(K.kernels_figure(runs, tmp_path / "kernels"), tmp_path)
    (figure,) = drawn
    assert len(figure.axes) == 3 * 3  # true stencils and two runs, three types


# --- figures that cannot be drawn ----------------------------------------------------------


def test_figures_without_anything_to_draw_are_errors_not_placeholders(tmp_path):
    baselines = [baseline_result("cnn"), baseline_result("lcn", 1)]
    with pytest.raises(InputError, match=r"routing figure: none of the results cnn seed 0, lcn"):
        F.routing_figure(MASK, baselines, tmp_path / "routing")
    with pytest.raises(InputError, match=r"none of the metrics files 'a.json', 'b.json'"):
        K.kernels_figure(baselines, tmp_path / "kernels", sources=["a.json", "b.json"])
    no_kernels = smoe_result(0)
    del no_kernels["routing"]["kernels"]  # an SMoE whose experts are not 3x3
    with pytest.raises(InputError, match="3x3"):
        K.kernels_figure([no_kernels], tmp_path / "kernels")
    with pytest.raises(InputError, match="no history files"):
        F.learning_curves_figure({}, tmp_path / "curves")
    with pytest.raises(InputError, match=r"metric bars: none of the metrics files 'a.json' has"):
        F.metric_bars_figure([{"model": "x", "metrics": {}}], tmp_path / "bars", sources=["a.json"])
    assert list(tmp_path.iterdir()) == []


def test_malformed_routing_and_histories_are_named(tmp_path):
    broken = smoe_result(0)
    del broken["routing"]["expert_to_type"]
    with pytest.raises(InputError, match=r"metrics 'x.json': the routing section lacks"):
        F.routing_figure(MASK, [broken], tmp_path / "routing", sources=["x.json"])
    with pytest.raises(InputError, match=r"routing map of smoe seed 0 is 6x5 but the region"):
        F.routing_figure(MASK[:4], [smoe_result(0)], tmp_path / "routing")
    empty = write_history(tmp_path / "m" / "seed0" / "history.csv", ["epoch", "train_loss"], [])
    with pytest.raises(InputError, match="has no rows"):
        F.learning_curves_figure(F.load_histories([empty]), tmp_path / "curves")
    words = write_history(tmp_path / "w.csv", ["epoch", "train_loss"], [[0, "lots"]])
    with pytest.raises(InputError, match=r"w.csv', line 2, column 'train_loss': 'lots'"):
        F.read_history(words)
    no_epoch = write_history(tmp_path / "e.csv", ["step", "train_loss"], [[0, 1.0]])
    with pytest.raises(InputError, match="no 'epoch' column"):
        F.read_history(no_epoch)
    nothing = write_history(tmp_path / "n.csv", ["epoch", "lr"], [[0, 0.1]])
    with pytest.raises(InputError, match="has none of the columns"):
        F.learning_curves_figure({"n": [nothing]}, tmp_path / "curves")
    with pytest.raises(InputError, match="does not exist"):
        F.read_history(tmp_path / "absent.csv")
    assert not list(tmp_path.glob("*.png"))


# --- every figure whole in the report viewer ----------------------------------------------

DEFAULT_MODELS = ("persistence", "stencil", "generator", "cnn", "lcn", "coordconv", "smoe")
PAPER_MODELS = (
    *("persistence", "stencil", "generator", "cnn", "lcn", "coordconv"),
    *("condconv", "convlcn", "mlp", "smoe-fixed", "smoe"),
)
SETUPS = {  # config/config.yaml and config/paper.yaml
    "7 models, 1 seed": (DEFAULT_MODELS, 1),
    "11 models, 3 seeds": (PAPER_MODELS, 3),
}
GRID = 64  # the configs' 64 x 64 map with 3 region types
PAPER_MASK = generate_mask(GRID, GRID, 3, 42)


def realistic_metrics(models, seeds):
    """Metrics like smoe evaluate writes them for every model and seed of a config."""
    rng = np.random.default_rng(len(models) * 10 + seeds)
    results = []
    for model in models:
        for seed in range(seeds):
            if model.startswith("smoe"):
                result = smoe_result(seed)
                result["model"] = model
                routing = result["routing"]
                experts = TYPE_TO_EXPERT[PAPER_MASK]
                wrong = rng.random(PAPER_MASK.shape) < 0.02
                routing["map"] = np.where(wrong, (experts + 1) % 3, experts).tolist()
                result["metrics"]["nrmse"] = float(rng.uniform(1e-6, 1e-5))
            else:
                close = 100.0 if model == "generator" else float(rng.uniform(0.5, 99.0))
                result = baseline_result(model, seed, close)
                result["metrics"]["nrmse"] = float(10 ** rng.uniform(-3, -1))
            results.append(result)
    return results


def realistic_histories(folder, models, seeds):
    trained = ["epoch", "train_loss", "val_mse", "val_prcntclose1.0", "lr", "time_s"]
    paths = []
    for model in models:
        for seed in range(seeds):
            path = folder / "models" / model / f"seed{seed}" / "history.csv"
            if model in ("persistence", "stencil", "generator"):
                paths.append(write_history(path, trained[:1] + trained[2:4], [[0, 1e-3, 50.0]]))
                continue
            rows = [
                [e, 10.0 ** -(e / 10 + seed), 1e-3, min(100, 3 * e), 0.01, e] for e in range(30)
            ]
            paths.append(write_history(path, trained, rows))
    return paths


def realistic_predictions(folder, models):
    rng = np.random.default_rng(0)
    u = rng.uniform(0.1, 1.0, (1, 3, GRID, GRID)).astype(np.float32)
    files = []
    for i, model in enumerate(models):
        prediction = u + rng.normal(0, 1e-3 * (i + 1), u.shape).astype(np.float32)
        ds = xr.Dataset(
            {
                "prediction": (("run", "time", "y", "x"), prediction),
                "u": (("run", "time", "y", "x"), u),
            },
            coords={"run": [0], "time": np.arange(3), "y": np.arange(GRID), "x": np.arange(GRID)},
            attrs={"model": model, "seed": 0},
        )
        files.append(folder / f"{model}.nc")
        ds.to_netcdf(files[-1])
    return files


def draw_all(folder, models, seeds):
    """Every report figure for one config, as the workflow draws them."""
    metrics = realistic_metrics(models, seeds)
    smoe = [r for r in metrics if r["model"].startswith("smoe")]
    histories = F.load_histories(realistic_histories(folder, models, seeds))
    return {
        "routing": F.routing_figure(PAPER_MASK, smoe, folder / "routing"),
        "kernels": K.kernels_figure(smoe, folder / "kernels"),
        "predictions": P.predictions_figure(
            realistic_predictions(folder, models), folder / "predictions.png"
        ),
        "curves": F.learning_curves_figure(histories, folder / "learning_curves"),
        "bars": F.metric_bars_figure(metrics, folder / "metric_bars"),
    }


@pytest.mark.filterwarnings("error:.*layout.*:UserWarning")  # a layout that gave up
@pytest.mark.parametrize("setup", SETUPS)
def test_every_figure_fits_the_report_viewer(tmp_path, drawn, setup):
    models, seeds = SETUPS[setup]
    written = draw_all(tmp_path, models, seeds)  # `drawn` checks that nothing is clipped
    for name, (png, svg) in written.items():
        width, height = S.png_size(png)
        assert S.fits_report_viewer(png), f"{name}: {width} x {height} px"
        # inside the design limits too: 900 px high, 1650 px wide
        assert height <= S.MAX_HEIGHT * S.DPI and width <= S.MAX_WIDTH * S.DPI, name
        assert svg.is_file()
    assert len(drawn) == len(written)
    predictions = drawn[2]
    labels = [ax.xlabel for ax in predictions.axes if ax.xlabel.startswith("this sample:")]
    assert len(labels) == len(models)
    bars = drawn[4]
    assert ("one seed" in bars.suptitle) == (seeds == 1)
    assert all((ax.errorbars == []) == (seeds == 1) for ax in bars.axes)
