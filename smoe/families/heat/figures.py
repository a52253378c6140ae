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
import xarray as xr
from matplotlib.collections import PatchCollection
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from smoe.core.errors import InputError, one_line
from smoe.core.report.figures import (
    MAX_HEIGHT,
    MAX_WIDTH,
    grid_layout,
    model_colours,
    new_figure,
    save_figure,
    viewer_figure,
    viewer_size,
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
        from smoe.families.heat.metrics import (
            ATOL,  # imports torch: only the predictions figure needs it
        )

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


SAMPLE_LABEL_WIDTH = 0.9  # inches: "95.9 % within 1 %" at the label size
SAMPLE_LABEL_SIZE = 6.5


@dataclass(frozen=True)
class PredictionLayout:
    """Models in ``bands`` bands of ``per_band`` columns, each band a prediction row above an
    error row, beside one column for the input and the truth; panels ``side`` wide."""

    bands: int
    per_band: int
    side: float
    size: tuple[float, float]


PREDICTION_EXTRA = (0.1, 0.85)  # per model column (gap); per band (title and labels)
PREDICTION_FIXED = (1.5, 0.55)  # colour bars and row labels; suptitle


def prediction_layout(models: int, aspect: float = 1.0, largest: float = 2.0) -> PredictionLayout:
    """The wrapping of ``models`` columns that draws the largest panels in the viewer limits.

    One band (a row of predictions over a row of errors) is widest; more bands give more
    height to each panel once the columns would be narrower than the per-sample label.
    """
    width, height = MAX_WIDTH - PREDICTION_FIXED[0], MAX_HEIGHT - PREDICTION_FIXED[1]
    best: PredictionLayout | None = None
    fallback: PredictionLayout | None = None
    for bands in range(1, models + 1):
        per_band = math.ceil(models / bands)
        column = width / (per_band + 1) - PREDICTION_EXTRA[0]
        side = min(largest, column, (height / bands - PREDICTION_EXTRA[1]) / (2 * aspect))
        size = (
            (per_band + 1) * (max(side, SAMPLE_LABEL_WIDTH) + PREDICTION_EXTRA[0])
            + PREDICTION_FIXED[0],
            bands * (2 * side * aspect + PREDICTION_EXTRA[1]) + PREDICTION_FIXED[1],
        )
        layout = PredictionLayout(bands, per_band, side, viewer_size(*size))
        if fallback is None or side > fallback.side + 1e-9:
            fallback = layout
        if column >= SAMPLE_LABEL_WIDTH and (best is None or side > best.side + 1e-9):
            best = layout
    assert fallback is not None, "no models"
    return best or fallback


def sample_label(sample: Sample) -> str:
    """The prediction panel's note: prcntclose1.0 of this one frame, said to be of it."""
    return f"this sample:\n{_percent_text(sample.close)} % within 1 %"


def predictions_figure(
    files: list[Path], out: str | Path, run: int = 0, time: int | None = None
) -> tuple[Path, Path]:
    """One test frame for every model: models as columns, the prediction above its error.

    The input (the true frame one step earlier) and the truth are drawn once, in the first
    column. All models show the same sample (see :func:`select_samples`), fields share one
    colour scale and errors one symmetric diverging scale (:func:`error_limit`), so panels
    compare at a glance. Under each prediction: the share of this sample's cells within
    1 % (prcntclose1.0 of this one frame, not the test-set figure); under each error: that
    model's largest error. Many models wrap into several bands (:func:`prediction_layout`)
    so the figure stays inside the report viewer.
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
    aspect = samples[0].target.shape[0] / samples[0].target.shape[1]
    layout = prediction_layout(len(samples), aspect)
    fig = new_figure(*layout.size, layout="compressed")
    axes = fig.subplots(2 * layout.bands, layout.per_band + 1, squeeze=False)
    seeds = {str(sample.seed) for sample in samples}
    field_style = {"cmap": "inferno", "vmin": low, "vmax": high, "interpolation": "nearest"}
    error_style = {"cmap": "RdBu_r", "vmin": -limit, "vmax": limit, "interpolation": "nearest"}
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    first = samples[0]
    for ax, frame, title in (
        (axes[0, 0], first.input, f"input: step {first.time - 1}"),
        (axes[1, 0], first.target, f"truth: step {first.time}"),
    ):
        if frame is None:
            _blank(ax, "not in the files")
        else:
            ax.imshow(frame, **field_style)
        ax.set_title(title, fontsize=8)
    for band in range(1, layout.bands):
        axes[2 * band, 0].set_axis_off()
        axes[2 * band + 1, 0].set_axis_off()
    for index, sample in enumerate(samples):
        band, column = divmod(index, layout.per_band)
        top, bottom = axes[2 * band, column + 1], axes[2 * band + 1, column + 1]
        top.imshow(sample.prediction, **field_style)
        bottom.imshow(sample.error, **error_style)
        name = sample.model if len(seeds) == 1 else f"{sample.model} seed {sample.seed}"
        top.set_title(name, fontsize=8)
        top.set_xlabel(sample_label(sample), fontsize=SAMPLE_LABEL_SIZE)
        bottom.set_xlabel(f"max |error| {np.abs(sample.error).max():.2g}", fontsize=6.5)
    for index in range(len(samples), layout.bands * layout.per_band):
        band, column = divmod(index, layout.per_band)
        axes[2 * band, column + 1].set_axis_off()
        axes[2 * band + 1, column + 1].set_axis_off()
    for band in range(layout.bands):
        axes[2 * band, 1].set_ylabel("prediction", fontsize=8)
        axes[2 * band + 1, 1].set_ylabel("prediction - truth", fontsize=8)
        field = fig.colorbar(
            axes[2 * band, 1].images[0],
            ax=axes[2 * band, :],
            location="right",
            shrink=0.9,
            aspect=12,
            extend="both",
        )
        field.set_label("u (clipped)", fontsize=7)
        error = fig.colorbar(
            axes[2 * band + 1, 1].images[0],
            ax=axes[2 * band + 1, :],
            location="right",
            shrink=0.9,
            aspect=12,
            extend="both",
        )
        error.set_label("error (clipped)", fontsize=7)
        for bar in (field, error):
            bar.ax.tick_params(labelsize=6.5)
    seed = f", models of seed {next(iter(seeds))}" if len(seeds) == 1 else ""
    fig.suptitle(
        f"one test sample: run {first.run}, time step {first.time}{seed}\n"
        "colours clipped to the truth's 0.5-99.5 % range and to the errors' 99th percentile",
        fontsize=8.5,
    )
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


def _kernel_panel(ax, values: np.ndarray, low: float, high: float, fontsize: float) -> None:
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
            fontsize=fontsize,
            color="white" if dark else "black",
        )
    ax.set_xticks([])
    ax.set_yticks([])


@dataclass(frozen=True)
class KernelCell:
    """One panel of the kernels table: a 3x3 array (None: empty) and its title."""

    values: np.ndarray | None
    title: str = ""


@dataclass(frozen=True)
class KernelTable:
    """The kernels figure before drawing: a header row of true stencils, then one row per
    run with each expert under the type it was matched to (unmatched experts last)."""

    row_labels: list[str]
    column_labels: list[str]
    cells: list[list[KernelCell]]


def kernel_table(runs: Sequence[Mapping[str, Any]]) -> KernelTable:
    """Every run's experts aligned by matched region type under the true stencils.

    The true stencils are the same for every run of one workflow, so they are drawn once;
    runs whose stencils differ (other data) raise an InputError.
    """
    stencils = np.asarray(runs[0]["routing"]["stencils"], dtype=np.float64)
    for result in runs[1:]:
        other = np.asarray(result["routing"]["stencils"], dtype=np.float64)
        if other.shape != stencils.shape or not np.allclose(other, stencils):
            raise InputError(
                f"kernels figure: {run_title(result)} and {run_title(runs[0])} have different "
                "true stencils (other diffusivities): draw them in separate figures"
            )
    types = len(stencils)
    per_run = [kernel_pairs(result["routing"]) for result in runs]
    unmatched = max(sum(p.region is None for p in pairs) for pairs in per_run)
    cells = [[KernelCell(stencil) for stencil in stencils] + [KernelCell(None)] * unmatched]
    row_labels = ["true stencil"]
    for result, pairs in zip(runs, per_run, strict=True):
        by_type = {p.region: p for p in pairs if p.region is not None}
        row = [
            KernelCell(
                by_type[t].kernel, f"expert {by_type[t].expert}: |err| {by_type[t].error:.2g}"
            )
            if t in by_type
            else KernelCell(None, "no expert")
            for t in range(types)
        ]
        spare = [p for p in pairs if p.region is None]
        row += [KernelCell(p.kernel, f"expert {p.expert}") for p in spare]
        row += [KernelCell(None)] * (unmatched - len(spare))
        cells.append(row)
        error = result["routing"].get("kernel_max_abs_error")
        shown = "n/a" if error is None else f"{error:.2g}"
        row_labels.append(f"{run_title(result)}\nmax |err| {shown}")
    column_labels = [f"type {t}" for t in range(types)] + ["unmatched"] * unmatched
    return KernelTable(row_labels, column_labels, cells)


KERNEL_EXTRA = (0.1, 0.25)  # per panel: gap; its title
KERNEL_FIXED = (0.55, 0.75)  # row labels; column headers and suptitle


def _kernel_limits(column: Sequence[KernelCell]) -> tuple[float, float]:
    """One colour scale per column of the table: a type's stencil and its kernels compare."""
    arrays = [cell.values for cell in column if cell.values is not None]
    if not arrays:
        return 0.0, 1.0
    low = min(0.0, *(float(a.min()) for a in arrays))
    high = max(float(a.max()) for a in arrays)
    return low, max(high, low + 1e-12)


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
    table = kernel_table(runs)
    limits = [_kernel_limits(column) for column in zip(*table.cells, strict=True)]
    rows, cols = len(table.cells), len(table.cells[0])
    transpose = rows > cols  # many runs: runs as columns, so the figure grows wide
    shown_rows, shown_cols = (cols, rows) if transpose else (rows, cols)
    side = min(
        1.5,
        (MAX_WIDTH - KERNEL_FIXED[0]) / shown_cols - KERNEL_EXTRA[0],
        (MAX_HEIGHT - KERNEL_FIXED[1]) / shown_rows - KERNEL_EXTRA[1],
    )
    fontsize = min(6.5, 6.5 * side / 1.25)  # "-0.0012" three times across a panel
    fig = new_figure(
        *viewer_size(
            shown_cols * (side + KERNEL_EXTRA[0]) + KERNEL_FIXED[0],
            shown_rows * (side + KERNEL_EXTRA[1]) + KERNEL_FIXED[1],
        ),
        layout="compressed",
    )
    axes = fig.subplots(shown_rows, shown_cols, squeeze=False)
    side_labels, top_labels = (
        (table.column_labels, table.row_labels)
        if transpose
        else (table.row_labels, table.column_labels)
    )
    for r, row in enumerate(table.cells):
        for c, cell in enumerate(row):
            ax = axes[c, r] if transpose else axes[r, c]
            if cell.values is None:
                _blank(ax, cell.title)
                title = ""
            else:
                _kernel_panel(ax, cell.values, *limits[c], fontsize)
                title = cell.title
            top = (c if transpose else r) == 0
            header = top_labels[r if transpose else c]
            ax.set_title(
                f"{header}\n{title}" if top and title else header if top else title, fontsize=7
            )
    for ax, label in zip(axes[:, 0], side_labels, strict=True):
        ax.set_ylabel(label, fontsize=7.5)
    fig.suptitle(
        "learned 3x3 kernels of the last SMoE layer under the true stencil of the region type "
        "each expert was matched to\n|err|: largest absolute difference to that stencil; "
        "colours shared per type",
        fontsize=8.5,
    )
    return save_figure(fig, out)
