"""Report figures: routing maps, test predictions, learning curves, metric bars, SMoE kernels.

Every figure function takes already-produced workflow outputs (metrics JSON dicts, history
CSVs, prediction netCDFs) and writes one figure through the core's
:func:`smoe.core.report.figures.save_figure` (its naming, atomic-write and report-viewer
size rules are the core's). Figures with many panels grow wide rather than tall, and wrap
into more rows only as far as the viewer's limits allow. The
computations the pictures rest on (misrouted cells, the sample shown, bar statistics,
expert/stencil pairs) are separate functions so tests can check them without reading pixels.

Region types use the discrete viridis colours of ``results/data/mask.png``
(:func:`smoe.families.heat.mask.plot_mask`), so a type has the same colour in every picture.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.collections import PatchCollection
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from smoe.core.errors import InputError, one_line
from smoe.core.report.figures import (
    grid_layout,
    model_colours,
    new_figure,
    save_figure,
    viewer_figure,
)

CLOSE_RTOL = 0.01  # the rtol of "prcntclose1.0"
UNMATCHED = -1  # type of an expert that the matching left without a region type
MISROUTED_COLOUR = "#d62728"
UNMATCHED_COLOUR = "#9e9e9e"


# --- loading ------------------------------------------------------------------------------


def load_metrics(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """The metrics JSON files (``smoe evaluate`` output), in the order given; a missing or
    malformed file raises an InputError naming it."""
    from smoe.families.heat.aggregate import load_results

    return load_results(paths, required=("model", "metrics"))


def load_histories(paths: Iterable[str | Path]) -> dict[str, list[Path]]:
    """History CSVs grouped by model, for :func:`learning_curves_figure`.

    The workflow writes ``<models>/<model>/seed<k>/history.csv``, so the model is the name of
    the folder above the seed folder. Models keep the order of their first path.
    """
    grouped: dict[str, list[Path]] = {}
    for path in map(Path, paths):
        grouped.setdefault(path.parent.parent.name, []).append(path)
    return grouped


HISTORY_VALUES = ("train_loss", "val_prcntclose1.0")
"""A history must have at least one of these columns to be drawn."""


def read_history(path: str | Path) -> dict[str, np.ndarray]:
    """A history CSV as columns of floats (empty cells become NaN).

    A missing, unreadable, empty or malformed file (no ``epoch`` column, no rows, a row of
    the wrong length, a cell that is not a number) raises an InputError naming the file.
    """
    path = Path(path)
    name = repr(str(path))
    if not path.is_file():
        state = "is a folder" if path.is_dir() else "does not exist"
        raise InputError(f"history file {name} {state}")
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            header = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"history file {name} is not a readable CSV ({one_line(exc)})") from exc
    if "epoch" not in header:
        raise InputError(f"history file {name} is not a training history: no 'epoch' column")
    if not rows:
        raise InputError(f"history file {name} has no rows: no epoch was recorded")
    columns: dict[str, np.ndarray] = {}
    for column in header:
        values = []
        for line, row in enumerate(rows, start=2):
            if None in row or row.get(column) is None:
                raise InputError(
                    f"history file {name}, line {line}: {len(header)} columns expected"
                )
            cell = row[column]
            try:
                values.append(float(cell) if cell != "" else math.nan)
            except ValueError:
                raise InputError(
                    f"history file {name}, line {line}, column {column!r}: {cell!r} is not a number"
                ) from None
        columns[column] = np.array(values)
    return columns


# --- colours ------------------------------------------------------------------------------


def type_colours(types: int) -> np.ndarray:
    """RGBA colour of each region type, the same as in ``mask.png``."""
    return matplotlib.colormaps["viridis"].resampled(types)(np.arange(types))


def type_cmap(types: int) -> tuple[ListedColormap, BoundaryNorm]:
    """Discrete colour map over -1 (unmatched expert, grey) and the region types."""
    colours = [matplotlib.colors.to_rgba(UNMATCHED_COLOUR), *type_colours(types)]
    return ListedColormap(colours), BoundaryNorm(np.arange(-1.5, types + 0.5), types + 1)


def run_title(result: Mapping[str, Any]) -> str:
    return f"{result.get('model', '?')} seed {result.get('seed', '?')}"


# --- layout -------------------------------------------------------------------------------


def _blank(ax, note: str = "") -> None:
    """An empty panel that keeps its labels: no ticks, no frame, an optional note."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if note:
        ax.text(0.5, 0.5, note, ha="center", va="center", fontsize=7, transform=ax.transAxes)


def _percent_text(value: float) -> str:
    """A percentage to one decimal that never rounds to 100.0 or 0.0 when it is not."""
    if not math.isfinite(value):
        return "n/a"
    text = f"{value:.1f}"
    if text == "100.0" and value < 100:
        return "> 99.9"
    if text in ("0.0", "-0.0") and value > 0:
        return "< 0.1"
    return text


def metric_label(metric: str) -> str:
    """A metric's name as the figures show it: region prefixes ``mask<t>-`` become ``type t``."""
    return re.sub(r"^mask(\d+)-", r"type \1 ", metric)


# --- 1. routing ---------------------------------------------------------------------------


def expert_types(expert_map: np.ndarray, expert_to_type: Mapping[str | int, int]) -> np.ndarray:
    """Translate a map of expert indices into region types (-1 where an expert is unmatched).

    The experts' numbering is arbitrary; only after the matching (``expert_to_type``, JSON
    keys are strings) can a learned map be compared with the region map.
    """
    expert_map = np.asarray(expert_map, dtype=np.int64)
    experts = max([int(expert_map.max()) + 1, *(int(e) + 1 for e in expert_to_type)])
    lookup = np.full(experts, UNMATCHED, dtype=np.int64)
    for expert, region in expert_to_type.items():
        lookup[int(expert)] = int(region)
    return lookup[expert_map]


def misrouted_cells(
    expert_map: np.ndarray, expert_to_type: Mapping[str | int, int], mask: np.ndarray
) -> np.ndarray:
    """Boolean map of the cells whose majority expert is not matched to the cell's type."""
    mask = np.asarray(mask)
    types = expert_types(expert_map, expert_to_type)
    if types.shape != mask.shape:
        raise ValueError(f"routing map {types.shape} and region map {mask.shape} differ")
    return types != mask


def _sources(runs: Sequence[Mapping[str, Any]], sources: Sequence[str | Path] | None) -> list:
    """Each result's name in messages: its file when known, else its model and seed."""
    if sources is not None and len(sources) == len(runs):
        return [repr(str(source)) for source in sources]
    return [run_title(result) for result in runs]


def _described(names: Sequence[str], sources: Sequence[str | Path] | None) -> str:
    what = "metrics files" if sources is not None else "results"
    return f"{what} {', '.join(names) or '(none)'}"


ROUTING_KEYS = ("map", "expert_to_type", "agreement")
KERNEL_KEYS = ("kernels", "stencils", "expert_to_type")


def _check_routing(result: Mapping[str, Any], name: str, keys: Sequence[str]) -> None:
    """A result's routing section has ``keys`` (else an InputError naming the result)."""
    routing = result.get("routing")
    if not isinstance(routing, Mapping):
        raise InputError(f"metrics {name}: 'routing' is not a routing section")
    missing = [key for key in keys if key not in routing]
    if missing:
        raise InputError(
            f"metrics {name}: the routing section lacks {', '.join(map(repr, missing))}; "
            "it is not what smoe evaluate writes: re-run the evaluation"
        )


def routing_runs(
    runs: Iterable[Mapping[str, Any]], sources: Sequence[str | Path] | None = None
) -> list[Mapping[str, Any]]:
    """The results that carry a routing map (SMoE models); others are skipped.

    A routing section without the matching or the agreement raises an InputError naming
    its file (``sources``, parallel to ``runs``) or its model and seed.
    """
    runs = list(runs)
    selected = []
    for result, name in zip(runs, _sources(runs, sources), strict=True):
        if result.get("routing") and result["routing"].get("map") is not None:
            _check_routing(result, name, ROUTING_KEYS)
            selected.append(result)
    return selected


def _draw_types(ax, types_map: np.ndarray, types: int, title: str) -> None:
    cmap, norm = type_cmap(types)
    ax.imshow(types_map, cmap=cmap, norm=norm, interpolation="nearest")
    ax.set_title(title, fontsize=8.5)
    ax.set_xticks([])
    ax.set_yticks([])


def mark_cells(ax, cells: np.ndarray) -> None:
    """A red frame around every True cell of ``cells`` (an image's grid).

    No fill: the cell keeps the colour of the type it was routed to, which is the point.
    """
    cells = np.asarray(cells, dtype=bool)
    width = cells.shape[1]
    rows, cols = np.nonzero(cells)
    boxes = [Rectangle((c - 0.5, r - 0.5), 1, 1) for r, c in zip(rows, cols, strict=True)]
    line = max(0.9, min(2.0, 64 / max(width, 1)))
    ax.add_collection(
        PatchCollection(
            boxes,
            facecolor="none",
            edgecolor=MISROUTED_COLOUR,
            linewidth=line,
        )
    )


def routing_figure(
    mask: np.ndarray,
    runs: list[dict[str, Any]],
    out: str | Path,
    sources: Sequence[str | Path] | None = None,
) -> tuple[Path, Path]:
    """The true region map beside each SMoE run's learned routing, misrouted cells in red.

    Each learned map is the majority expert per cell translated to region types with the
    run's expert/type matching, so a perfect router looks exactly like the truth panel.
    Results without routing (non-SMoE models) are skipped; when none has routing, or a
    routing map's grid is not the region map's, an InputError names the inputs
    (``sources``: the files of ``runs``, in the same order).
    """
    mask = np.asarray(mask, dtype=np.int64)
    names = _sources(runs, sources)
    named = dict(zip(map(id, runs), names, strict=True))
    runs = routing_runs(runs, sources)
    if not runs:
        raise InputError(
            f"routing figure: none of the {_described(names, sources)} has a routing map "
            "(only SMoE models have one); nothing to draw"
        )
    for result in runs:
        shape = np.shape(result["routing"]["map"])
        if shape != mask.shape:
            raise InputError(
                f"routing figure: the routing map of {named[id(result)]} is "
                f"{'x'.join(map(str, shape))} but the region map is "
                f"{mask.shape[0]}x{mask.shape[1]}: they come from different grids"
            )
    types = int(mask.max()) + 1
    for result in runs:
        types = max(types, 1 + max(result["routing"]["expert_to_type"].values(), default=0))
    panels = 1 + len(runs)
    grid = grid_layout(panels, aspect=mask.shape[0] / mask.shape[1], extra=(0.2, 0.45))
    fig = new_figure(*grid.size, layout="compressed")
    axes = np.atleast_1d(fig.subplots(grid.rows, grid.cols, squeeze=False)).ravel()
    _draw_types(axes[0], mask, types, f"true region map\n{mask.shape[0]}x{mask.shape[1]}")
    unmatched = False
    for ax, result in zip(axes[1:], runs, strict=False):
        routing = result["routing"]
        learned = expert_types(routing["map"], routing["expert_to_type"])
        wrong = misrouted_cells(routing["map"], routing["expert_to_type"], mask)
        unmatched |= bool((learned == UNMATCHED).any())
        title = (
            f"{run_title(result)}\nagreement {routing['agreement']:.2f} %, "
            f"{int(wrong.sum())} misrouted"
        )
        _draw_types(ax, learned, types, title)
        mark_cells(ax, wrong)
    for ax in axes[panels:]:
        ax.set_axis_off()
    handles = [Patch(color=c, label=f"type {t}") for t, c in enumerate(type_colours(types))]
    if unmatched:
        handles.append(Patch(color=UNMATCHED_COLOUR, label="unmatched expert"))
    handles.append(Patch(facecolor="none", edgecolor=MISROUTED_COLOUR, label="misrouted cell"))
    fig.legend(
        handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False
    )
    return save_figure(fig, out)


# --- 2. predictions -----------------------------------------------------------------------


# --- 3. learning curves -------------------------------------------------------------------


def learning_curves_figure(histories: dict[str, list[Path]], out: str | Path) -> tuple[Path, Path]:
    """Training loss and validation prcntclose1.0 over epochs, a thin line per seed.

    Models without training columns (persistence: one validation row) have no loss curve;
    their validation value is drawn as a dashed horizontal line, a floor to beat.
    """
    read = {
        model: [(Path(p), read_history(p)) for p in paths] for model, paths in histories.items()
    }
    read = {model: items for model, items in read.items() if items}
    if not read:
        raise InputError("learning curves: no history files given")
    for items in read.values():
        for path, history in items:
            if not any(column in history for column in HISTORY_VALUES):
                raise InputError(
                    f"history file {str(path)!r} has none of the columns "
                    f"{', '.join(HISTORY_VALUES)}: nothing to draw from it"
                )
    fig = viewer_figure(11, 4.2)
    loss_ax, close_ax = fig.subplots(1, 2)
    colours = model_colours(list(read))
    handles = []
    for model, items in read.items():
        colour = colours[model]
        style = "-"
        for _, history in items:
            trained = "train_loss" in history and len(history.get("epoch", [])) > 0
            if trained:
                loss = history["train_loss"]
                keep = np.isfinite(loss) & (loss > 0)
                loss_ax.plot(history["epoch"][keep], loss[keep], color=colour, lw=0.9, alpha=0.8)
            close = history.get("val_prcntclose1.0")
            if close is None or not len(close):
                continue
            if trained:
                close_ax.plot(history["epoch"], close, color=colour, lw=0.9, alpha=0.8)
            else:
                style = "--"
                close_ax.axhline(float(close[-1]), color=colour, lw=1.0, ls="--")
        handles.append(Line2D([], [], color=colour, ls=style, label=model))
    loss_ax.set_yscale("log")
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="training loss")
    close_ax.set(
        xlabel="epoch", ylabel="prcntclose1.0 (%)", title="validation prcntclose1.0 (rtol 0.01)"
    )
    for ax in (loss_ax, close_ax):
        ax.grid(True, which="major", alpha=0.3)
    if handles:
        fig.legend(
            handles=handles,
            loc="outside right center",
            fontsize=8,
            frameon=False,
            title="model (lines: seeds)",
            title_fontsize=8,
        )
    return save_figure(fig, out)


# --- 4. metric bars -----------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    """Mean and spread of a metric over seeds (std with ddof=1; 0 for a single seed)."""

    mean: float
    std: float
    n: int


def metric_values(
    summary: Iterable[Mapping[str, Any]], metrics: Sequence[str]
) -> dict[str, dict[str, list[float]]]:
    """Per model (in order of first appearance) and metric: the value of every seed, in the
    order given; missing or NaN values are left out."""
    values: dict[str, dict[str, list[float]]] = {}
    for result in summary:
        per_model = values.setdefault(result["model"], {m: [] for m in metrics})
        for metric in metrics:
            value = result.get("metrics", {}).get(metric)
            if value is not None and math.isfinite(float(value)):
                per_model[metric].append(float(value))
    return values


def metric_stats(
    summary: Iterable[Mapping[str, Any]], metrics: Sequence[str]
) -> dict[str, dict[str, Stat]]:
    """Per model (in order of first appearance) and metric: mean and std over seeds.

    The sample standard deviation (ddof=1) is the usual spread across a few seeds; missing
    or NaN values are left out, and a metric no seed reports gets a NaN mean.
    """
    stats: dict[str, dict[str, Stat]] = {}
    for model, per_model in metric_values(summary, metrics).items():
        stats[model] = {}
        for metric, seen in per_model.items():
            data = np.asarray(seen, dtype=np.float64)
            mean = float(data.mean()) if data.size else math.nan
            std = float(data.std(ddof=1)) if data.size > 1 else 0.0
            stats[model][metric] = Stat(mean, std, int(data.size))
    return stats


def metric_scale(metric: str, values: Iterable[float] = ()) -> str:
    """How a metric is drawn: ``"percent"`` (bars on a linear 0-100 axis), ``"log"`` (points
    on a log axis: errors such as nrmse, and any positive metric spanning more than two
    decades; bars would start at an arbitrary floor) or ``"linear"`` (bars)."""
    base = re.sub(r"^mask\d+-", "", metric)
    if "prcnt" in base:
        return "percent"
    positive = [v for v in values if math.isfinite(v) and v > 0]
    if not positive:
        return "linear"
    if base.endswith(("mse", "mae")) or max(positive) > 100 * min(positive):
        return "log"
    return "linear"


def seeds_title(stats: Mapping[str, Mapping[str, Stat]], seeds: set[str]) -> str:
    """The bars figure's title: what the bars and the error bars are, and over how many seeds."""
    counts = sorted({s.n for per in stats.values() for s in per.values() if s.n})
    if counts[-1] == 1:
        which = f" (seed {next(iter(seeds))})" if len(seeds) == 1 else " per model"
        return f"test metrics of one seed{which}: no spread to show, no error bars"
    if len(counts) == 1:
        return f"test metrics: mean ± std over {counts[0]} seeds (dots: the single seeds)"
    return (
        f"test metrics: mean ± std over {counts[0]}-{counts[-1]} seeds per model "
        "(dots: the single seeds; no error bar for a model with one seed)"
    )


def _value_text(value: float, scale: str) -> str:
    if not math.isfinite(value):
        return "n/a"
    if scale == "percent":
        return _percent_text(value)
    return f"{value:.2g}" if scale == "log" or abs(value) < 0.1 else f"{value:.1f}"


def _metric_panel(ax, models, stats, values, metric, colours) -> None:
    """One metric: bars (or points on a log axis), seed dots and std error bars for models
    with more than one seed, and each model's mean in a row above the axes."""
    x = np.arange(len(models), dtype=np.float64)
    means = np.array([stats[m][metric].mean for m in models])
    stds = np.array([stats[m][metric].std for m in models])
    counts = np.array([stats[m][metric].n for m in models])
    seen = [values[m][metric] for m in models]
    scale = metric_scale(metric, [v for vals in seen for v in vals])
    finite = np.isfinite(means)
    if scale == "log":
        positive = [v for vals in seen for v in vals if v > 0]
        positive += [float(m - s) for m, s in zip(means, stds, strict=True) if m - s > 0]
        top = max(float(np.nanmax(np.where(finite, means + stds, np.nan))), max(positive))
        bottom = min(positive) / 3
        ax.set_yscale("log")
        ax.set_ylim(bottom, top * 3)
        for xi, mean, model in zip(x, means, models, strict=True):
            if not math.isfinite(mean):
                continue
            if mean > 0:
                ax.plot([xi], [mean], ls="none", marker="o", ms=6.5, color=colours[model], zorder=3)
            else:  # below any log axis: a marker on its floor
                ax.plot(
                    [xi],
                    [0.0],
                    ls="none",
                    marker="v",
                    ms=6.5,
                    color=colours[model],
                    transform=ax.get_xaxis_transform(),
                    clip_on=False,
                    zorder=3,
                )
        # a std reaching 0 or below runs off the bottom of the axis
        lower = np.where(means - stds > 0, stds, means - bottom / 2)
    else:
        ax.bar(x, np.where(finite, means, 0.0), width=0.7, color=[colours[m] for m in models])
        lower = stds
        if scale == "percent":
            ax.set_ylim(0, 100)
        elif not finite.any() or float(np.min((means - stds)[finite])) >= 0:
            ax.set_ylim(bottom=0)
    spread = finite & (counts > 1)
    if spread.any():
        for i in np.flatnonzero(spread):
            dots = seen[i]
            offsets = np.linspace(-0.18, 0.18, len(dots))
            ax.plot(x[i] + offsets, dots, ls="none", marker=".", ms=4, color="black", zorder=4)
        ax.errorbar(
            x[spread],
            means[spread],
            yerr=[lower[spread], stds[spread]],
            fmt="none",
            ecolor="black",
            elinewidth=0.9,
            capsize=3,
            zorder=5,
        )
    many = len(models) > 5
    for xi, mean in zip(x, means, strict=True):
        ax.annotate(
            _value_text(mean, scale),
            (xi, 1.0),
            xycoords=ax.get_xaxis_transform(),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            va="bottom",
            rotation=90 if many else 0,
            fontsize=6.5,
        )
    ax.set_xlim(-0.6, len(models) - 0.4)
    ax.set_xticks(x, models, rotation=40 if many else 0, ha="right" if many else "center")
    ax.tick_params(axis="x", labelsize=7.5)
    ax.tick_params(axis="y", labelsize=7.5)
    unit = {"percent": "%", "log": "log scale", "linear": ""}[scale]
    ax.set_ylabel(unit, fontsize=8)
    ax.set_title(metric_label(metric), fontsize=9, pad=28 if many else 12)
    ax.grid(True, axis="y", which="major", alpha=0.3)


def metric_bars_figure(
    summary: list[dict[str, Any]],
    out: str | Path,
    metrics: Sequence[str] = ("prcntclose1.0", "prcntclose1.0s", "nrmse"),
    sources: Sequence[str | Path] | None = None,
) -> tuple[Path, Path]:
    """One panel per metric with each model's value; the means are written above the axes.

    Percentages are bars on a linear 0-100 axis. Error metrics (nrmse: orders of magnitude
    between a matched SMoE and the baselines) and any metric spanning decades are points on
    a log axis, where a bar's length would mean nothing (:func:`metric_scale`). With one seed
    the figure says so and draws no error bars; with several, bars and points are means,
    each seed is a dot and the error bars are the standard deviation over seeds. Region
    types are named "type t" (:func:`metric_label`). A metric that no result has is drawn
    as 'n/a'; when no result has any of ``metrics`` an InputError names the inputs
    (``sources``, the files of ``summary`` in order).
    """
    stats = metric_stats(summary, metrics)
    if not any(stat.n for per_model in stats.values() for stat in per_model.values()):
        names = _sources(summary, sources)
        raise InputError(
            f"metric bars: none of the {_described(names, sources)} has a value of "
            f"{', '.join(metrics)}; nothing to draw"
        )
    values = metric_values(summary, metrics)
    models = list(stats)
    colours = model_colours(models)
    fig = viewer_figure(max(3.6 * len(metrics), 5.0), 4.2)
    axes = np.atleast_1d(fig.subplots(1, len(metrics), squeeze=False)).ravel()
    for ax, metric in zip(axes, metrics, strict=True):
        _metric_panel(ax, models, stats, values, metric, colours)
    seeds = {str(result.get("seed", "?")) for result in summary}
    fig.suptitle(seeds_title(stats, seeds), fontsize=9.5)
    return save_figure(fig, out)


# --- 5. kernels ---------------------------------------------------------------------------


KERNEL_EXTRA = (0.1, 0.25)  # per panel: gap; its title
KERNEL_FIXED = (0.55, 0.75)  # row labels; column headers and suptitle
