"""Aggregation: every evaluation result into tables (CSV, Markdown, HTML), mean +- std over seeds.

Reads the metrics JSON of each model and seed (``smoe evaluate``) and writes, into one folder:

* ``metrics_long.csv``: one row per model, seed and metric (the raw material);
* ``summary.csv``: one row per model: seeds, and mean and std of every metric, overall and per
  region type, with the parameter count, training time and (SMoE) routing figures;
* ``summary.md`` and ``summary.html``: the headline table and a per-region table, for
  humans (Markdown) and for `snakemake --report` (a standalone HTML page).

Every row says where it comes from (``source``): ``ours`` for trained models, ``reference``
for the analytic predictors (persistence, a single stencil, the true generator), which are
evaluated here like any model, and ``published`` for figures taken from a paper. Published
rows come from ``references.yaml``, each with the citation a reader can follow, and are
shown only when the evaluated test split is the one they were measured on.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from smoe.core.atomic import write_text_atomic
from smoe.core.errors import InputError
from smoe.core.report.results import read_json_result, require_keys
from smoe.core.report.tables import Column, Table, html_page, markdown_table, mean_spread
from smoe.families.heat.names import ANALYTIC_KINDS

REFERENCES = Path(__file__).with_name("references.yaml")
HEADLINE = [
    ("prcntclose1.0", Column("prcntclose1.0", "%", "percent")),
    ("prcntclose1.0s", Column("prcntclose1.0s", "%", "percent")),
    ("mse", Column("MSE", "", "sci")),
    ("nrmse", Column("nRMSE", "", "sci")),
    ("vrmse", Column("VRMSE", "", "sci")),
    ("routing_agreement", Column("routing agreement", "%", "percent")),
    ("kernel_max_abs_error", Column("max kernel error", "", "sci")),
    ("best_epoch", Column("best epoch", "", "count")),
    ("train_time_s", Column("train time", "s", "seconds")),
]
PER_REGION = [
    ("prcntclose1.0", Column("prcntclose1.0", "%", "percent")),
    ("prcntclose1.0s", Column("prcntclose1.0s", "%", "percent")),
    ("mse", Column("MSE", "", "sci")),
]
METRIC_NOTES = [
    "prcntclose1.0: share of test points predicted within 1 % of the true value "
    "(|prediction - truth| <= 1e-8 + 0.01 |truth|); prcntclose1.0s scales that tolerance per "
    "region type (0.01, 0.1 and 1 times for the paper's three types), so that predicting "
    "'no change' does not pass where diffusion is slow.",
    "MSE, nRMSE (per-sample error norm over truth norm) and VRMSE (RMSE over the standard "
    "deviation of the truth) have no unit: the heat field is dimensionless.",
    "Routing agreement: share of test points the final SMoE layer sends to the expert matched "
    "to their true region type; max kernel error: largest absolute difference between a "
    "matched expert's 3x3 kernel and its type's true stencil.",
    "Test figures come from each run's best validation epoch; with several seeds a cell reads "
    "mean ± standard deviation (ddof 1), with one seed the value alone.",
    "In summary.csv and the metrics JSON files the per-type columns are prefixed mask<t>-.",
]


RESULT_KEYS = ("model", "kind", "seed", "metrics", "params", "train_time_s", "best_epoch", "store")
"""What every ``smoe evaluate`` result holds, and what the tables read."""


def read_result(path: str | Path, required: Iterable[str] = RESULT_KEYS) -> dict[str, Any]:
    """One metrics JSON file; a missing, unreadable or malformed one (not a JSON object, a
    required key missing, metrics that are not numbers) raises an InputError naming it."""
    name = repr(str(path))
    result = read_json_result(path, not_json_hint=": not an evaluation result of smoe evaluate")
    require_keys(result, required, name, "an evaluation result")
    metrics = result.get("metrics")
    if "metrics" in required and (
        not isinstance(metrics, dict)
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values())
    ):
        raise InputError(
            f"metrics file {name}: 'metrics' is not a mapping of metric names to numbers"
        )
    routing = result.get("routing")
    if routing is not None and (not isinstance(routing, dict) or "agreement" not in routing):
        raise InputError(
            f"metrics file {name}: 'routing' is neither null nor a routing section with 'agreement'"
        )
    return result


def load_results(
    paths: Iterable[str | Path], required: Iterable[str] = RESULT_KEYS
) -> list[dict[str, Any]]:
    """The metrics JSON files, with a clear error for a missing or malformed one."""
    required = tuple(required)
    results = [read_result(path, required) for path in paths]
    if not results:
        raise InputError("no metrics files to aggregate")
    return results


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Every number of one result: its metrics plus size, time and routing figures."""
    values = dict(result["metrics"])
    values["params"] = result["params"]
    values["train_time_s"] = result["train_time_s"]
    values["best_epoch"] = result["best_epoch"]
    routing = result.get("routing")
    if routing:
        values["routing_agreement"] = routing["agreement"]
        if routing.get("kernel_max_abs_error") is not None:
            values["kernel_max_abs_error"] = routing["kernel_max_abs_error"]
    return {key: float(value) for key, value in values.items()}


def long_table(results: list[dict[str, Any]]) -> pd.DataFrame:
    rows = [
        {"model": r["model"], "kind": r["kind"], "seed": r["seed"], "metric": k, "value": v}
        for r in results
        for k, v in flat_metrics(r).items()
    ]
    return pd.DataFrame(rows, columns=["model", "kind", "seed", "metric", "value"])


def summary_table(results: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per model (in the order first seen): seeds, mean and std of every number."""
    long = long_table(results)
    order = list(dict.fromkeys(r["model"] for r in results))
    grouped = long.groupby(["model", "metric"], sort=False)["value"]
    stats = grouped.agg(["mean", "std"]).unstack("metric")
    stats.columns = [f"{metric}_{stat}" for stat, metric in stats.columns]
    stats = stats.reindex(order)
    seeds = long.groupby("model", sort=False)["seed"].nunique().reindex(order)
    kinds = long.groupby("model", sort=False)["kind"].first().reindex(order)
    table = pd.concat([kinds.rename("kind"), seeds.rename("seeds"), stats], axis=1)
    table.insert(0, "source", ["reference" if k in ANALYTIC_KINDS else "ours" for k in kinds])
    return table.rename_axis("model").reset_index()


def load_references(path: Path = REFERENCES) -> dict[str, Any]:
    """The published-figures file, each row checked for a citation and at least one number."""
    spec = yaml.safe_load(Path(path).read_text()) or {}
    for index, row in enumerate(spec.get("rows") or []):
        where = f"{path}: rows[{index}]"
        if not str(row.get("citation", "")).strip():
            raise InputError(f"{where} ({row.get('label')!r}) has no citation")
        if not row.get("metrics"):
            raise InputError(f"{where} ({row.get('label')!r}) has no published metrics")
    return spec


def applicable_references(store: str | Path, path: Path = REFERENCES) -> list[dict[str, Any]]:
    """Published rows that apply to this test store (same split, map and physics), else []."""
    from smoe.families.heat.mask import generate_mask
    from smoe.families.heat.store import open_store

    spec = load_references(path)
    if not spec.get("rows"):
        return []
    want = spec["applies_to"]
    try:
        ds = open_store(store)
    except InputError:
        return []
    attrs = ds.attrs
    same = (
        attrs.get("seed") == want["test_seed"]
        and attrs.get("runs") == want["test_runs"]
        and attrs.get("steps") == want["steps"]
        and list(attrs.get("diffusivity", [])) == want["diffusivity"]
    )
    if not same:
        return []
    m = want["mask"]
    paper_mask = generate_mask(m["height"], m["width"], m["types"], m["seed"])
    if ds["mask"].shape != paper_mask.shape or not np.array_equal(ds["mask"].values, paper_mask):
        return []
    return spec["rows"]


def reference_rows(references: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for ref in references:
        row: dict[str, Any] = {
            "model": ref["label"],
            "source": "published",
            "citation": ref["citation"],
            "kind": "",
            "seeds": np.nan,
        }
        for metric, value in ref.get("metrics", {}).items():
            row[f"{metric}_mean"] = value
        if "params" in ref:
            row["params_mean"] = ref["params"]
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(row: pd.Series, metric: str, style: str, spread: bool = True) -> str:
    mean = row.get(f"{metric}_mean", np.nan)
    std = row.get(f"{metric}_std", np.nan) if spread else np.nan
    if mean is None or pd.isna(mean):
        return ""
    return mean_spread(float(mean), None if pd.isna(std) else float(std), style)


def _seeds(row: pd.Series) -> str:
    return "" if pd.isna(row.get("seeds")) else str(int(row["seeds"]))


def headline_table(summary: pd.DataFrame) -> Table:
    """Every model's test figures over all points (published rows included, cited)."""
    present = [
        (metric, column)
        for metric, column in HEADLINE
        if f"{metric}_mean" in summary and summary[f"{metric}_mean"].notna().any()
    ]
    columns = [Column("seeds", "", "count"), Column("parameters", "", "count")]
    table = Table(
        "Test metrics, all points",
        columns + [column for _, column in present],
        notes=METRIC_NOTES[:3] + METRIC_NOTES[3:4],
    )
    for _, row in summary.iterrows():
        cells = [_seeds(row), _cell(row, "params", "count", spread=False)]
        cells += [_cell(row, metric, column.style) for metric, column in present]
        table.add(str(row["model"]), row["source"], cells, str(row.get("citation") or ""))
    return table


def region_table(summary: pd.DataFrame, regions: list[str]) -> Table:
    """Every evaluated model's test figures per region type (published rows have none)."""
    columns = [
        Column(column.header, column.unit, column.style, group=regions[t])
        for t in range(len(regions))
        for _, column in PER_REGION
    ]
    table = Table("Test metrics per region type", columns, notes=METRIC_NOTES[3:])
    for _, row in summary[summary["source"] != "published"].iterrows():
        cells = [
            _cell(row, f"mask{t}-{metric}", column.style)
            for t in range(len(regions))
            for metric, column in PER_REGION
        ]
        table.add(str(row["model"]), row["source"], cells)
    return table


def region_names(store: str | Path | None, types: int) -> list[str]:
    """'type t (a = ..., n cells)' for each region type, from the test store when it opens;
    plain 'type t' otherwise."""
    names = [f"type {t}" for t in range(types)]
    if store is None:
        return names
    from smoe.families.heat.store import open_store

    try:
        ds = open_store(store)
    except InputError:
        return names
    diffusivity = [float(a) for a in ds.attrs.get("diffusivity", [])]
    mask = ds["mask"].values if "mask" in ds else None
    if len(diffusivity) != types or mask is None:
        return names
    counts = np.bincount(mask.ravel().astype(np.int64), minlength=types)
    return [f"type {t} (a = {diffusivity[t]:g}, {counts[t]:,} cells)" for t in range(types)]


def markdown(tables: Iterable[Table]) -> str:
    """The tables as one Markdown document."""
    return "\n".join(markdown_table(table) for table in tables)


def html(tables: Iterable[Table], summary_csv: bytes) -> str:
    """The tables as one standalone HTML page, with the CSV embedded as a download."""
    return html_page(
        "Heat diffusion: test metrics",
        list(tables),
        lead="Every configured model evaluated on the test split from its best validation "
        "checkpoint. Learned models are ours; reference rows are analytic predictors; "
        "published rows are figures printed in papers.",
        downloads={"summary.csv": summary_csv},
    )


OUTPUTS = {
    "long": "metrics_long.csv",
    "summary": "summary.csv",
    "markdown": "summary.md",
    "html": "summary.html",
}


def aggregate(
    paths: Iterable[str | Path], out_dir: str | Path, references_path: Path = REFERENCES
) -> dict[str, Path]:
    """Write metrics_long.csv, summary.csv, summary.md and summary.html into ``out_dir``."""
    results = load_results(paths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stores = {r["store"] for r in results}
    store = next(iter(stores)) if len(stores) == 1 else None
    references = applicable_references(store, references_path) if store else []
    ours = summary_table(results)
    summary = (
        pd.concat([ours, reference_rows(references)], ignore_index=True) if references else ours
    )
    types = 1 + max(
        (
            int(key.split("-")[0][4:])
            for r in results
            for key in r["metrics"]
            if key.startswith("mask")
        ),
        default=-1,
    )
    tables = [headline_table(summary)]
    if types:
        tables.append(region_table(summary, region_names(store, types)))
    outputs = {key: out_dir / name for key, name in OUTPUTS.items()}
    summary_csv = summary.to_csv(index=False)
    write_text_atomic(outputs["long"], long_table(results).to_csv(index=False))
    write_text_atomic(outputs["summary"], summary_csv)
    write_text_atomic(outputs["markdown"], markdown(tables))
    write_text_atomic(outputs["html"], html(tables, summary_csv.encode()))
    return outputs
