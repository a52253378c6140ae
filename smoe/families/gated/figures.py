"""Report figures of the gated modular MoE family (Krishnamurthy et al., arXiv 2302.14703).

* :func:`plot_gated_routing`: for each MoE model, the expert x class routing of the test
  split (share of each class's test samples the gate sends to each expert, argmax routing)
  for the model's lowest seed: the paper's picture of task decomposition;
* :func:`plot_accuracy_usage`: test accuracy against expert usage entropy H_u, every model
  and seed, beside the published MNIST points: whether specialisation costs accuracy.

Both read the metrics JSON files of ``evaluate_gated_checkpoint`` (checked by
:func:`smoe.families.gated.table.load_gated_runs`), write PNG + SVG through
:func:`smoe.families.heat.figures.save_figure` and stay whole in the ``snakemake --report`` viewer
(:func:`smoe.families.heat.figures.fits_report_viewer`). The numbers the pictures rest on
(:func:`routing_panels`, :func:`expert_order`, :func:`published_points`) are separate
functions, so tests can check them without reading pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.lines import Line2D

from smoe.core.errors import InputError
from smoe.core.report.figures import (
    fix_layout,
    grid_layout,
    model_colours,
    new_figure,
    save_figure,
    viewer_size,
)
from smoe.families.gated.table import (
    DATASET_NAMES,
    REFERENCES,
    GatedRun,
    load_gated_references,
    load_gated_runs,
)

TEXT_DARK = "#1f2933"
PUBLISHED_COLOUR = "#52606d"
PUBLISHED_DATASET = "mnist"
PUBLISHED_EXPERTS = 10


# --- routing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoutingPanel:
    """One drawn routing matrix: a MoE model's lowest seed."""

    model: str
    label: str
    seed: int
    seeds: int  # how many seeds of this model were given
    counts: np.ndarray  # [experts, classes] test samples
    usage_entropy: float
    mutual_information: float

    @property
    def shares(self) -> np.ndarray:
        """Each class's counts over the class's total (NaN for a class without samples):
        a column sums to 1, so a specialised class shows one dark cell."""
        totals = self.counts.sum(axis=0, keepdims=True).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(totals > 0, self.counts / totals, np.nan)

    @property
    def order(self) -> list[int]:
        return expert_order(self.counts)


def expert_order(counts: np.ndarray) -> list[int]:
    """Experts sorted by their dominant class (the class of most of their samples), ties by
    how much of their load that class is (larger first), experts without samples last: a
    specialised gate then draws a near-diagonal."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1)

    def key(expert: int) -> tuple:
        if totals[expert] <= 0:
            return (1, 0, 0.0, expert)
        dominant = int(np.argmax(counts[expert]))
        return (0, dominant, -counts[expert, dominant] / totals[expert], expert)

    return sorted(range(counts.shape[0]), key=key)


def routing_counts(run: GatedRun) -> np.ndarray:
    """The routing matrix of a MoE run as counts [experts, classes], or an InputError naming
    its file when it is missing, not a matrix of counts or of the wrong size."""
    routing = run.routing or {}
    try:
        counts = np.asarray(routing.get("matrix"), dtype=np.float64)
    except (TypeError, ValueError):
        counts = np.empty(0)
    if (
        counts.ndim != 2
        or counts.shape[0] != run.experts
        or counts.shape[1] < 1
        or not np.all(np.isfinite(counts))
        or np.any(counts < 0)
        or np.any(counts != np.round(counts))
    ):
        raise InputError(
            f"metrics file {run.path}: routing.matrix is not a [{run.experts} experts] x "
            "[classes] matrix of sample counts"
        )
    if counts.sum() <= 0:
        raise InputError(f"metrics file {run.path}: routing.matrix counts no sample")
    return counts.astype(np.int64)


def routing_panels(runs: Sequence[GatedRun]) -> list[RoutingPanel]:
    """One panel per MoE model, in first-seen order, each the model's lowest seed; single
    models (no gate) are skipped, and none left raises an InputError."""
    groups: dict[str, list[GatedRun]] = {}
    for run in runs:
        if not run.single:
            groups.setdefault(run.model, []).append(run)
    if not groups:
        raise InputError(
            f"nothing to draw: none of the {len(runs)} metrics files is of a gated MoE "
            "(the single model has no gate)"
        )
    panels = []
    for model, group in groups.items():
        run = min(group, key=lambda r: r.seed)
        panels.append(
            RoutingPanel(
                model=model,
                label=run.label,
                seed=run.seed,
                seeds=len(group),
                counts=routing_counts(run),
                usage_entropy=float(run.metrics["usage_entropy"]),
                mutual_information=float(run.metrics["mutual_information"]),
            )
        )
    return panels


def _panel_title(panel: RoutingPanel, twins: bool) -> str:
    name = f"{panel.label} [{panel.model}]" if twins else panel.label
    which = f"lowest of {panel.seeds} seeds" if panel.seeds > 1 else "only seed"
    return (
        f"{name}\nseed {panel.seed} ({which})\n"
        f"H_u {panel.usage_entropy + 0.0:.2f}, I(E;Y) {panel.mutual_information + 0.0:.2f} bits"
    )


def _routing_panel(ax, panel: RoutingPanel, cmap, annotate: bool, twins: bool):
    order = panel.order
    shares = panel.shares[order]
    experts, classes = shares.shape
    image = ax.imshow(
        np.ma.masked_invalid(shares),
        cmap=cmap,
        vmin=0.0,
        vmax=1.0,
        aspect="auto",
        interpolation="nearest",
    )
    if annotate:
        for row in range(experts):
            for column in range(classes):
                share = shares[row, column]
                if math.isfinite(share) and share >= 0.1:
                    colour = "white" if share > 0.55 else TEXT_DARK
                    text = f"{100 * share:.0f}"
                    ax.text(column, row, text, ha="center", va="center", fontsize=5, color=colour)
    ax.set_xticks(range(classes), [str(c) for c in range(classes)], fontsize=5.5)
    ax.set_yticks(range(experts), [str(e) for e in order], fontsize=5.5)
    idle = set(np.flatnonzero(panel.counts.sum(axis=1) == 0).tolist())
    for tick, expert in zip(ax.get_yticklabels(), order, strict=True):
        if expert in idle:  # an expert the gate never chose: grey label, white row
            tick.set_color("#9aa5b1")
    ax.tick_params(length=0, pad=1.5)
    ax.set_xlabel("class", fontsize=6, labelpad=1)
    ax.set_ylabel("expert", fontsize=6, labelpad=1)
    ax.set_title(_panel_title(panel, twins), fontsize=6.5)
    return image


ROUTING_TITLE = (
    "Test samples of each class (column) routed to each expert (row, argmax of p(e|x)), "
    "lowest seed of each MoE model; experts sorted by their dominant class"
)
ROUTING_EXTRA = (0.45, 0.85)  # per panel: tick and axis labels; three-line title
ROUTING_FIXED = (0.9, 0.45)  # colour bar; suptitle


def plot_gated_routing(metrics: list[Path], out: Path) -> None:
    """Expert x class routing heat maps of the test split, one panel per MoE model (its
    lowest seed, said in the title with its H_u and I(E;Y)); a cell is the share of the
    class's test samples sent to the expert, so a column sums to one (numbers, in %, are
    written into the cells when the panels are large enough). Writes ``out`` (PNG) and the
    SVG beside it; an empty input, a file that is not a gated metrics file, or no MoE among
    them raises an InputError."""
    panels = routing_panels(load_gated_runs(metrics))
    experts = max(panel.counts.shape[0] for panel in panels)
    classes = max(panel.counts.shape[1] for panel in panels)
    grid = grid_layout(
        len(panels), aspect=experts / classes, extra=ROUTING_EXTRA, fixed=ROUTING_FIXED
    )
    fig = new_figure(*grid.size)
    axes = fig.subplots(grid.rows, grid.cols, squeeze=False).ravel()
    cmap = matplotlib.colormaps["Blues"].with_extremes(bad="#d9dde2")
    labels = [panel.label for panel in panels]
    image = None
    for ax, panel in zip(axes, panels, strict=False):
        twins = labels.count(panel.label) > 1
        image = _routing_panel(ax, panel, cmap, annotate=grid.side >= 2.0, twins=twins)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    bar = fig.colorbar(image, ax=axes[: len(panels)].tolist(), fraction=0.04, pad=0.02)
    bar.set_label("share of the class's test samples", fontsize=6.5)
    bar.ax.tick_params(labelsize=6)
    fig.suptitle(_wrap(ROUTING_TITLE, grid.size[0], 8.5), fontsize=8.5)
    save_figure(fig, out)


def _wrap(text: str, width_in: float, fontsize: float) -> str:
    """``text`` in lines that fit ``width_in`` inches at ``fontsize`` points."""
    import textwrap

    return textwrap.fill(text, max(30, int(width_in * 72 / (0.55 * fontsize)) - 4))


# --- accuracy against usage ---------------------------------------------------------------


@dataclass(frozen=True)
class PublishedPoint:
    label: str
    usage_entropy: float
    test_accuracy: float


def published_points(references: Path = REFERENCES) -> list[PublishedPoint]:
    """The published MNIST (E = 10) figures that give both test accuracy and H_u."""
    points = []
    for row in load_gated_references(references):
        values = row["values"]
        if (
            row["dataset"] == PUBLISHED_DATASET
            and row["experts"] == PUBLISHED_EXPERTS
            and values.get("usage_entropy") is not None
        ):
            points.append(
                PublishedPoint(row["label"], values["usage_entropy"], values["test_accuracy"])
            )
    return points


def _moe_groups(runs: Sequence[GatedRun]) -> dict[str, list[GatedRun]]:
    groups: dict[str, list[GatedRun]] = {}
    for run in runs:
        if not run.single:
            groups.setdefault(run.model, []).append(run)
    if not groups:
        raise InputError(
            f"nothing to draw: none of the {len(runs)} metrics files is of a gated MoE, "
            "so there is no usage entropy to plot"
        )
    return groups


def _draw_ours(ax, groups: dict[str, list[GatedRun]]) -> list[Any]:
    colours = model_colours(list(groups))
    labels = [group[0].label for group in groups.values()]
    texts = []
    for model, group in groups.items():
        x = np.array([run.metrics["usage_entropy"] for run in group], dtype=np.float64)
        y = np.array([run.metrics["test_accuracy"] for run in group], dtype=np.float64)
        colour = colours[model]
        ax.scatter(x, y, s=12, color=colour, alpha=0.55, linewidths=0, zorder=3)
        ax.scatter(x.mean(), y.mean(), s=70, color=colour, edgecolors=TEXT_DARK, zorder=4)
        label = group[0].label
        label += f" [{model}]" if labels.count(label) > 1 else ""
        texts.append(
            ax.annotate(
                label,
                (x.mean(), y.mean()),
                xytext=(5, 4),
                textcoords="offset points",
                fontsize=6.5,
                color=TEXT_DARK,
                zorder=5,
            )
        )
    return texts


def _draw_published(ax, points: Sequence[PublishedPoint]) -> list[Any]:
    texts = []
    for point in points:
        ax.scatter(
            point.usage_entropy,
            point.test_accuracy,
            s=42,
            marker="D",
            facecolors="none",
            edgecolors=PUBLISHED_COLOUR,
            linewidths=1.1,
            zorder=2,
        )
        texts.append(
            ax.annotate(
                point.label,
                (point.usage_entropy, point.test_accuracy),
                xytext=(5, -8),
                textcoords="offset points",
                fontsize=6,
                style="italic",
                color=PUBLISHED_COLOUR,
                zorder=2,
            )
        )
    return texts


def declutter(fig, texts: Sequence[Any], tries: int = 12) -> int:
    """Move point labels (annotations in offset points) down, one text height at a time,
    until none overlaps one placed before it (labels of higher points are placed first);
    returns how many were moved. The layout is fixed first, since moving labels needs
    their final place on the canvas."""
    fix_layout(fig)
    renderer = fig.canvas.get_renderer()
    placed, moved = [], 0
    for text in sorted(texts, key=lambda t: -t.xy[1]):
        box = text.get_window_extent(renderer).expanded(1.0, 1.15)
        for _ in range(tries):
            if not any(box.overlaps(other) for other in placed):
                break
            x, y = text.xyann
            text.xyann = (x, y - box.height * 72 / fig.dpi)
            box = text.get_window_extent(renderer).expanded(1.0, 1.15)
            moved += 1
        placed.append(box)
    return moved


def _singles(ax, runs: Sequence[GatedRun]) -> list[Line2D]:
    """The single models' mean accuracy as dotted horizontal lines (no gate, no H_u)."""
    handles = []
    groups: dict[str, list[float]] = {}
    for run in runs:
        if run.single:
            groups.setdefault(run.model, []).append(run.metrics["test_accuracy"])
    for model, values in groups.items():
        mean = float(np.mean(values))
        name = "single" if model == "single" else f"single ({model})"
        ax.axhline(mean, color="#7b8794", linestyle=":", linewidth=1.0, zorder=1)
        handles.append(
            Line2D([], [], color="#7b8794", linestyle=":", label=f"{name}: {mean:.2f} %")
        )
    return handles


def _legend_handles(points: bool, experts: Sequence[int]) -> list[Any]:
    handles: list[Any] = [
        Line2D(
            [],
            [],
            linestyle="",
            marker="o",
            markersize=3.5,
            color="#7b8794",
            alpha=0.6,
            label="ours: one seed",
        ),
        Line2D(
            [],
            [],
            linestyle="",
            marker="o",
            markersize=7,
            color="#7b8794",
            markeredgecolor=TEXT_DARK,
            label="ours: mean of a model",
        ),
    ]
    if points:
        handles.append(
            Line2D(
                [],
                [],
                linestyle="",
                marker="D",
                markersize=6,
                markerfacecolor="none",
                markeredgecolor=PUBLISHED_COLOUR,
                label="published (MNIST, E = 10)",
            )
        )
    for e in experts:
        handles.append(
            Line2D(
                [],
                [],
                color="#cb6e17",
                linestyle="--",
                label=f"log2 E = {math.log2(e):.2f} (E = {e})",
            )
        )
    return handles


def plot_accuracy_usage(metrics: list[Path], out: Path) -> None:
    """Test accuracy (%) against expert usage entropy H_u (bits): a small point per model
    and seed, a larger one per model mean labelled with the paper's label, the published
    MNIST figures (E = 10) as hollow diamonds, a dashed line at log2 E of our models and the
    single models' accuracy as dotted lines. Writes ``out`` (PNG) and the SVG beside it; an
    empty input, a file that is not a gated metrics file, or no MoE raises an InputError."""
    runs = load_gated_runs(metrics)
    groups = _moe_groups(runs)
    points = published_points()
    fig = new_figure(*viewer_size(8.0, 4.8))
    ax = fig.subplots()
    experts = sorted({run.experts for group in groups.values() for run in group})
    for e in experts:
        ax.axvline(math.log2(e), color="#cb6e17", linestyle="--", linewidth=1.0, zorder=1)
    texts = _draw_published(ax, points) + _draw_ours(ax, groups)
    singles = _singles(ax, runs)
    ax.set_xlabel("expert usage entropy H_u (bits)", fontsize=8)
    ax.set_ylabel("test accuracy (%)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(color="#e4e7eb", linewidth=0.6, zorder=0)
    ax.legend(
        handles=_legend_handles(bool(points), experts) + singles,
        fontsize=6.5,
        loc="center left",
        bbox_to_anchor=(1.01, 0.5),
        frameon=False,
    )
    dataset = runs[0].dataset
    name = DATASET_NAMES.get(dataset, dataset)
    seeds = len(runs) - sum(run.single for run in runs)
    title = f"Test accuracy against expert usage on {name}: {len(groups)} MoE models, {seeds} runs"
    if points and dataset != PUBLISHED_DATASET:
        title += f" (published points are on MNIST, not {name})"
    ax.set_title(title, fontsize=8.5)
    declutter(fig, texts)
    save_figure(fig, out)
