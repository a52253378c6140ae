"""Figures of the cluster family: dispatch matrices and 2-D views of a data split."""

import re

import numpy as np
import pytest

from smoe.core.errors import InputError
from smoe.core.report.figures import fits_report_viewer
from smoe.families.clusters.data import make_setting
from smoe.families.clusters.figures import (
    MAX_POINTS,
    dispatch_figure,
    dispatch_panels,
    projection_figure,
    projection_points,
)
from smoe.families.clusters.store import open_cluster_split, write_cluster_split


def panels_in(svg_path):
    """Axes in a written SVG (matplotlib names each group ``axes_<n>``)."""
    return len(re.findall(r'id="axes_\d+"', svg_path.read_text()))


def counts(seed, experts=8, clusters=4, empty=()):
    matrix = np.random.default_rng(seed).integers(0, 1500, size=(experts, clusters))
    matrix[list(empty)] = 0
    return matrix.tolist()


def result(setting, model, seed, *, activation="cubic", train=None, kind="cluster_moe", **extra):
    moe = kind == "cluster_moe"
    train = counts(seed) if train is None else train
    values = {
        "family": "clusters",
        "setting": setting,
        "model": model,
        "kind": kind,
        "seed": seed,
        "activation": activation,
        "experts": 8 if moe else None,
        "filters": 16 if moe else 80,
        "params": 6536,
        "best_epoch": 9,
        "epochs": 10,
        "train_time_s": 3.0,
        "test_noise": False,
        "device": "cpu",
        "precision": "fp32",
        "metrics": {
            "test_accuracy": 99.0,
            "train_accuracy": 100.0,
            "val_accuracy": 99.5,
            "dispatch_entropy": 0.5 + seed if moe else None,  # the last training pass's
            "dispatch_entropy_eval": 0.25 + seed if moe else None,  # of the matrix drawn
            "test_dispatch_entropy": 0.3 if moe else None,
        },
        "dispatch": (
            {"train": train, "test": counts(seed + 100), "experts": 8, "clusters": 4}
            if moe
            else None
        ),
        "store": f"results/clusters/data/{setting}/test.zarr",
        "train_store": f"results/clusters/data/{setting}/train.zarr",
    }
    values.update(extra)
    return values


def grid_results(settings, models):
    return [
        result(setting, model, seed, activation="linear" if "linear" in model else "cubic")
        for setting in settings
        for model in models
        for seed in (2, 0, 1)
    ]


def test_dispatch_panels_take_the_first_seed_and_skip_singles():
    results = [
        result("s2", "moe_nonlinear", 3),
        result("s2", "moe_nonlinear", 1, train=counts(1, empty=(2, 6))),
        result("s1", "moe_linear", 0, activation="linear"),
        result("s1", "single", 0, kind="cluster_single"),
    ]
    grid = dispatch_panels(results)
    # rows: linear before nonlinear; columns: s1, s2; None where a model has no run
    assert [[None if p is None else (p.model, p.setting) for p in row] for row in grid] == [
        [("moe_linear", "s1"), None],
        [None, ("moe_nonlinear", "s2")],
    ]
    panel = grid[1][1]
    assert (panel.seed, panel.seeds, panel.entropy) == (1, 2, 1.25)
    assert panel.label == "MoE nonlinear (8 experts, cubic)"
    assert panel.empty_experts == [2, 6]
    shares = panel.shares
    assert np.isnan(shares[2]).all() and np.isnan(shares[6]).all()
    full = [m for m in range(8) if m not in (2, 6)]
    assert np.allclose(shares[full].sum(axis=1), 1.0)


def test_dispatch_figure_notes_missing_runs(tmp_path):
    results = [
        result("s2", "moe_nonlinear", 0),
        result("s1", "moe_linear", 0, activation="linear"),
        result("s3", "moe_linear", 0, activation="linear"),
    ]
    png, svg = dispatch_figure(results, tmp_path / "dispatch")
    assert fits_report_viewer(png)
    text = svg.read_text()
    assert panels_in(svg) == 2 * 3 + 1
    assert "no run on s1" in text and "no run on s2" in text and "no run on s3" in text


@pytest.mark.parametrize(
    ("settings", "models"),
    [
        (["s1"], ["moe_nonlinear"]),
        (["s1"], ["moe_linear", "moe_nonlinear"]),  # drawn side by side
        (["s1", "s2"], ["moe_linear", "moe_nonlinear"]),
        (["s1", "s2", "s3", "s4"], ["moe_nonlinear"]),
        (["s1", "s2", "s3", "s4"], ["moe_linear", "moe_nonlinear"]),
    ],
)
def test_dispatch_figure_fits_the_viewer(tmp_path, settings, models):
    results = grid_results(settings, models)
    results.append(result("s1", "single_linear_80", 0, kind="cluster_single"))
    png, svg = dispatch_figure(results, tmp_path / "dispatch")
    assert png == tmp_path / "dispatch.png" and svg == tmp_path / "dispatch.svg"
    assert png.is_file() and svg.is_file()
    assert fits_report_viewer(png)
    assert panels_in(svg) == len(settings) * len(models) + 1  # + the colour bar
    text = svg.read_text()
    assert "first of 3 seeds" in text and "no samples" not in text


def test_dispatch_figure_greys_empty_experts(tmp_path):
    train = [[4000, 0, 0, 0], [0, 4000, 0, 0], [0, 0, 0, 0], [0, 0, 4000, 0]]
    train += [[0, 0, 0, 0]] * 3 + [[0, 0, 0, 4000]]
    png, svg = dispatch_figure([result("s1", "moe", 0, train=train)], tmp_path / "one.png")
    assert fits_report_viewer(png)
    text = svg.read_text()
    assert text.count("no samples") == 4
    assert "its only seed" in text and "entropy 0.250 nats" in text


def test_dispatch_figure_refuses_what_it_cannot_draw(tmp_path):
    out = tmp_path / "dispatch"
    with pytest.raises(InputError, match="nothing to draw: none of the 1 results"):
        dispatch_figure([result("s1", "single", 0, kind="cluster_single")], out)
    with pytest.raises(InputError, match="nothing to draw: none of the 0 results"):
        dispatch_figure([], out)
    for train, message in (
        ([[1, 2, 3, 4], [1, 2]], "not a matrix of counts"),
        ([[1, -2, 3, 4]] * 8, "not counts"),
        ([[1, 2, 3]] * 8, "3 columns, but the result says clusters = 4"),
        ([[1, 2, 3, 4]] * 7, "7 rows, but the result says experts = 8"),
        ([[0, 0, 0, 0]] * 8, "counts no sample"),
    ):
        with pytest.raises(InputError, match=f"model 'moe', setting 's1', seed 0.*{message}"):
            dispatch_figure([result("s1", "moe", 0, train=train)], out)
    with pytest.raises(InputError, match="kind is 'smoe'"):
        dispatch_figure([result("s1", "moe", 0, kind="smoe")], out)
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clusters")
    small = make_setting({"setting": "s1", "n_train": 600, "n_test": 500})
    return {
        "small": write_cluster_split(small, 3, "train", folder / "small.zarr"),
        "paper": write_cluster_split(
            make_setting({"setting": "s1"}), 3, "test", folder / "s1.zarr"
        ),
    }


def test_projection_points_show_clusters_and_labels(stores):
    data = open_cluster_split(stores["small"])
    points = projection_points(data)
    assert points.total == 600 and np.array_equal(points.index, np.arange(600))
    # s1 separates cleanly: cluster k lies along the direction 2 pi k / K of the centre plane
    angles = 2 * np.pi * np.arange(4) / 4
    directions = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    nearest = np.argmax(points.centre_plane @ directions.T, axis=1)
    assert (nearest == points.cluster).mean() > 0.99
    # in the own-cluster view the label is the sign of <s, v_k>
    assert ((points.own_cluster[:, 1] > 0) == (points.label == 1)).mean() > 0.99
    assert (points.own_cluster[:, 0] > 0).all()


def test_projection_subset_is_fixed_and_bounded(stores):
    data = open_cluster_split(stores["paper"])
    first, again = projection_points(data), projection_points(data)
    assert len(first.index) == MAX_POINTS and first.total == 16000
    assert np.array_equal(first.index, again.index)
    assert np.all(np.diff(first.index) > 0)
    assert np.array_equal(first.cluster, data.cluster[first.index])


@pytest.mark.parametrize("store", ["small", "paper"])
def test_projection_figure(tmp_path, stores, store):
    png, svg = projection_figure(stores[store], tmp_path / "projection")
    assert png.is_file() and svg.is_file()
    assert fits_report_viewer(png)
    assert panels_in(svg) == 2
    text = svg.read_text()
    assert "coloured by cluster" in text and "coloured by label" in text
    assert ("4,000 random (fixed) of 16,000" in text) == (store == "paper")


def test_projection_figure_needs_a_store(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        projection_figure(tmp_path / "missing.zarr", tmp_path / "projection")
    (tmp_path / "folder.zarr").mkdir()
    with pytest.raises(InputError, match="not a readable zarr store"):
        projection_figure(tmp_path / "folder.zarr", tmp_path / "projection")
    assert not (tmp_path / "projection.png").exists()
