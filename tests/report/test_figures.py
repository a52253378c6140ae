"""Report figures on tiny synthetic inputs: files written, and the numbers behind the pictures."""

import csv
import math

import matplotlib.image
import numpy as np
import pytest
import xarray as xr

from smoe.errors import InputError
from smoe.report import figures as F
from smoe.train.metrics import ATOL

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


# --- saving -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("out", "name"),
    [("fig", "fig"), ("fig.png", "fig"), ("fig.svg", "fig"), ("fig.seed0", "fig.seed0")],
)
def test_figure_paths_drop_only_image_suffixes(tmp_path, out, name):
    png, svg = F.figure_paths(tmp_path / out)
    assert (png, svg) == (tmp_path / f"{name}.png", tmp_path / f"{name}.svg")


def test_save_figure_creates_folders_and_is_reproducible(tmp_path):
    def draw(out):
        fig = F.new_figure(4, 3)
        fig.subplots().plot([0, 1], [1, 0])
        return F.save_figure(fig, out)

    first = draw(tmp_path / "a" / "b" / "line.png")
    assert_figure(first, tmp_path)
    svg = first[1].read_bytes()
    draw(tmp_path / "a" / "b" / "line")
    assert first[1].read_bytes() == svg
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["line.png", "line.svg"]


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
    fig = F.new_figure(3, 3)
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
    samples = F.select_samples(datasets, run=1)
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
    samples = F.select_samples([smoe, cnn], run=0, time=2)
    np.testing.assert_array_equal(samples[0].input, u[0, 1])
    assert F.select_samples([smoe], run=0, time=2)[0].input is None
    with pytest.raises(ValueError, match="smoe.*time step 1"):
        F.select_samples([cnn, smoe], run=0, time=1)
    with pytest.raises(ValueError, match="run 5"):
        F.select_samples([cnn], run=5)


def test_sample_close_matches_the_metric_definition(prediction_files):
    (sample,) = F.select_samples(open_all(prediction_files[:1]), run=0, time=3)
    d, y = sample.prediction - sample.target, sample.target
    expected = 100 * np.mean(np.abs(d) <= ATOL + 0.01 * np.abs(y))
    assert sample.close == pytest.approx(expected)
    assert 0 < sample.close < 100


def test_error_limit_is_shared_and_symmetric(prediction_files):
    samples = F.select_samples(open_all(prediction_files), run=0)
    pooled = np.concatenate([np.abs(s.error).ravel() for s in samples])
    assert F.error_limit(samples) == pytest.approx(np.percentile(pooled, 99))


def test_predictions_figure(tmp_path, prediction_files):
    paths = F.predictions_figure(prediction_files, tmp_path / "out" / "predictions.svg", run=1)
    assert_figure(paths, tmp_path)


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


def test_metric_bars_figure(tmp_path):
    summary = [baseline_result("cnn", s, 20.0 + s) for s in range(3)]
    summary += [smoe_result(s) for s in range(2)] + [baseline_result("persistence", 0, 87.0)]
    paths = F.metric_bars_figure(summary, tmp_path / "bars.png")
    assert_figure(paths, tmp_path)


# --- kernels ------------------------------------------------------------------------------


def test_each_expert_is_paired_with_its_matched_stencil():
    result = smoe_result(0, experts=3, noise=1e-3)
    pairs = F.kernel_pairs(result["routing"])
    assert [(p.expert, p.region) for p in pairs] == [(0, 2), (1, 0), (2, 1)]
    for pair in pairs:
        np.testing.assert_array_equal(pair.stencil, STENCILS[EXPERT_TO_TYPE[str(pair.expert)]])
        assert pair.error == pytest.approx(np.abs(pair.kernel - pair.stencil).max())
        assert pair.error < 1e-3  # the permuted pairing is the right one


def test_unmatched_expert_has_no_stencil():
    result = smoe_result(0)
    routing = result["routing"]
    routing["kernels"].append(np.eye(3).tolist())  # a fourth expert, left unmatched
    last = F.kernel_pairs(routing)[-1]
    assert (last.expert, last.region, last.stencil) == (3, None, None)
    assert math.isnan(last.error)


def test_kernels_figure(tmp_path):
    runs = [smoe_result(0), baseline_result(), smoe_result(1)]
    assert_figure(F.kernels_figure(runs, tmp_path / "kernels"), tmp_path)


# --- figures that cannot be drawn ----------------------------------------------------------


def test_figures_without_anything_to_draw_are_errors_not_placeholders(tmp_path):
    baselines = [baseline_result("cnn"), baseline_result("lcn", 1)]
    with pytest.raises(InputError, match=r"routing figure: none of the results cnn seed 0, lcn"):
        F.routing_figure(MASK, baselines, tmp_path / "routing")
    with pytest.raises(InputError, match=r"none of the metrics files 'a.json', 'b.json'"):
        F.kernels_figure(baselines, tmp_path / "kernels", sources=["a.json", "b.json"])
    no_kernels = smoe_result(0)
    del no_kernels["routing"]["kernels"]  # an SMoE whose experts are not 3x3
    with pytest.raises(InputError, match="3x3"):
        F.kernels_figure([no_kernels], tmp_path / "kernels")
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
