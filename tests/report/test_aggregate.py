"""Aggregation of evaluation results into CSV and Markdown tables."""

import json
import re

import numpy as np
import pandas as pd
import pytest
import yaml

from smoe.core.errors import InputError
from smoe.families.heat.aggregate import (
    REFERENCES,
    aggregate,
    applicable_references,
    load_references,
    summary_table,
)
from smoe.families.heat.mask import generate_mask
from smoe.families.heat.simulation import HeatParams
from smoe.families.heat.store import simulate_split


def result(model, seed, close, mse, store="test.zarr", routing=None, params=10, time=2.0):
    metrics = {
        "prcntclose1.0": close,
        "prcntclose1.0s": close / 2,
        "mse": mse,
        "nrmse": mse * 10,
        "vrmse": mse * 100,
    }
    for t in range(3):
        metrics.update(
            {
                f"mask{t}-prcntclose1.0": close - t,
                f"mask{t}-prcntclose1.0s": t,
                f"mask{t}-mse": mse * (t + 1),
            }
        )
    return {
        "model": model,
        "kind": "smoe" if routing else "cnn",
        "seed": seed,
        "store": store,
        "best_epoch": 3,
        "params": params,
        "train_time_s": time,
        "metrics": metrics,
        "routing": routing,
    }


def write(tmp_path, results):
    paths = []
    for r in results:
        path = tmp_path / f"{r['model']}_{r['seed']}.json"
        path.write_text(json.dumps(r))
        paths.append(path)
    return paths


def test_mean_and_std_over_seeds_per_model(tmp_path):
    routing = {"agreement": 99.0, "kernel_max_abs_error": 1e-4}
    results = [
        result("cnn", 0, 80.0, 1e-4),
        result("cnn", 1, 90.0, 3e-4),
        result("smoe", 0, 99.0, 1e-6, routing=routing, params=12315, time=5.0),
    ]
    table = summary_table(results)
    assert list(table["model"]) == ["cnn", "smoe"]
    cnn = table.set_index("model").loc["cnn"]
    assert cnn["seeds"] == 2
    assert cnn["prcntclose1.0_mean"] == pytest.approx(85.0)
    assert cnn["prcntclose1.0_std"] == pytest.approx(np.std([80.0, 90.0], ddof=1))
    assert cnn["mask2-mse_mean"] == pytest.approx(np.mean([3e-4, 9e-4]))
    smoe = table.set_index("model").loc["smoe"]
    assert smoe["routing_agreement_mean"] == 99.0 and smoe["params_mean"] == 12315
    assert np.isnan(smoe["prcntclose1.0_std"])  # one seed: no spread to report


def test_aggregate_writes_csv_and_markdown(tmp_path):
    paths = write(tmp_path, [result("cnn", 0, 80.0, 1e-4), result("cnn", 1, 90.0, 3e-4)])
    outputs = aggregate(paths, tmp_path / "tables")
    long = pd.read_csv(outputs["long"])
    assert set(long["seed"]) == {0, 1}
    assert long[(long.metric == "mse") & (long.seed == 1)]["value"].item() == pytest.approx(3e-4)
    summary = pd.read_csv(outputs["summary"])
    assert summary.loc[0, "prcntclose1.0_mean"] == pytest.approx(85.0)
    text = outputs["markdown"].read_text()
    assert "| cnn | 2 | 10 | 85.00 ± 7.07 | 42.50 ± 3.54 | 2.00e-04 ± 1.41e-04 |" in text
    assert "## Test metrics per region type" in text and "type 2 MSE" in text
    assert "mask0" not in text.split("## Test metrics per region type")[1].split("- ")[0]
    assert "published" not in text  # the fake store is not the paper's test split
    assert "routing agreement" not in text  # no SMoE among the results: no empty column
    page = outputs["html"].read_text()
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page
    assert '<td class="num">85.00 ± 7.07</td>' in page
    assert not list((tmp_path / "tables").glob("*.partial"))


def test_one_seed_shows_the_value_alone_and_smoe_columns_appear(tmp_path):
    routing = {"agreement": 99.0, "kernel_max_abs_error": 1e-4}
    rows = [result("smoe", 0, 99.0, 1e-6, routing=routing, params=12315, time=5.0)]
    outputs = aggregate(write(tmp_path, rows), tmp_path / "tables")
    text = outputs["markdown"].read_text()
    assert "| smoe | 1 | 12,315 | 99.00 | 49.50 | 1.00e-06 |" in text
    assert "| 99.00 | 1.00e-04 | 3 | 5.0 |" in text  # agreement, kernel error, epoch, time
    assert "±" not in text.split("|---|")[1].split("\n\n")[0]  # no spread with one seed
    cells = re.findall(r'<td class="num">([^<]*)</td>', outputs["html"].read_text())
    assert cells and not [cell for cell in cells if "nan" in cell.lower() or "±" in cell]


def test_bad_metrics_files_are_named(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        aggregate([tmp_path / "missing.json"], tmp_path / "out")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(InputError, match="bad.json' is not an evaluation result"):
        aggregate([tmp_path / "bad.json"], tmp_path / "out")


def test_analytic_predictors_are_reference_rows_and_nothing_is_called_published(tmp_path):
    rows = [result("cnn", 0, 80.0, 1e-4), result("generator", 0, 100.0, 1e-14)]
    rows[1]["kind"] = "generator"
    text = aggregate(write(tmp_path, rows), tmp_path / "tables")["markdown"].read_text()
    assert "| generator *(reference)* | 1 | 10 | 100.00 |" in text
    assert "| cnn | 1 | 10 | 80.00 |" in text
    assert "analytic predictor evaluated by this workflow" in text and "published" not in text
    page = (tmp_path / "tables" / "summary.html").read_text()
    assert '<tr class="reference"><td class="label">generator<span class="badge"' in page
    summary = pd.read_csv(tmp_path / "tables" / "summary.csv")
    assert list(summary["source"]) == ["ours", "reference"]


CITED = {
    "label": "SMoE (paper)",
    "citation": "N. Dryden, T. Hoefler. Spatial Mixture-of-Experts. NeurIPS 2022, Table 1",
    "metrics": {"prcntclose1.0": 99.5},
}


def references_file(tmp_path, rows):
    spec = yaml.safe_load(REFERENCES.read_text())
    spec["rows"] = rows
    path = tmp_path / "references.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_shipped_references_hold_only_cited_published_numbers():
    spec = load_references()
    assert all(row["citation"] and row["metrics"] for row in spec["rows"])
    assert not any("persistence" in row["label"] for row in spec["rows"])


def test_a_published_row_needs_a_citation_and_numbers(tmp_path):
    uncited = references_file(tmp_path, [{k: v for k, v in CITED.items() if k != "citation"}])
    with pytest.raises(InputError, match=r"rows\[0\] \('SMoE \(paper\)'\) has no citation"):
        load_references(uncited)
    empty = references_file(tmp_path, [{**CITED, "metrics": {}}])
    with pytest.raises(InputError, match="has no published metrics"):
        load_references(empty)


@pytest.mark.slow
def test_published_figures_only_for_the_papers_test_split(tmp_path):
    mask = generate_mask(64, 64, 3, seed=42)
    params = HeatParams((0.0025, 0.025, 0.25), steps=100)
    paper = simulate_split(mask, params, 865124, 20, tmp_path / "test.zarr", progress=False)
    other = simulate_split(mask, params, 1, 20, tmp_path / "other.zarr", progress=False)
    path = references_file(tmp_path, [CITED])
    assert [row["label"] for row in applicable_references(paper, path)] == ["SMoE (paper)"]
    assert applicable_references(other, path) == []
    paths = write(tmp_path, [result("smoe", 0, 100.0, 1e-12, store=str(paper))])
    text = aggregate(paths, tmp_path / "tables", path)["markdown"].read_text()
    assert "| SMoE (paper) *(published)* [1] |  |  | 99.50 |" in text
    assert f"[1] {CITED['citation']}" in text
    page = (tmp_path / "tables" / "summary.html").read_text()
    assert '<sup><a href="#cite-1">[1]</a></sup>' in page
    assert f'<li id="cite-1">{CITED["citation"]}</li>' in page
    assert "type 0 (a = 0.0025, " in page  # per-type headers from the test store
    summary = pd.read_csv(tmp_path / "tables" / "summary.csv")
    assert summary.set_index("model").loc["SMoE (paper)", "citation"] == CITED["citation"]
