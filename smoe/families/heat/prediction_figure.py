"""The heat family's predictions figure: one test sample (input, truth, every model's
prediction and error), the sample and colour limits chosen by functions tests can check."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from smoe.core.errors import InputError, one_line
from smoe.core.report.figures import MAX_HEIGHT, MAX_WIDTH, new_figure, save_figure, viewer_size
from smoe.families.heat.figures import (
    CLOSE_RTOL,
    _blank,
    _percent_text,
)


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
