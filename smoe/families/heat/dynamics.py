"""How an SMoE learned its routing: training dynamics per epoch and expert x region counts.

* :func:`dynamics_figure`: per SMoE model a row of three panels over the epochs, one line
  per seed: the misrouted fraction during training (``train_misrouted``), the
  routing-classification loss (``train_rc``) and the routing agreement on validation
  (``val_routing_agreement``, percent), with each seed's best validation epoch (``best_epoch``
  of the ``train.json`` beside its ``history.csv``) marked.
* :func:`expert_region_figure`: per SMoE model and seed the count matrix of the final layer's
  top-1 expert against the true region type (``routing.confusion`` of ``smoe evaluate``),
  coloured by the share of the expert's points, the matched expert/type pairs outlined.

Both figures are written through :func:`smoe.families.heat.figures.save_figure` (PNG + SVG) and
sized for a report viewer whatever the number of models and seeds: at most 11 x 6 inches
(1650 x 900 pixels at the figures' DPI) and at most 0.6 as high as wide; panels shrink
instead (the viewer's hard limits are a ratio of 0.62 and 1000 pixels).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator

from smoe.core.errors import InputError
from smoe.core.report.figures import new_figure, save_figure
from smoe.families.heat.figures import read_history, type_colours

MAX_WIDTH_IN = 11.0  # 1650 px at DPI 150
MAX_HEIGHT_IN = 6.0  # 900 px
MAX_ASPECT = 0.6  # height / width

DYNAMICS_COLUMNS = ("train_misrouted", "train_rc", "val_routing_agreement")
"""The columns of an SMoE training history (``smoe.core.train.loop``) that the figure draws."""
AGREEMENT_COLUMN = "val_routing_agreement"
ROUTING_LOSS_COLUMNS = ("train_rc", "train_misrouted")
BEST_MARKER = dict(marker="*", markersize=9, markeredgecolor="black", markeredgewidth=0.6)
MATCH_COLOUR = "#e6550d"
SEEDS_PER_ROW = 5


def _seed_colours(count: int) -> list:
    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10) for i in range(count)]


def _seed_of(path: Path, fallback: int) -> int:
    """The seed of ``<model>/seed<k>/history.csv``; ``fallback`` for other layouts."""
    match = re.fullmatch(r"seed(\d+)", path.parent.name)
    return int(match.group(1)) if match else fallback


# --- 1. training dynamics -----------------------------------------------------------------


@dataclass
class SeedHistory:
    """One seed's history columns, and its best validation epoch when known."""

    path: Path
    seed: int
    columns: dict[str, np.ndarray]
    best_epoch: int | None


def is_smoe_history(columns: Mapping[str, np.ndarray]) -> bool:
    """A history of a model with SMoE layers: the trainer records the validation routing
    agreement for those only. Histories written before that column existed count when
    their routing-classification loss or misrouted fraction is non-zero (other models
    record zeros there)."""
    if AGREEMENT_COLUMN in columns:
        return True
    return any(
        column in columns and bool(np.any(np.nan_to_num(columns[column]) != 0))
        for column in ROUTING_LOSS_COLUMNS
    )


def best_epoch_of(history: str | Path) -> int | None:
    """``best_epoch`` of the ``train.json`` beside a ``history.csv``; None when that file is
    missing, unreadable or has no best epoch (the figure then just marks nothing)."""
    path = Path(history).with_name("train.json")
    try:
        value = json.loads(path.read_text()).get("best_epoch")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def smoe_histories(histories: Mapping[str, Sequence[str | Path]]) -> dict[str, list[SeedHistory]]:
    """The SMoE histories of ``histories`` (model -> history files, as
    :func:`smoe.families.heat.figures.load_histories` groups them), read, ordered by seed; other
    models are left out. Unreadable files raise an InputError naming them."""
    selected: dict[str, list[SeedHistory]] = {}
    for model, paths in histories.items():
        runs = []
        for index, path in enumerate(map(Path, paths)):
            columns = read_history(path)
            if is_smoe_history(columns):
                runs.append(SeedHistory(path, _seed_of(path, index), columns, best_epoch_of(path)))
        if runs:
            selected[model] = sorted(runs, key=lambda run: run.seed)
    return selected


def _log_scale(values: Sequence[np.ndarray]) -> bool:
    """Log y only for positive values that span more than two decades."""
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.array([])
    if not finite.size or np.any(finite <= 0):
        return False
    return float(finite.max()) / float(finite.min()) > 100.0


def _markevery(length: int) -> int:
    return max(1, math.ceil(length / 40))


def _dynamics_row(subfig, model: str, runs: Sequence[SeedHistory], compact: bool) -> None:
    axes = subfig.subplots(1, 3)
    mis_ax, rc_ax, agree_ax = axes
    colours = _seed_colours(len(runs))
    handles = []
    marked = False
    for run, colour in zip(runs, colours, strict=True):
        epochs = run.columns["epoch"]
        label = f"{model} seed {run.seed}"
        for ax, column in zip(axes, DYNAMICS_COLUMNS, strict=True):
            values = run.columns.get(column)
            if values is None:
                continue
            style = {}
            if column == "train_rc" or len(epochs) == 1:
                style = dict(marker="o", markersize=2.5, markevery=_markevery(len(epochs)))
            ax.plot(epochs, values, color=colour, lw=1.0, alpha=0.9, label=label, **style)
            best = run.best_epoch
            hits = np.nonzero(epochs == best)[0] if best is not None else []
            if len(hits) and np.isfinite(values[hits[0]]):
                ax.plot(
                    [best], [values[hits[0]]], color=colour, ls="none", label=f"_best {label}",
                    **BEST_MARKER,
                )  # fmt: skip
                marked = True
        handles.append(Line2D([], [], color=colour, lw=1.2, label=label))
    if marked:
        handles.append(
            Line2D([], [], color="white", ls="none", label="best val. epoch", **BEST_MARKER)
        )

    rc = [run.columns["train_rc"] for run in runs if "train_rc" in run.columns]
    if _log_scale(rc):
        rc_ax.set_yscale("log")
    elif rc and all(np.all(np.nan_to_num(v) == 0) for v in rc):
        rc_ax.text(0.5, 0.5, "RC loss off (0)", transform=rc_ax.transAxes, ha="center")
    if not any(AGREEMENT_COLUMN in run.columns for run in runs):
        agree_ax.text(
            0.5, 0.5, "not recorded\n(history predates it)", transform=agree_ax.transAxes,
            ha="center", va="center", fontsize=8,
        )  # fmt: skip
    mis_ax.set_ylim(bottom=0)
    agree_ax.set_ylim(0, 101)  # a line at 100 % stays visible
    agree_ax.set_yticks(range(0, 101, 20))
    fontsize = 7 if compact else 8
    titles = (
        ("misrouted fraction", "misrouted fraction (training)"),
        ("RC loss", "routing-classification loss (training)"),
        ("agreement (%)", "routing agreement (validation)"),
    )
    for ax, (ylabel, title) in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=fontsize + 1)
        ax.set_ylabel(ylabel, fontsize=fontsize)
        ax.set_xlabel("epoch", fontsize=fontsize)
        ax.tick_params(labelsize=fontsize - 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, which="major", alpha=0.3)
    subfig.suptitle(model, fontsize=fontsize + 2, fontweight="bold")
    subfig.legend(
        handles=handles,
        loc="outside right center",
        fontsize=fontsize - 1,
        frameon=False,
        ncol=1 if len(handles) <= 12 or not compact else 2,
    )


def dynamics_figure(histories: dict[str, list[Path]], out: str | Path) -> tuple[Path, Path]:
    """Per SMoE model, three panels over the epochs, one line per seed ("<model> seed k"):
    misrouted fraction (training), routing-classification loss (training; log scale when
    positive and spanning more than two decades) and routing agreement on validation
    (0-100 %), each seed's best validation epoch marked with a star.

    ``histories`` maps a model to its ``history.csv`` files
    (:func:`smoe.families.heat.figures.load_histories`). Models without SMoE layers are skipped;
    when no SMoE history is among the inputs an InputError says so.
    """
    runs = smoe_histories(histories)
    if not runs:
        given = [str(p) for paths in histories.values() for p in paths]
        raise InputError(
            "dynamics figure: no SMoE history was given (none of the history files "
            f"{', '.join(map(repr, given)) or '(none)'} has the routing columns "
            f"{', '.join(DYNAMICS_COLUMNS)} of a model with SMoE layers)"
        )
    rows = len(runs)
    row_height = min(3.3, MAX_HEIGHT_IN / rows)
    fig = new_figure(MAX_WIDTH_IN, row_height * rows)
    subfigs = fig.subfigures(rows, 1, squeeze=False)[:, 0]
    compact = row_height < 3.0
    for subfig, (model, items) in zip(subfigs, runs.items(), strict=True):
        _dynamics_row(subfig, model, items, compact)
    return save_figure(fig, out)


# --- 2. expert x region-type counts -------------------------------------------------------


def _name(result: Mapping[str, Any], index: int, sources: Sequence[str | Path] | None) -> str:
    if sources is not None and index < len(sources):
        return repr(str(sources[index]))
    return f"{result.get('model', '?')} seed {result.get('seed', '?')}"


def confusion_runs(
    metrics: Sequence[Mapping[str, Any]], sources: Sequence[str | Path] | None = None
) -> dict[str, list[Mapping[str, Any]]]:
    """The results with a routing section (SMoE models), grouped by model in the order first
    seen and ordered by seed. A routing section without a usable ``confusion`` (E x T
    counts) or ``expert_to_type`` raises an InputError naming the result (``sources``:
    the files of ``metrics``, in the same order)."""
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for index, result in enumerate(metrics):
        routing = result.get("routing") if isinstance(result, Mapping) else None
        if not routing:
            continue
        name = _name(result, index, sources)
        if not isinstance(routing, Mapping):
            raise InputError(f"metrics {name}: 'routing' is not a routing section")
        missing = [key for key in ("confusion", "expert_to_type") if key not in routing]
        if missing:
            raise InputError(
                f"metrics {name}: the routing section lacks {', '.join(map(repr, missing))}; "
                "it is not what smoe evaluate writes: re-run the evaluation"
            )
        try:
            confusion = np.asarray(routing["confusion"], dtype=np.float64)
        except (TypeError, ValueError):
            confusion = np.array([])
        if confusion.ndim != 2 or not confusion.size or not np.all(np.isfinite(confusion)):
            raise InputError(f"metrics {name}: routing 'confusion' is not an E x T count matrix")
        grouped.setdefault(str(result.get("model", "?")), []).append(result)
    for items in grouped.values():
        items.sort(key=_seed_key)
    return grouped


def _seed_key(result: Mapping[str, Any]) -> tuple[int, float, str]:
    """Numeric seeds in order, then anything else by its text."""
    seed = result.get("seed")
    try:
        return (0, float(seed), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(seed))


def row_shares(confusion: np.ndarray) -> np.ndarray:
    """Each expert's counts as percent of its points (rows of zeros stay 0)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    totals = confusion.sum(axis=1, keepdims=True)
    return np.divide(100.0 * confusion, totals, out=np.zeros_like(confusion), where=totals > 0)


def compact_count(value: float) -> str:
    """A count in at most 5 characters: 950, 12.3k, 1.45M."""
    value = float(value)
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            scaled = value / limit
            return f"{scaled:.3g}{suffix}" if scaled < 100 else f"{scaled:.0f}{suffix}"
    return f"{value:.0f}"


SHARE_CMAP = "Blues"


def _confusion_panel(ax, result: Mapping[str, Any], fontsize: float, show_shares: bool) -> None:
    routing = result["routing"]
    confusion = np.asarray(routing["confusion"], dtype=np.float64)
    experts, types = confusion.shape
    shares = row_shares(confusion)
    ax.imshow(shares, cmap=SHARE_CMAP, vmin=0, vmax=100, interpolation="nearest", aspect="auto")
    for e in range(experts):
        for t in range(types):
            dark = shares[e, t] > 55
            text = compact_count(confusion[e, t])
            if show_shares:
                text += f"\n{shares[e, t]:.0f} %"
            ax.text(
                t, e, text, ha="center", va="center", fontsize=fontsize,
                color="white" if dark else "black", linespacing=1.1,
            )  # fmt: skip
    for expert, region in routing["expert_to_type"].items():
        e, t = int(expert), int(region)
        if 0 <= e < experts and 0 <= t < types:
            ax.add_patch(
                Rectangle(
                    (t - 0.47, e - 0.47), 0.94, 0.94, fill=False, edgecolor=MATCH_COLOUR, lw=1.8
                )
            )
    # A strip in each region type's colour (as in mask.png) above its column.
    colours = type_colours(types)
    for t in range(types):
        ax.add_patch(Rectangle((t - 0.5, -0.78), 1, 0.22, color=colours[t], lw=0))
    ax.set_ylim(experts - 0.5, -0.8)
    ax.set_xlim(-0.5, types - 0.5)
    ax.set_xticks(range(types), [f"type {t}" for t in range(types)], fontsize=fontsize + 0.5)
    ax.set_yticks(range(experts), [f"expert {e}" for e in range(experts)], fontsize=fontsize + 0.5)
    ax.tick_params(length=0, pad=1.5)
    for spine in ax.spines.values():
        spine.set_visible(False)
    agreement = routing.get("agreement")
    agreed = f"agreement {float(agreement):.1f} %" if agreement is not None else "agreement ?"
    ax.set_title(
        f"{result.get('model', '?')} seed {result.get('seed', '?')}\n{agreed}",
        fontsize=fontsize + 1.5,
        linespacing=1.1,
    )


def expert_region_figure(
    metrics: list[dict[str, Any]],
    out: str | Path,
    sources: Sequence[str | Path] | None = None,
) -> tuple[Path, Path]:
    """Per SMoE model and seed, the final layer's expert x region-type count matrix (rows
    "expert e", columns "type t", from ``routing["confusion"]`` of ``smoe evaluate``): the
    counts written in the cells, the colour the share of the expert's points (row-normalised
    %), the matched pairs (``expert_to_type``) outlined, the title naming model, seed and
    agreement. A model's seeds sit side by side, at most five to a row.

    Results without routing (models without SMoE layers) are skipped; when none has one,
    an InputError names the inputs (``sources``: the files of ``metrics``, same order).
    """
    grouped = confusion_runs(metrics, sources)
    if not grouped:
        names = [_name(r, i, sources) for i, r in enumerate(metrics)]
        raise InputError(
            "expert/region figure: none of the results "
            f"{', '.join(names) or '(none)'} has a routing section (no SMoE model given)"
        )
    blocks = [
        items[start : start + SEEDS_PER_ROW]
        for items in grouped.values()
        for start in range(0, len(items), SEEDS_PER_ROW)
    ]
    rows = len(blocks)
    columns = max(len(block) for block in blocks)
    shape = max(np.asarray(r["routing"]["confusion"]).shape[0] for b in blocks for r in b)
    # Panel sizes in inches: as large as the viewer allows, smaller for many seeds.
    row_height = min(2.6, 0.55 + 0.55 * shape, (MAX_HEIGHT_IN - 0.55) / rows)
    panel_width = min(1.15 * row_height + 0.45, (MAX_WIDTH_IN - 1.3) / columns)
    height = rows * row_height + 0.55
    width = min(MAX_WIDTH_IN, max(columns * panel_width + 1.3, 6.0, height / MAX_ASPECT))
    fig = new_figure(width, height)
    grid = fig.add_gridspec(rows, columns)
    fontsize = float(np.clip(2.6 * row_height, 5.0, 7.5))
    show_shares = row_height >= 1.9
    for row, block in enumerate(blocks):
        for column, result in enumerate(block):
            ax = fig.add_subplot(grid[row, column])
            _confusion_panel(ax, result, fontsize, show_shares)
            if column:
                ax.tick_params(labelleft=False)
    mappable = matplotlib.cm.ScalarMappable(
        norm=matplotlib.colors.Normalize(0, 100), cmap=SHARE_CMAP
    )
    bar = fig.colorbar(mappable, ax=fig.axes, shrink=min(0.9, 2.4 / height), aspect=25)
    bar.set_label("share of the expert's points (%)", fontsize=fontsize + 0.5)
    bar.ax.tick_params(labelsize=fontsize)
    fig.legend(
        handles=[Patch(facecolor="none", edgecolor=MATCH_COLOUR, lw=1.8, label="matched pair")],
        loc="outside lower right",
        fontsize=fontsize + 0.5,
        frameon=False,
    )
    fig.suptitle(
        "final SMoE layer: points per expert (top-1) and true region type",
        fontsize=fontsize + 2.5,
    )
    return save_figure(fig, out)
