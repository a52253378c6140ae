"""Report figures: routing maps, test predictions, learning curves, metric bars, SMoE kernels.

Every figure function takes already-produced workflow outputs (metrics JSON dicts, history
CSVs, prediction netCDFs) and writes one figure through :func:`save_figure`, whose rule is:

* ``out`` names the figure without or with a ``.png``/``.svg`` suffix; both
  ``<name>.png`` and ``<name>.svg`` are written (any other suffix is part of the name, so
  ``routing.seed0`` gives ``routing.seed0.png``);
* each file is written under ``<file>.partial`` and renamed into place, parent folders are
  created, so a killed job never leaves a file that looks finished.

Figures are plain :class:`matplotlib.figure.Figure` objects on an Agg canvas, never pyplot
figures: no global backend switch, no figure manager to leak, nothing to close. The
computations the pictures rest on (misrouted cells, the sample shown, bar statistics,
expert/stencil pairs) are separate functions so tests can check them without reading pixels.

Region types use the discrete viridis colours of ``results/data/mask.png``
(:func:`smoe.data.mask.plot_mask`), so a type has the same colour in every picture.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import xarray as xr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PatchCollection
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from smoe.atomic import atomic_file
from smoe.errors import InputError, one_line

FORMATS = ("png", "svg")
DPI = 150
CLOSE_RTOL = 0.01  # the rtol of "prcntclose1.0"
UNMATCHED = -1  # type of an expert that the matching left without a region type
MISROUTED_COLOUR = "#d62728"
UNMATCHED_COLOUR = "#9e9e9e"


# --- saving -------------------------------------------------------------------------------


def figure_paths(out: str | Path) -> tuple[Path, Path]:
    """The PNG and SVG paths of a figure: a trailing .png/.svg is dropped, others are kept."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix.lower() in (".png", ".svg") else out
    png, svg = (stem.with_name(f"{stem.name}.{fmt}") for fmt in FORMATS)
    return png, svg


def new_figure(width: float, height: float) -> Figure:
    """A constrained-layout figure on its own Agg canvas (independent of pyplot's state)."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, out: str | Path) -> tuple[Path, Path]:
    """Write ``fig`` as PNG and SVG (see the module docstring for the naming rule).

    SVG ids are salted with a constant and no date is stored, so reruns give identical
    files and Snakemake does not see spurious changes; SVG text stays text (editable, small).
    The figure is cleared afterwards to free its artists at once.
    """
    paths = figure_paths(out)
    with matplotlib.rc_context({"svg.hashsalt": "smoe", "svg.fonttype": "none"}):
        for path, fmt in zip(paths, FORMATS, strict=True):
            metadata = {"Date": None} if fmt == "svg" else {}
            with atomic_file(path) as partial:
                fig.savefig(partial, format=fmt, dpi=DPI, metadata=metadata)
    fig.clear()
    return paths


# --- loading ------------------------------------------------------------------------------


def load_metrics(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """The metrics JSON files (``smoe evaluate`` output), in the order given; a missing or
    malformed file raises an InputError naming it."""
    from smoe.report.aggregate import load_results

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


def model_colours(models: Sequence[str]) -> dict[str, Any]:
    """One tab10 colour per model, by position, so a figure's models stay distinguishable."""
    cmap = matplotlib.colormaps["tab10"]
    return {name: cmap(i % 10) for i, name in enumerate(models)}


def run_title(result: Mapping[str, Any]) -> str:
    return f"{result.get('model', '?')} seed {result.get('seed', '?')}"


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
    ax.set_title(title, fontsize=9)
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
    cols = min(panels, 4)
    rows = math.ceil(panels / cols)
    fig = new_figure(2.9 * cols, 3.3 * rows + 0.5)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
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


@dataclass(frozen=True)
class Sample:
    """One model's prediction of one test frame, with the frames it is compared to."""

    model: str
    seed: Any
    run: int
    time: int
    input: np.ndarray | None  # the true frame at time - 1 (None if no file holds it)
    target: np.ndarray
    prediction: np.ndarray

    @property
    def error(self) -> np.ndarray:
        return self.prediction - self.target

    @property
    def close(self) -> float:
        """prcntclose1.0 of this one frame, with the metric's definition (atol + rtol |y|)."""
        from smoe.train.metrics import ATOL  # imports torch: only the predictions figure needs it

        hits = np.abs(self.error) <= ATOL + CLOSE_RTOL * np.abs(self.target)
        return 100.0 * float(hits.mean())


def default_time(datasets: Sequence[xr.Dataset]) -> int:
    """The middle time step that every file predicts, preferring ones with a known input."""
    common = sorted(set.intersection(*(set(ds["time"].values.tolist()) for ds in datasets)))
    if not common:
        raise InputError("the prediction files share no time step")
    known = set().union(*(ds["time"].values.tolist() for ds in datasets))
    with_input = [t for t in common if t - 1 in known]
    choice = with_input or common
    return int(choice[len(choice) // 2])


def select_samples(
    datasets: Sequence[xr.Dataset], run: int = 0, time: int | None = None
) -> list[Sample]:
    """The same test frame (``run``, time step ``time``) from every predictions file.

    ``time`` is a time step (the files' ``time`` coordinate), not a position, so models with
    different context lengths, whose files start at different steps, still show one sample.
    The input is the true frame at ``time - 1``, taken from whichever file holds it.
    """
    if not datasets:
        raise InputError("no predictions files")
    time = default_time(datasets) if time is None else int(time)
    for ds in datasets:
        if run not in ds["run"].values or time not in ds["time"].values:
            name = ds.attrs.get("model", "?")
            runs, times = ds["run"].values, ds["time"].values
            raise InputError(
                f"{name}: predictions file has no run {run} at time step {time} (it holds runs "
                f"{runs.min()}..{runs.max()}, time steps {times.min()}..{times.max()})"
            )
    previous = next((ds for ds in datasets if time - 1 in ds["time"].values), None)
    frame = None if previous is None else previous["u"].sel(run=run, time=time - 1).values
    at = {"run": run, "time": time}
    samples = []
    for ds in datasets:
        name = ds.attrs.get("model", "?")
        samples.append(
            Sample(
                model=name,
                seed=ds.attrs.get("seed"),
                run=run,
                time=time,
                input=None if frame is None else np.asarray(frame, dtype=np.float64),
                target=ds["u"].sel(at).values.astype(np.float64),
                prediction=ds["prediction"].sel(at).values.astype(np.float64),
            )
        )
    if len({s.target.shape for s in samples}) > 1:
        raise InputError("predictions files have different grids")
    return samples


PREDICTION_VARIABLES = ("prediction", "u")
PREDICTION_COORDS = ("run", "time")


def open_predictions(path: str | Path) -> xr.Dataset:
    """A predictions netCDF of ``smoe evaluate``, or an InputError naming the file."""
    path = Path(path)
    name = repr(str(path))
    if not path.is_file():
        state = "is a folder" if path.is_dir() else "does not exist"
        raise InputError(f"predictions file {name} {state}")
    try:
        ds = xr.open_dataset(path)
    except Exception as exc:  # noqa: BLE001 - the netCDF/HDF5 readers raise many types
        raise InputError(
            f"predictions file {name} is not readable netCDF ({type(exc).__name__}: "
            f"{one_line(exc)})"
        ) from exc
    missing = [v for v in (*PREDICTION_VARIABLES, *PREDICTION_COORDS) if v not in ds.variables]
    if missing or any(
        ds[v].dims != ("run", "time", "y", "x") for v in PREDICTION_VARIABLES if v in ds.variables
    ):
        ds.close()
        lacks = f"lacks {', '.join(map(repr, missing))}" if missing else "has other dimensions"
        raise InputError(
            f"predictions file {name} {lacks}: it is not what smoe evaluate --predictions writes"
        )
    return ds


def _field_limits(samples: Sequence[Sample]) -> tuple[float, float]:
    """Colour limits of the fields: the central 99 % of the true values (inputs, targets).

    Heat sources are single cells far hotter than the rest; full-range limits would paint
    everything else black, so they are allowed to saturate (the colour bar shows arrows).
    """
    frames = [s.target for s in samples] + [s.input for s in samples if s.input is not None]
    low, high = np.percentile(np.concatenate([f.ravel() for f in frames]), [0.5, 99.5])
    return (float(low), float(high)) if high > low else (float(low) - 1.0, float(high) + 1.0)


def error_limit(samples: Sequence[Sample]) -> float:
    """One symmetric error limit for every model: the 99th percentile of all |errors|.

    Shared so that colours compare across rows; a percentile rather than the maximum
    because a few source cells would otherwise wash out every other error.
    """
    pooled = np.concatenate([np.abs(s.error).ravel() for s in samples])
    limit = float(np.percentile(pooled, 99))
    return limit if limit > 0 else max(float(pooled.max()), 1e-12)


def predictions_figure(
    files: list[Path], out: str | Path, run: int = 0, time: int | None = None
) -> tuple[Path, Path]:
    """Input / target / prediction / error of one test frame, one row per model.

    All rows show the same sample (see :func:`select_samples`), fields share one colour
    scale and errors one symmetric diverging scale (:func:`error_limit`), so rows compare
    at a glance. Each error panel's title gives that model's largest error.
    """
    datasets = []
    try:
        for path in files:
            datasets.append(open_predictions(path))
        samples = select_samples(datasets, run, time)
    finally:
        for ds in datasets:
            ds.close()
    low, high = _field_limits(samples)
    limit = error_limit(samples)
    fig = new_figure(9.2, 2.3 * len(samples) + 1.0)
    axes = fig.subplots(len(samples), 4, squeeze=False)
    columns = ("input (t-1)", "target", "prediction", "prediction - target")
    field = error = None
    for row, sample in zip(axes, samples, strict=True):
        for ax, frame in zip(
            row[:3], (sample.input, sample.target, sample.prediction), strict=True
        ):
            if frame is None:
                ax.text(
                    0.5,
                    0.5,
                    "not in the files",
                    ha="center",
                    va="center",
                    fontsize=8,
                    transform=ax.transAxes,
                )
                continue
            field = ax.imshow(frame, cmap="inferno", vmin=low, vmax=high, interpolation="nearest")
        error = row[3].imshow(
            sample.error, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest"
        )
        row[3].set_title(f"max |error| {np.abs(sample.error).max():.2g}", fontsize=8)
        row[0].set_ylabel(
            f"{sample.model} (seed {sample.seed})\nprcntclose1.0 {sample.close:.1f} %", fontsize=9
        )
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, name in zip(axes[0], columns, strict=True):
        current = ax.get_title()
        ax.set_title(f"{name}\n{current}" if current else name, fontsize=9)
    if field is not None:
        fig.colorbar(
            field,
            ax=axes[:, :3],
            location="bottom",
            shrink=0.7,
            aspect=40,
            label="u (clipped to the true 0.5-99.5 % range)",
            extend="both",
        )
    fig.colorbar(
        error,
        ax=axes[:, 3],
        location="bottom",
        shrink=0.95,
        aspect=14,
        label="error (clipped at 99th pct)",
        extend="both",
    )
    fig.suptitle(f"test run {samples[0].run}, time step {samples[0].time}", fontsize=10)
    return save_figure(fig, out)


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
    fig = new_figure(11, 4.2)
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


def metric_stats(
    summary: Iterable[Mapping[str, Any]], metrics: Sequence[str]
) -> dict[str, dict[str, Stat]]:
    """Per model (in order of first appearance) and metric: mean and std over seeds.

    The sample standard deviation (ddof=1) is the usual spread across a few seeds; missing
    or NaN values are left out, and a metric no seed reports gets a NaN mean.
    """
    values: dict[str, dict[str, list[float]]] = {}
    for result in summary:
        per_model = values.setdefault(result["model"], {m: [] for m in metrics})
        for metric in metrics:
            value = result.get("metrics", {}).get(metric)
            if value is not None and math.isfinite(float(value)):
                per_model[metric].append(float(value))
    stats: dict[str, dict[str, Stat]] = {}
    for model, per_model in values.items():
        stats[model] = {}
        for metric, seen in per_model.items():
            data = np.asarray(seen, dtype=np.float64)
            mean = float(data.mean()) if data.size else math.nan
            std = float(data.std(ddof=1)) if data.size > 1 else 0.0
            stats[model][metric] = Stat(mean, std, int(data.size))
    return stats


def _bar_label(value: float, log: bool) -> str:
    return f"{value:.2g}" if log or abs(value) < 0.1 else f"{value:.1f}"


def metric_bars_figure(
    summary: list[dict[str, Any]],
    out: str | Path,
    metrics: Sequence[str] = ("prcntclose1.0", "prcntclose1.0s", "nrmse"),
    sources: Sequence[str | Path] | None = None,
) -> tuple[Path, Path]:
    """One bar chart per metric: mean over seeds per model with std error bars.

    nrmse spans orders of magnitude between a matched SMoE and the baselines, so it (and any
    other error metric whose name ends in 'mse') is drawn on a log axis. A metric that no
    result has is drawn as 'n/a'; when no result has any of ``metrics`` an InputError names
    the inputs (``sources``, the files of ``summary`` in order).
    """
    stats = metric_stats(summary, metrics)
    if not any(stat.n for per_model in stats.values() for stat in per_model.values()):
        names = _sources(summary, sources)
        raise InputError(
            f"metric bars: none of the {_described(names, sources)} has a value of "
            f"{', '.join(metrics)}; nothing to draw"
        )
    models = list(stats)
    colours = model_colours(models)
    fig = new_figure(max(3.6 * len(metrics), 5), 3.9)
    axes = np.atleast_1d(fig.subplots(1, len(metrics), squeeze=False)).ravel()
    x = np.arange(len(models))
    for ax, metric in zip(axes, metrics, strict=True):
        log = metric.endswith("mse")
        means = np.array([stats[m][metric].mean for m in models])
        stds = np.array([stats[m][metric].std for m in models])
        heights = np.where(np.isfinite(means), means, 0.0)
        lower = np.minimum(stds, heights * 0.9) if log else stds  # log axes cannot reach 0
        ax.bar(
            x,
            heights,
            yerr=[lower, stds],
            capsize=3,
            width=0.7,
            color=[colours[m] for m in models],
            error_kw={"lw": 0.9},
        )
        for xi, mean, std in zip(x, means, stds, strict=True):
            text = _bar_label(mean, log) if math.isfinite(mean) else "n/a"
            top = mean + std if math.isfinite(mean) else 0.0
            ax.annotate(
                text,
                (xi, top),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=7,
            )
        if log:
            ax.set_yscale("log")
            tops = (means + stds)[np.isfinite(means) & (means > 0)]
            if tops.size:
                ax.set_ylim(top=float(tops.max()) * 4)  # room for the value labels
        else:
            ax.set_ylim(0, max(np.nanmax(means + stds, initial=0) * 1.12, 1e-12))
        ax.set_xticks(
            x,
            models,
            rotation=30 if len(models) > 4 else 0,
            ha="right" if len(models) > 4 else "center",
            fontsize=8,
        )
        ax.set_title(
            metric + (" (log)" if log else " (%)" if "prcnt" in metric else ""), fontsize=9
        )
        ax.grid(True, axis="y", alpha=0.3)
    seeds = sorted({s.n for per in stats.values() for s in per.values()})
    fig.suptitle(
        f"test metrics, mean ± std over seeds (seeds per model: {', '.join(map(str, seeds)) or 0})",
        fontsize=10,
    )
    return save_figure(fig, out)


# --- 5. kernels ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelPair:
    """An expert's learned kernel and the true stencil of its matched type (None if none)."""

    expert: int
    region: int | None
    kernel: np.ndarray
    stencil: np.ndarray | None

    @property
    def error(self) -> float:
        if self.stencil is None:
            return math.nan
        return float(np.abs(self.kernel - self.stencil).max())


def kernel_pairs(routing: Mapping[str, Any]) -> list[KernelPair]:
    """Each expert (by index) with the stencil of the region type it was matched to."""
    kernels = np.asarray(routing["kernels"], dtype=np.float64)
    stencils = np.asarray(routing["stencils"], dtype=np.float64)
    matching = {int(e): int(t) for e, t in routing["expert_to_type"].items()}
    pairs = []
    for expert, kernel in enumerate(kernels):
        region = matching.get(expert)
        stencil = stencils[region] if region is not None else None
        pairs.append(KernelPair(expert, region, kernel, stencil))
    return pairs


def _cell_text(value: float) -> str:
    """Four decimals, the precision of the stencils; a rounded-away sign is dropped."""
    text = f"{value:.4f}"
    return text[1:] if text.strip("-0.") == "" and text.startswith("-") else text


def _kernel_panel(ax, values: np.ndarray, low: float, high: float, title: str) -> None:
    image = ax.imshow(values, cmap="Blues", vmin=low, vmax=high, interpolation="nearest")
    for (r, c), value in np.ndenumerate(values):
        shade = image.cmap(image.norm(value))
        dark = 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2] < 0.5
        ax.text(
            c,
            r,
            _cell_text(value),
            ha="center",
            va="center",
            fontsize=6.5,
            color="white" if dark else "black",
        )
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _kernel_block(subfig, result: Mapping[str, Any]) -> None:
    routing = result["routing"]
    pairs = kernel_pairs(routing)
    axes = subfig.subplots(2, len(pairs), squeeze=False)
    for column, pair in zip(axes.T, pairs, strict=True):
        both = [pair.kernel] + ([pair.stencil] if pair.stencil is not None else [])
        low, high = min(float(a.min()) for a in both), max(float(a.max()) for a in both)
        low, high = min(low, 0.0), max(high, low + 1e-12)
        where = "unmatched" if pair.region is None else f"type {pair.region}"
        _kernel_panel(
            column[0],
            pair.kernel,
            low,
            high,
            f"expert {pair.expert} → {where}\n"
            + ("no stencil" if pair.stencil is None else f"max |err| {pair.error:.2g}"),
        )
        if pair.stencil is None:
            column[1].set_axis_off()
        else:
            _kernel_panel(column[1], pair.stencil, low, high, f"true stencil, type {pair.region}")
    axes[0, 0].set_ylabel("learned", fontsize=8)
    axes[1, 0].set_ylabel("true", fontsize=8)
    error = routing.get("kernel_max_abs_error")
    shown = "n/a" if error is None else f"{error:.2g}"
    subfig.suptitle(f"{run_title(result)}: last SMoE layer, max abs error {shown}", fontsize=9)


def kernel_runs(
    runs: Sequence[Mapping[str, Any]], sources: Sequence[str | Path] | None = None
) -> list[Mapping[str, Any]]:
    """The results with learned 3x3 kernels (SMoE models); a kernels section without the
    stencils or the matching raises an InputError naming its file or model and seed."""
    runs = list(runs)
    selected = []
    for result, name in zip(runs, _sources(runs, sources), strict=True):
        routing = result.get("routing")
        if isinstance(routing, Mapping) and routing.get("kernels"):
            _check_routing(result, name, KERNEL_KEYS)
            selected.append(result)
    return selected


def kernels_figure(
    runs: list[dict[str, Any]],
    out: str | Path,
    sources: Sequence[str | Path] | None = None,
) -> tuple[Path, Path]:
    """Each SMoE run's learned 3x3 expert kernels above the true stencils they were matched to.

    Pairing uses the run's ``expert_to_type``, so a permuted matching still puts each
    kernel beside the right stencil; runs without 3x3 kernels (or non-SMoE runs) are skipped,
    and when none has them an InputError names the inputs (``sources``, as for
    :func:`routing_figure`).
    """
    names = _sources(runs, sources)
    runs = kernel_runs(runs, sources)
    if not runs:
        raise InputError(
            f"kernels figure: none of the {_described(names, sources)} has learned 3x3 "
            "kernels (only SMoE models whose last layer has 3x3 experts do); nothing to draw"
        )
    experts = max(len(r["routing"]["kernels"]) for r in runs)
    fig = new_figure(max(2.0 * experts, 4.5), 4.4 * len(runs))
    subfigs = np.atleast_1d(fig.subfigures(len(runs), 1))
    for subfig, result in zip(subfigs, runs, strict=True):
        _kernel_block(subfig, result)
    return save_figure(fig, out)
