"""Report figures of the synthetic-cluster family (Chen et al., NeurIPS 2022).

* :func:`dispatch_figure`: for each MoE model and data setting, the expert x cluster
  dispatch matrix of the train store (how many training samples of each cluster the kept
  checkpoint's router sends to each expert, routed as at evaluation), for the first seed of
  each;
* :func:`projection_figure`: a data split seen in two deterministic 2-D views, one
  coloured by cluster and one by label.

Both write PNG + SVG through :func:`smoe.families.heat.figures.save_figure` and stay whole in the
``snakemake --report`` viewer (:func:`smoe.families.heat.figures.fits_report_viewer`). The numbers
the pictures rest on (:func:`dispatch_panels`, :func:`projection_points`) are separate
functions, so tests can check them without reading pixels.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from smoe.core.errors import InputError
from smoe.core.report.figures import MAX_HEIGHT, MAX_WIDTH, new_figure, save_figure, viewer_size

EMPTY_COLOUR = "#d9dde2"
"""Background of an expert that received no sample."""
TEXT_DARK = "#1f2933"
MAX_POINTS = 4000
"""At most this many samples are drawn by :func:`projection_figure`."""
SUBSET_SEED = 0
"""Seed of the fixed random subset of samples drawn by :func:`projection_figure`."""
LABEL_COLOURS = ("#1b9e77", "#d95f02")
"""Colours of label 0 (y = -1) and label 1 (y = +1)."""


# --- dispatch -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DispatchPanel:
    """One drawn matrix: a model's first seed on one setting."""

    setting: str
    model: str
    label: str
    seed: int
    seeds: int  # how many seeds of this model and setting carry a dispatch matrix
    counts: np.ndarray  # [experts, clusters] training samples
    entropy: float

    @property
    def shares(self) -> np.ndarray:
        """Each expert's counts over its total (NaN for an expert without samples)."""
        totals = self.counts.sum(axis=1, keepdims=True).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(totals > 0, self.counts / totals, np.nan)

    @property
    def empty_experts(self) -> list[int]:
        return [int(m) for m in np.flatnonzero(self.counts.sum(axis=1) == 0)]


def _natural(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _name(result: Mapping[str, Any], index: int) -> str:
    return (
        f"result {index} (model {result.get('model')!r}, setting {result.get('setting')!r}, "
        f"seed {result.get('seed')!r})"
    )


def dispatch_counts(result: Mapping[str, Any], name: str, split: str = "train") -> np.ndarray:
    """A MoE result's dispatch matrix of ``split`` as int64 [experts, clusters], checked:
    rectangular, whole non-negative counts, as many rows as experts and columns as clusters
    (where the result says), at least one sample; else an InputError naming ``name``."""
    dispatch = result.get("dispatch")
    if not isinstance(dispatch, Mapping) or split not in dispatch:
        raise InputError(f"{name}: no {split} dispatch matrix ('dispatch' is {dispatch!r:.60})")
    try:
        values = np.array(dispatch[split], dtype=np.float64)
    except (TypeError, ValueError):
        values = np.empty(0)
    if values.ndim != 2 or values.size == 0:
        raise InputError(f"{name}: dispatch.{split} is not a matrix of counts [experts x clusters]")
    if not np.all(np.isfinite(values)) or (values < 0).any() or (values % 1).any():
        raise InputError(f"{name}: dispatch.{split} holds values that are not counts")
    experts, clusters = values.shape
    for key, want, what in (
        ("experts", experts, "rows"),
        ("clusters", clusters, "columns"),
    ):
        said = dispatch.get(key, result.get(key) if key == "experts" else None)
        if said is not None and said != want:
            raise InputError(
                f"{name}: dispatch.{split} has {want} {what}, but the result says {key} = {said}"
            )
    if values.sum() <= 0:
        raise InputError(f"{name}: dispatch.{split} counts no sample")
    return values.astype(np.int64)


def _entropy(result: Mapping[str, Any], counts: np.ndarray) -> float:
    """The entropy of the matrix drawn: the metrics' ``dispatch_entropy_eval`` (the kept
    checkpoint routing the train store as at evaluation), not the published
    ``dispatch_entropy`` of the last training pass, whose counts the metrics do not hold."""
    value = (result.get("metrics") or {}).get("dispatch_entropy_eval")
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    from smoe.families.clusters.metrics import dispatch_entropy

    return dispatch_entropy(counts)


def dispatch_panels(results: Sequence[Mapping[str, Any]]) -> list[list[DispatchPanel | None]]:
    """The grid :func:`dispatch_figure` draws: one row per MoE model (singles, i.e. results
    without a dispatch matrix, are skipped), one column per setting (natural order), each
    cell the model's first seed on that setting, ``None`` where the model has no run there.

    Models are ordered as the table orders them (linear before nonlinear, then by size and
    name). No MoE result with a dispatch matrix raises an InputError.
    """
    from smoe.families.clusters.table import check_run

    groups: dict[tuple[str, str], list[tuple[Any, np.ndarray, Mapping[str, Any]]]] = {}
    keys: dict[str, tuple] = {}
    labels: dict[str, str] = {}
    for index, result in enumerate(results):
        name = _name(result, index)
        if not isinstance(result, Mapping):
            raise InputError(f"result {index} is not a metrics mapping")
        run = check_run(result, name)
        if run.kind != "cluster_moe" or result.get("dispatch") is None:
            continue
        counts = dispatch_counts(result, name)
        groups.setdefault((run.setting, run.model), []).append((run, counts, result))
        keys.setdefault(run.model, run.key)
        labels.setdefault(run.model, run.label)
    if not groups:
        raise InputError(
            f"nothing to draw: none of the {len(results)} results is a MoE run with a "
            "dispatch matrix"
        )
    settings = sorted({setting for setting, _ in groups}, key=_natural)
    models = sorted(
        keys, key=lambda m: (keys[m][1] == "cubic", keys[m][3] or 0, keys[m][2], _natural(m))
    )
    grid: list[list[DispatchPanel | None]] = []
    for model in models:
        row: list[DispatchPanel | None] = []
        for setting in settings:
            runs = groups.get((setting, model))
            if not runs:
                row.append(None)
                continue
            run, counts, result = min(runs, key=lambda item: item[0].seed)
            row.append(
                DispatchPanel(
                    setting=setting,
                    model=model,
                    label=labels[model],
                    seed=run.seed,
                    seeds=len(runs),
                    counts=counts,
                    entropy=_entropy(result, counts),
                )
            )
        grid.append(row)
    return grid


def _dispatch_panel(ax, panel: DispatchPanel, cmap, scale: float):
    counts, shares = panel.counts, panel.shares
    experts, clusters = counts.shape
    image = ax.imshow(
        np.ma.masked_invalid(shares),
        cmap=cmap,
        vmin=0.0,
        vmax=1.0,
        aspect="auto",
        interpolation="nearest",
    )
    fontsize = max(4.5, min(7.0, 7.0 * scale))
    for m in range(experts):
        if counts[m].sum() == 0:
            ax.text(
                (clusters - 1) / 2,
                m,
                "no samples",
                ha="center",
                va="center",
                fontsize=fontsize,
                color="#52606d",
                style="italic",
            )
            continue
        for k in range(clusters):
            ax.text(
                k,
                m,
                f"{counts[m, k]:,}",
                ha="center",
                va="center",
                fontsize=fontsize,
                color="white" if shares[m, k] > 0.55 else TEXT_DARK,
            )
    ax.set_xticks(range(clusters), [str(k) for k in range(clusters)], fontsize=7)
    ax.set_yticks(range(experts), [str(m) for m in range(experts)], fontsize=7)
    for m in panel.empty_experts:
        ax.get_yticklabels()[m].set_color("#9aa5b1")
    ax.tick_params(length=0)
    ax.set_xlabel("cluster", fontsize=7)
    ax.set_ylabel("expert", fontsize=7)
    first = f"first of {panel.seeds} seeds" if panel.seeds > 1 else "its only seed"
    ax.set_title(
        f"{panel.setting}: {panel.label}\nseed {panel.seed} ({first}), "
        f"entropy {panel.entropy:.3f} nats",
        fontsize=7.5,
    )
    return image


DISPATCH_TITLE = (
    "Dispatch of the training split at evaluation (kept checkpoint): training samples per "
    "expert (row) and cluster (column), first seed of each model"
)


def _wrap(text: str, width_in: float, fontsize: float) -> str:
    """``text`` broken into lines that fit ``width_in`` inches at ``fontsize`` points
    (an average character is taken as 0.55 em wide)."""
    chars = max(20, int(width_in * 72 / (0.55 * fontsize)) - 2)
    return textwrap.fill(text, chars)


def _blank(ax, note: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.text(0.5, 0.5, note, ha="center", va="center", fontsize=7, transform=ax.transAxes)


def dispatch_figure(results: list[dict], out: str | Path) -> tuple[Path, Path]:
    """Expert x cluster dispatch matrices of the training split, one panel per MoE model
    (row) and setting (column; the other way round when there are more models than
    settings), each for the model's first seed (said in the title).

    A cell is the number of samples of the train store (its validation part included) of
    that cluster that the kept checkpoint's router sends to that expert, routed as at
    evaluation (without noise unless ``test_noise``); its colour is that count's share of the
    expert's samples, so an expert that specialises in one cluster shows one dark cell in its
    row. Experts that received no sample are grey rows marked "no samples". Titles give the
    setting, the model, the seed and the entropy of the matrix drawn (its metrics'
    ``dispatch_entropy_eval``; the published figure, ``dispatch_entropy``, is the last
    training pass's, with router noise, and is in the table). ``results`` are
    cluster metrics dicts (:func:`smoe.families.clusters.table.load_cluster_results`); results
    without a dispatch matrix (single CNNs) are skipped, and none left raises an InputError.
    """
    grid = dispatch_panels(results)
    # what each cell shows, for the notes of empty ones: (model label, setting)
    names = [
        [
            (
                next(p.label for p in row if p is not None),
                next(g[c].setting for g in grid if g[c] is not None),
            )
            for c in range(len(row))
        ]
        for row in grid
    ]
    if len(grid) > len(grid[0]):  # more models than settings: models side by side
        grid = [list(column) for column in zip(*grid, strict=True)]
        names = [list(column) for column in zip(*names, strict=True)]
    rows, cols = len(grid), len(grid[0])
    panels = [panel for row in grid for panel in row if panel is not None]
    experts = max(panel.counts.shape[0] for panel in panels)
    clusters = max(panel.counts.shape[1] for panel in panels)
    # Cells wide enough for a four-digit count; panels shrink together to stay in the viewer.
    cell_w, cell_h = 0.5, 0.24
    extra_w, extra_h = 0.75, 0.95  # tick labels, axis labels, two-line titles
    fixed_w, fixed_h = 1.0, 0.45  # colour bar, suptitle
    scale = min(
        1.0,
        ((MAX_WIDTH - fixed_w) / cols - extra_w) / (clusters * cell_w),
        ((MAX_HEIGHT - fixed_h) / rows - extra_h) / (experts * cell_h),
    )
    width = max(cols * (clusters * cell_w * scale + extra_w) + fixed_w, 4.5)
    title = _wrap(DISPATCH_TITLE, viewer_size(width, MAX_HEIGHT / 2)[0], 9)
    height = rows * (experts * cell_h * scale + extra_h) + fixed_h + 0.16 * title.count("\n")
    fig = new_figure(*viewer_size(width, height))
    axes = fig.subplots(rows, cols, squeeze=False)
    cmap = matplotlib.colormaps["Blues"].with_extremes(bad=EMPTY_COLOUR)
    image = None
    for r, row in enumerate(grid):
        for c, panel in enumerate(row):
            if panel is None:
                label, setting = names[r][c]
                _blank(axes[r][c], f"{label}:\nno run on {setting}")
            else:
                image = _dispatch_panel(axes[r][c], panel, cmap, scale)
    bar = fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.04, pad=0.02)
    bar.set_label("share of the expert's training samples", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, out)


# --- projection ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ProjectionPoints:
    """The drawn samples of a split and their coordinates in the two views."""

    index: np.ndarray  # sample indices within the split, increasing
    cluster: np.ndarray
    label: np.ndarray
    centre_plane: np.ndarray  # [n, 2]: view 1
    own_cluster: np.ndarray  # [n, 2]: view 2, (<s, c_k>, <s, v_k>) with k the own cluster
    total: int  # samples in the split


def projection_points(data: Any, max_points: int = MAX_POINTS) -> ProjectionPoints:
    """The two views of :func:`projection_figure` for a :class:`ClusterData` split, on a
    fixed random subset of at most ``max_points`` samples (seed :data:`SUBSET_SEED`)."""
    total = len(data)
    if total == 0:
        raise InputError(f"store {str(data.path)!r} holds no samples: nothing to draw")
    rng = np.random.default_rng(SUBSET_SEED)
    index = np.sort(rng.choice(total, size=min(total, max_points), replace=False))
    summed = data.x[index].astype(np.float64).sum(axis=1)  # [n, d]
    on_centres = summed @ np.asarray(data.centre, dtype=np.float64).T  # [n, K]
    on_signals = summed @ np.asarray(data.signal, dtype=np.float64).T  # [n, K]
    clusters = on_centres.shape[1]
    angles = 2 * np.pi * np.arange(clusters) / clusters
    directions = np.stack([np.cos(angles), np.sin(angles)], axis=1)  # [K, 2]
    cluster = np.asarray(data.cluster)[index]
    rows = np.arange(len(index))
    return ProjectionPoints(
        index=index,
        cluster=cluster,
        label=np.asarray(data.label)[index],
        centre_plane=on_centres @ directions,
        own_cluster=np.stack([on_centres[rows, cluster], on_signals[rows, cluster]], axis=1),
        total=total,
    )


def _centre_axis_label(clusters: int, axis: int) -> str:
    """``<s, c_0> - <s, c_2>`` (K = 4) or the general cos/sin sum, as mathtext."""
    if clusters == 4:
        a, b = (0, 2) if axis == 0 else (1, 3)
        return rf"$\langle s, c_{a}\rangle - \langle s, c_{b}\rangle$"
    trig = r"\cos" if axis == 0 else r"\sin"
    return rf"$\sum_k {trig}(2\pi k/{clusters})\,\langle s, c_k\rangle$"


def projection_figure(store: str | Path, out: str | Path) -> tuple[Path, Path]:
    """A data split (one zarr store of :mod:`smoe.families.clusters.store`) in two 2-D views.

    Both views start from s = the sum of a sample's P patches (a vector of R^d, the scale
    factor included) and project it onto the generating vectors the store records (the
    cluster centres c_k and label signals v_k, orthonormal). The choice is deliberate: the
    data live in the span of these 2K vectors plus isotropic Gaussian noise, so every other
    direction shows noise only, and a PCA of s would pick among near-equal variances an
    arbitrary, run-dependent pair of directions. These views are fixed and readable:

    * left, coloured by cluster: the centre plane. Coordinate k of s on the centres,
      <s, c_k>, is about 10 beta in [10, 20] for a sample of cluster k and noise otherwise,
      so cluster k is drawn along the direction at angle 2 pi k / K
      (x = sum_k cos(2 pi k / K) <s, c_k>, y = sum_k sin(...) <s, c_k>; for K = 4 that is
      <s, c_0> - <s, c_2> and <s, c_1> - <s, c_3>). This is what the linear router sees:
      the clusters separate; the labels do not (their directions v_k are orthogonal to it);
    * right, coloured by label: each sample's own cluster k, x = <s, c_k> and
      y = <s, v_k>. The label signal y alpha v_k makes y about +-10 alpha, so the labels
      separate by the sign of y: what an expert that receives one cluster has to learn.
      (The feature-noise patch lies on another cluster's v_k', so it does not move y.)

    The points are a fixed random subset of at most :data:`MAX_POINTS` samples (seed
    :data:`SUBSET_SEED`), so the figure is the same on every run; a store that cannot be
    read, or holds no sample, raises an InputError.
    """
    from smoe.families.clusters.store import open_cluster_split

    data = open_cluster_split(store)
    points = projection_points(data)
    setting = data.setting
    clusters = setting.clusters
    fig = new_figure(*viewer_size(10.0, 4.9))
    left, right = fig.subplots(1, 2)
    colours = matplotlib.colormaps["tab10"]
    style = {"s": 3, "alpha": 0.6, "linewidths": 0, "rasterized": True}
    for k in range(clusters):
        chosen = points.cluster == k
        left.scatter(*points.centre_plane[chosen].T, color=colours(k % 10), label=str(k), **style)
    left.set_aspect("equal", adjustable="datalim")
    left.set_xlabel(_centre_axis_label(clusters, 0), fontsize=8)
    left.set_ylabel(_centre_axis_label(clusters, 1), fontsize=8)
    left.set_title("coloured by cluster: projection onto the cluster centres", fontsize=8.5)
    left.legend(title="cluster", fontsize=7, title_fontsize=7, markerscale=3, loc="best")
    for value, name in ((0, "0 (y = -1)"), (1, "1 (y = +1)")):
        chosen = points.label == value
        right.scatter(
            *points.own_cluster[chosen].T, color=LABEL_COLOURS[value], label=name, **style
        )
    right.axhline(0.0, color="#9aa5b1", linewidth=0.6, zorder=0)
    right.set_xlabel(r"$\langle s, c_k\rangle$, k = the sample's own cluster", fontsize=8)
    right.set_ylabel(r"$\langle s, v_k\rangle$, same k", fontsize=8)
    right.set_title("coloured by label: own cluster's centre and label signal", fontsize=8.5)
    right.legend(title="label", fontsize=7, title_fontsize=7, markerscale=3, loc="best")
    for ax in (left, right):
        ax.tick_params(labelsize=7)
    shown = len(points.index)
    subset = "all" if shown == points.total else f"{shown:,} random (fixed) of"
    low, high = setting.gamma
    title = (
        f"Setting {setting.name}, {data.split} split (data seed {data.seed}; σ_p = "
        f"{setting.sigma_p:g}, γ ~ U[{low:g}, {high:g}]): {subset} {points.total:,} samples; "
        "s = sum of a sample's patches"
    )
    fig.suptitle(_wrap(title, fig.get_figwidth(), 9), fontsize=9)
    return save_figure(fig, out)
