"""Aggregation: every evaluation result into tables (CSV and Markdown), mean +- std over seeds.

Reads the metrics JSON of each model and seed (``smoe evaluate``) and writes, into one folder:

* ``metrics_long.csv``: one row per model, seed and metric (the raw material);
* ``summary.csv``: one row per model: seeds, and mean and std of every metric, overall and per
  region type, with the parameter count, training time and (SMoE) routing figures;
* ``summary.md``: the headline table and a per-region table, for humans and the report.

Every row says where it comes from (``source``): ``ours`` for trained models, ``reference``
for the analytic predictors (persistence, a single stencil, the true generator), which are
evaluated here like any model, and ``published`` for figures taken from a paper. Published
rows come from ``references.yaml``, each with the citation a reader can follow, and are
shown only when the evaluated test split is the one they were measured on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from smoe.atomic import write_text_atomic
from smoe.errors import InputError
from smoe.models.names import ANALYTIC_KINDS

REFERENCES = Path(__file__).with_name("references.yaml")
HEADLINE = [
    ("prcntclose1.0", "prcntclose1.0 (%)", "{:.2f}"),
    ("prcntclose1.0s", "prcntclose1.0s (%)", "{:.2f}"),
    ("mse", "mse", "{:.2e}"),
    ("nrmse", "nRMSE", "{:.2e}"),
    ("vrmse", "VRMSE", "{:.2e}"),
    ("routing_agreement", "routing agreement (%)", "{:.2f}"),
    ("kernel_max_abs_error", "max kernel error", "{:.1e}"),
    ("train_time_s", "train time (s)", "{:.0f}"),
]
PER_REGION = [("prcntclose1.0", "{:.2f}"), ("prcntclose1.0s", "{:.2f}"), ("mse", "{:.2e}")]


RESULT_KEYS = ("model", "kind", "seed", "metrics", "params", "train_time_s", "best_epoch", "store")
"""What every ``smoe evaluate`` result holds, and what the tables read."""


def read_result(path: str | Path, required: Iterable[str] = RESULT_KEYS) -> dict[str, Any]:
    """One metrics JSON file; a missing, unreadable or malformed one (not a JSON object, a
    required key missing, metrics that are not numbers) raises an InputError naming it."""
    path = Path(path)
    name = repr(str(path))
    if not path.is_file():
        state = "is a folder" if path.is_dir() else "does not exist"
        raise InputError(f"metrics file {name} {state}")
    try:
        result = json.loads(path.read_bytes())
    except OSError as exc:
        raise InputError(f"metrics file {name} cannot be read ({exc.strerror or exc})") from exc
    except ValueError as exc:  # JSON syntax, or bytes that are not text
        raise InputError(
            f"metrics file {name} is not JSON ({' '.join(str(exc).split())}): not an "
            "evaluation result of smoe evaluate"
        ) from exc
    if not isinstance(result, dict):
        raise InputError(f"metrics file {name} is not an evaluation result (not a JSON object)")
    missing = [key for key in required if key not in result]
    if missing:
        raise InputError(
            f"metrics file {name} is not an evaluation result: it lacks "
            f"{', '.join(map(repr, missing))}"
        )
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
    from smoe.data.mask import generate_mask
    from smoe.data.store import open_store

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


def _cell(row: pd.Series, metric: str, fmt: str, spread: bool = True) -> str:
    mean = row.get(f"{metric}_mean", np.nan)
    std = row.get(f"{metric}_std", np.nan) if spread else np.nan
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return ""
    text = fmt.format(mean)
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += " ± " + fmt.format(std)
    return text


def _label(row: pd.Series) -> str:
    """The model's name, marked when the row is not one of our trained models."""
    source = row.get("source", "ours")
    return str(row["model"]) + ("" if source == "ours" else f" *({source})*")


def markdown(summary: pd.DataFrame, references: list[dict[str, Any]], types: int) -> str:
    """The headline table (with published rows) and the per-region table."""
    head = ["model", "seeds", "params"] + [title for _, title, _ in HEADLINE]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, row in summary.iterrows():
        seeds = "" if pd.isna(row.get("seeds")) else str(int(row["seeds"]))
        params = _cell(row, "params", "{:,.0f}", spread=False)
        cells = [_label(row), seeds, params]
        cells += [_cell(row, metric, fmt) for metric, _, fmt in HEADLINE]
        lines.append("| " + " | ".join(cells) + " |")
    text = ["## Test metrics (mean ± std over seeds)", "", *lines, ""]
    if (summary["source"] == "reference").any():
        text += [
            "Rows marked *(reference)* are analytic predictors evaluated here on the same "
            "test split (nothing learned): persistence, a single stencil, the true generator.",
            "",
        ]
    if references:
        text += ["Rows marked *(published)* are figures from papers, not our runs:", ""]
        text += [f"- {ref['label']}: {ref['citation']}" for ref in references]
        text.append("")
    region_head = ["model"] + [
        f"type {t} {metric}" for t in range(types) for metric, _ in PER_REGION
    ]
    region_lines = ["| " + " | ".join(region_head) + " |", "|" + "---|" * len(region_head)]
    for _, row in summary[summary["source"] != "published"].iterrows():
        cells = [_label(row)] + [
            _cell(row, f"mask{t}-{metric}", fmt) for t in range(types) for metric, fmt in PER_REGION
        ]
        region_lines.append("| " + " | ".join(cells) + " |")
    text += ["## Per region type", "", *region_lines, ""]
    return "\n".join(text)


def aggregate(
    paths: Iterable[str | Path], out_dir: str | Path, references_path: Path = REFERENCES
) -> dict[str, Path]:
    """Write metrics_long.csv, summary.csv and summary.md into ``out_dir``."""
    results = load_results(paths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stores = {r["store"] for r in results}
    references = (
        applicable_references(next(iter(stores)), references_path) if len(stores) == 1 else []
    )
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
    outputs = {
        "long": out_dir / "metrics_long.csv",
        "summary": out_dir / "summary.csv",
        "markdown": out_dir / "summary.md",
    }
    write_text_atomic(outputs["long"], long_table(results).to_csv(index=False))
    write_text_atomic(outputs["summary"], summary.to_csv(index=False))
    write_text_atomic(outputs["markdown"], markdown(summary, references, types))
    return outputs
