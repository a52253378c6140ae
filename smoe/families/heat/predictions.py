"""Test predictions as netCDF, beside the true field and the region map, for climate tools.

One file per model and seed: ``prediction(run, time, y, x)`` for every predicted frame, the
true frame ``u`` at the same times, the region map and the diffusivities, with CF attributes
and the model's identity in the global attributes. Written from the evaluation pass itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from smoe import __version__
from smoe.core.atomic import atomic_file
from smoe.families.heat.dataset import HeatPairs
from smoe.families.heat.store import field_reads, open_store


def predictions_dataset(
    predictions: torch.Tensor, dataset: HeatPairs, result: dict[str, Any]
) -> xr.Dataset:
    """Predictions [N, 1, H, W] in dataset order as (run, time, y, x) beside the truth."""
    runs, per_run = dataset.runs, dataset.pairs_per_run
    first = dataset.context + 1  # the first frame that gets predicted
    times = np.arange(first, first + per_run)
    store = open_store(dataset.store_path)
    frames = predictions.reshape(runs, per_run, dataset.height, dataset.width).numpy()
    with field_reads(dataset.store_path):
        truth = store["u"].isel(time=slice(first, first + per_run)).values
    unit = {"units": "1"}
    coords = {
        "run": ("run", np.arange(runs), {"long_name": "run index within the split"}),
        "time": ("time", times, {"long_name": "time step of the predicted frame", **unit}),
        "y": ("y", np.arange(dataset.height), {"long_name": "grid row", **unit}),
        "x": ("x", np.arange(dataset.width), {"long_name": "grid column", **unit}),
        "region": ("region", np.arange(len(dataset.diffusivity)), {"long_name": "region type"}),
    }
    data_vars = {
        "prediction": (
            ("run", "time", "y", "x"),
            frames.astype(np.float32),
            {"long_name": f"{result['model']} prediction of the next frame", **unit},
        ),
        "u": (
            ("run", "time", "y", "x"),
            truth.astype(np.float32),
            {"long_name": "true temperature (dimensionless heat field)", **unit},
        ),
        "mask": (("y", "x"), store["mask"].values, dict(store["mask"].attrs)),
        "diffusivity": (
            ("region",),
            np.asarray(dataset.diffusivity),
            {"long_name": "diffusion number per region type", **unit},
        ),
    }
    metrics = result["metrics"]
    attrs = {
        "title": f"test predictions of {result['model']} (seed {result['seed']})",
        "Conventions": "CF-1.10",
        "source": f"smoe {__version__} (smoe evaluate)",
        "model": result["model"],
        "kind": result["kind"],
        "seed": result["seed"],
        "best_epoch": result["best_epoch"],
        "params": result["params"],
        "store": str(dataset.store_path),
        "mse": metrics["mse"],
        "prcntclose1.0": metrics.get("prcntclose1.0", float("nan")),
    }
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def write_predictions(
    predictions: torch.Tensor, dataset: HeatPairs, result: dict[str, Any], out: str | Path
) -> Path:
    ds = predictions_dataset(predictions, dataset, result)
    encoding = {
        name: {"zlib": True, "complevel": 1, "shuffle": True} for name in ("prediction", "u")
    }
    out = Path(out)
    with atomic_file(out) as partial:
        ds.to_netcdf(partial, engine="netcdf4", format="NETCDF4", encoding=encoding)
    return out
