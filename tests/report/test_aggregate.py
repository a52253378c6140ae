"""Aggregation of evaluation results into CSV and Markdown tables."""

import json

import numpy as np
import pandas as pd
import pytest

from smoe.data.heat import HeatParams
from smoe.data.mask import generate_mask
from smoe.data.store import simulate_split
from smoe.errors import InputError
from smoe.report.aggregate import aggregate, applicable_references, summary_table


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
    assert "| cnn | 2 | 10 | 85.00 ± 7.07 |" in text
    assert "## Per region type" in text and "type 2 mse" in text
    assert "published" not in text  # the fake store is not the paper's test split
    assert not list((tmp_path / "tables").glob("*.partial"))


def test_bad_metrics_files_are_named(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        aggregate([tmp_path / "missing.json"], tmp_path / "out")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(InputError, match="bad.json' is not an evaluation result"):
        aggregate([tmp_path / "bad.json"], tmp_path / "out")


@pytest.mark.slow
def test_published_figures_only_for_the_papers_test_split(tmp_path):
    mask = generate_mask(64, 64, 3, seed=42)
    params = HeatParams((0.0025, 0.025, 0.25), steps=100)
    paper = simulate_split(mask, params, 865124, 20, tmp_path / "test.zarr", progress=False)
    other = simulate_split(mask, params, 1, 20, tmp_path / "other.zarr", progress=False)
    labels = [row["label"] for row in applicable_references(paper)]
    assert "persistence (published)" in labels
    assert applicable_references(other) == []
    paths = write(tmp_path, [result("persistence", 0, 87.71, 1e-5, store=str(paper))])
    text = aggregate(paths, tmp_path / "tables")["markdown"].read_text()
    assert "| persistence (published) |  |  | 87.71 | 41.84 |" in text
