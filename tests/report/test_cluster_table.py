"""The cluster family's results table: CSV, Markdown and HTML, published rows with citations."""

import csv
import json
import math

import pytest
import yaml
from command_runs import write_results

from smoe.core.errors import InputError
from smoe.families.clusters.data import make_setting
from smoe.families.clusters.store import write_cluster_split
from smoe.families.clusters.table import (
    CSV_COLUMNS,
    REFERENCES,
    cluster_table,
    load_cluster_references,
    model_label,
)

CITATION_START = "Z. Chen, Y. Deng, Y. Wu, Q. Gu, Y. Li. Towards Understanding Mixture of Experts"


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Test stores: s1 at the paper's size (published figures apply), s2 at a smaller size."""
    folder = tmp_path_factory.mktemp("clusters")
    s1 = write_cluster_split(make_setting({"setting": "s1"}), 5, "test", folder / "s1.zarr")
    small = make_setting({"setting": "s2", "n_train": 400, "n_test": 300})
    s2 = write_cluster_split(small, 5, "test", folder / "s2.zarr")
    return {"s1": str(s1), "s2": str(s2)}


def result(setting, model, seed, accuracy, entropy=None, *, kind="cluster_moe", **changes):
    """A metrics dict of exactly the shape the cluster trainer writes."""
    moe = kind == "cluster_moe"
    values = {
        "family": "clusters",
        "setting": setting,
        "model": model,
        "kind": kind,
        "seed": seed,
        "activation": "cubic",
        "experts": 8 if moe else None,
        "filters": 16 if moe else 80,
        "params": 6536 if moe else 8080,
        "best_epoch": 40,
        "epochs": 50,
        "train_time_s": 12.5,
        "stop_reason": "epochs",
        "train_samples": 14400,
        "val_samples": 1600,
        "test_noise": False,
        "device": "cpu",
        "precision": "fp32",
        "metrics": {
            "test_accuracy": accuracy,
            "train_accuracy": 100.0,
            "val_accuracy": 99.0,
            "dispatch_entropy": entropy,
            "dispatch_entropy_eval": None if entropy is None else entropy / 2,
            "test_dispatch_entropy": entropy,
        },
        "dispatch": (
            {"train": [[10, 0, 0, 0]] * 8, "test": [[5, 0, 0, 0]] * 8, "experts": 8, "clusters": 4}
            if moe
            else None
        ),
        "store": f"results/clusters/data/{setting}/test.zarr",
        "train_store": f"results/clusters/data/{setting}/train.zarr",
    }
    values.update(changes)
    return values


def write(folder, results):
    return write_results(folder, results, lambda v: f"{v['setting']}_{v['model']}_{v['seed']}")


def read_csv(path):
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


@pytest.fixture
def s1_results(stores):
    store = stores["s1"]
    return [
        result("s1", "moe_nonlinear", 0, 99.0, 0.05, store=store),
        result("s1", "moe_nonlinear", 1, 99.5, 0.10, store=store),
        result("s1", "moe_nonlinear", 2, 100.0, 0.30, store=store),
        result("s1", "single_cubic_80", 0, 70.25, kind="cluster_single", store=store, filters=80),
    ]


def test_csv_has_the_columns_means_and_ddof1_stds(tmp_path, s1_results):
    outputs = cluster_table(write(tmp_path, s1_results), tmp_path / "out")
    assert set(outputs) == {"csv", "markdown", "html"}
    assert all(path.is_file() for path in outputs.values())
    header, rows = read_csv(outputs["csv"])
    assert tuple(header) == CSV_COLUMNS
    ours = [row for row in rows if row["source"] == "ours"]
    assert [(row["setting"], row["model"]) for row in ours] == [
        ("s1", "single_cubic_80"),  # singles first, as the paper orders them
        ("s1", "moe_nonlinear"),
    ]
    moe = ours[1]
    assert moe["label"] == "MoE nonlinear (8 experts, cubic)"
    assert moe["seeds"] == "3"
    # by hand: 99.0, 99.5, 100.0 -> mean 99.5, squared deviations 0.25 + 0 + 0.25 over 2
    assert float(moe["test_accuracy_mean"]) == pytest.approx(99.5)
    assert float(moe["test_accuracy_std"]) == pytest.approx(0.5)
    # 0.05, 0.10, 0.30 -> mean 0.15, squared deviations 0.01 + 0.0025 + 0.0225 over 2
    assert float(moe["dispatch_entropy_mean"]) == pytest.approx(0.15)
    assert float(moe["dispatch_entropy_std"]) == pytest.approx(math.sqrt(0.0175))
    # the entropy at evaluation beside it (half the published one in these files)
    assert float(moe["dispatch_entropy_eval_mean"]) == pytest.approx(0.075)
    assert float(moe["dispatch_entropy_eval_std"]) == pytest.approx(math.sqrt(0.0175) / 2)
    assert moe["citation"] == ""
    single = ours[0]
    assert single["label"] == "single nonlinear (80 filters, cubic)"
    assert single["seeds"] == "1"
    assert float(single["test_accuracy_mean"]) == 70.25
    # one seed: no spread; a single CNN: no entropy
    assert single["test_accuracy_std"] == ""
    assert single["dispatch_entropy_mean"] == single["dispatch_entropy_std"] == ""
    assert single["dispatch_entropy_eval_mean"] == single["dispatch_entropy_eval_std"] == ""


def test_published_rows_match_by_kind_and_carry_the_citation(tmp_path, s1_results):
    outputs = cluster_table(write(tmp_path, s1_results), tmp_path / "out")
    _, rows = read_csv(outputs["csv"])
    published = {row["model"]: row for row in rows if row["source"] == "published"}
    assert set(published) == {"moe_nonlinear", "single_cubic_80"}
    moe = published["moe_nonlinear"]
    assert moe["citation"].startswith(CITATION_START)
    assert "arXiv:2208.02813" in moe["citation"] and "uclaml/MoE" in moe["citation"]
    assert moe["seeds"] == "10"
    assert float(moe["test_accuracy_mean"]) == 99.46
    assert float(moe["test_accuracy_std"]) == 0.55
    assert float(moe["dispatch_entropy_mean"]) == 0.098
    assert float(moe["dispatch_entropy_std"]) == 0.088
    assert moe["dispatch_entropy_eval_mean"] == ""  # the paper has only its own definition
    single = published["single_cubic_80"]
    assert single["label"] == "single nonlinear (80 filters, cubic)"
    assert float(single["test_accuracy_mean"]) == 79.57
    assert single["seeds"] == "1" and single["test_accuracy_std"] == ""
    assert single["citation"] == moe["citation"]


def test_matching_ignores_the_model_name(tmp_path, stores):
    store = stores["s1"]
    results = [
        # called like the paper's MoE but with 4 experts: not the paper's model
        result("s1", "moe_nonlinear", 0, 97.0, 0.2, store=store, experts=4),
        # an arbitrary name for the paper's linear MoE
        result("s1", "my_router_v2", 0, 91.0, 1.25, store=store, activation="linear"),
        # 128 filters in all = 64 per class
        result(
            "s1",
            "single_linear_80",
            0,
            71.0,
            kind="cluster_single",
            store=store,
            activation="linear",
            filters=128,
        ),
    ]
    outputs = cluster_table(write(tmp_path, results), tmp_path / "out")
    _, rows = read_csv(outputs["csv"])
    published = {row["model"]: row for row in rows if row["source"] == "published"}
    assert set(published) == {"my_router_v2", "single_linear_80"}
    assert float(published["my_router_v2"]["test_accuracy_mean"]) == 93.0
    assert float(published["single_linear_80"]["test_accuracy_mean"]) == 70.94
    assert published["single_linear_80"]["label"] == "single linear (128 filters)"


def test_markdown_and_html_for_a_reader(tmp_path, s1_results):
    outputs = cluster_table(write(tmp_path, s1_results), tmp_path / "out")
    markdown = outputs["markdown"].read_text()
    assert "## Setting s1: σ_p = 1, γ ~ U[0.5, 3]; 16,000 train / 16,000 test samples" in markdown
    lines = markdown.splitlines()
    ours = next(line for line in lines if line.startswith("| MoE nonlinear (8 experts, cubic) |"))
    assert "| 3 | 6,536 | 99.50 ± 0.50 | 0.150 ± 0.132 | 0.075 ± 0.066 |" in ours
    # the published row sits right under ours, marked and footnoted
    below = lines[lines.index(ours) + 1]
    assert below.startswith("| MoE nonlinear (8 experts, cubic) *(published)* [1] | 10 |")
    assert "99.46 ± 0.55 | 0.098 ± 0.088 |" in below
    single = next(line for line in lines if line.startswith("| single nonlinear (80 filters"))
    assert "| 70.25 |" in single and "±" not in single
    assert f"[1] {CITATION_START}" in markdown
    text = " ".join(markdown.split())
    assert "H(cluster | routed to expert m), natural log" in text
    assert "The column 'dispatch entropy' is the published definition" in text
    assert "training forward pass of the last epoch run (router noise on" in text
    assert "the 14,400 of the train split's 16,000 samples left after the 10 % validation" in text
    assert "The column 'dispatch entropy at evaluation' is the same formula" in text
    assert "Where ours differs from the official code" in text
    assert "keep the epoch of best validation accuracy" in text
    assert "off at test time in all 3 MoE runs here (test_noise false" in text
    assert "(ddof 1)" in text and "ddof 0" in text
    assert "one run each" in text
    page = outputs["html"].read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert '<tr class="published">' in page and 'id="cite-1"' in page
    assert 'download="table.csv"' in page
    assert "99.50 ± 0.50" in page


def test_published_figures_only_for_the_papers_data(tmp_path, stores):
    results = [
        result("s2", "moe_nonlinear", 0, 90.0, 0.4, store=stores["s2"]),
        result("s3", "moe_nonlinear", 0, 91.0, 0.5, store=str(tmp_path / "missing.zarr")),
    ]
    outputs = cluster_table(write(tmp_path, results), tmp_path / "out")
    _, rows = read_csv(outputs["csv"])
    assert {row["source"] for row in rows} == {"ours"}
    markdown = " ".join(outputs["markdown"].read_text().split())
    assert "## Setting s2: σ_p = 2, γ ~ U[0.5, 3]; 400 train / 300 test samples" in markdown
    assert "No published figures shown for s2: our data differ from the paper's s2" in markdown
    assert "n_train 400 (paper 16,000), n_test 300 (paper 16,000)" in markdown
    assert "No published figures shown for s3: the test data" in markdown
    assert "could not be read" in markdown
    assert "(published)" not in markdown
    assert "ddof 0" not in markdown  # the published figures' notes only with published rows


def test_mixed_test_noise_is_reported(tmp_path, stores):
    store = stores["s1"]
    results = [
        result("s1", "moe_nonlinear", 0, 99.0, 0.1, store=store),
        result("s1", "moe_noisy", 0, 98.0, 0.1, store=store, test_noise=True, experts=4),
    ]
    outputs = cluster_table(write(tmp_path, results), tmp_path / "out")
    text = " ".join(outputs["markdown"].read_text().split())
    assert "is off at test time except in 1 of the 2 MoE runs, those of moe_noisy (s1)" in text


def test_settings_in_natural_order(tmp_path, stores):
    results = [
        result("s10", "moe_nonlinear", 0, 99.0, 0.1, store=stores["s1"]),
        result("s2", "moe_nonlinear", 0, 99.0, 0.1, store=stores["s2"]),
    ]
    outputs = cluster_table(write(tmp_path, results), tmp_path / "out")
    _, rows = read_csv(outputs["csv"])
    assert [row["setting"] for row in rows if row["source"] == "ours"] == ["s2", "s10"]


def test_missing_and_malformed_files_are_named(tmp_path, s1_results):
    paths = write(tmp_path, s1_results)
    missing = tmp_path / "nowhere.json"
    with pytest.raises(InputError, match="nowhere.json.*does not exist"):
        cluster_table([*paths, missing], tmp_path / "out")
    garbled = tmp_path / "garbled.json"
    garbled.write_text('{"family": "clusters", ')
    with pytest.raises(InputError, match="garbled.json.*is not JSON"):
        cluster_table([*paths, garbled], tmp_path / "out")
    incomplete = dict(s1_results[0])
    del incomplete["metrics"]
    bad = tmp_path / "incomplete.json"
    bad.write_text(json.dumps(incomplete))
    with pytest.raises(InputError, match="incomplete.json.*lacks 'metrics'"):
        cluster_table([bad], tmp_path / "out")
    wrong = tmp_path / "wrong.json"
    for change, message in (
        ({"family": "heat"}, "family 'heat'"),
        ({"kind": "smoe"}, "kind is 'smoe'"),
        ({"experts": None}, "experts is None"),
        ({"test_noise": "no"}, "test_noise"),
        ({"metrics": {"test_accuracy": "high"}}, "metrics.test_accuracy"),
        ({"metrics": {"test_accuracy": 99.0, "dispatch_entropy": "low"}}, "dispatch_entropy"),
        (
            {"metrics": {"test_accuracy": 99.0, "dispatch_entropy_eval": "low"}},
            "dispatch_entropy_eval",
        ),
    ):
        wrong.write_text(json.dumps({**s1_results[0], **change}))
        with pytest.raises(InputError, match=f"wrong.json.*{message}"):
            cluster_table([wrong], tmp_path / "out")
    with pytest.raises(InputError, match="no metrics files"):
        cluster_table([], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_a_run_given_twice_or_two_models_under_one_name(tmp_path, s1_results):
    paths = write(tmp_path, s1_results)
    with pytest.raises(InputError, match="seed 0: give each run once"):
        cluster_table([paths[0], paths[0]], tmp_path / "out")
    (tmp_path / "other").mkdir()
    other = write(tmp_path / "other", [{**s1_results[1], "activation": "linear"}])
    with pytest.raises(InputError, match="describe different models"):
        cluster_table([paths[0], *other], tmp_path / "out")


def test_packaged_references():
    spec = load_cluster_references(REFERENCES)
    rows = spec["rows"]
    assert len(rows) == 4 * 8  # four settings: six single CNNs and two MoE each
    assert all(row["citation"].startswith(CITATION_START) for row in rows)
    by = {(row["setting"], row["label"]): row for row in rows}
    moe = by["s3", model_label("cluster_moe", "cubic", 16, 8)]
    assert (moe["test_accuracy_mean"], moe["test_accuracy_std"]) == (99.99, 0.02)
    assert (moe["dispatch_entropy_mean"], moe["dispatch_entropy_std"]) == (0.008, 0.011)
    assert moe["runs"] == 10
    single = by["s2", model_label("cluster_single", "cubic", 512, None)]
    assert (single["test_accuracy_mean"], single["test_accuracy_std"]) == (52.09, None)
    assert single["runs"] == 1
    assert spec["std_ddof"] == 0
    notes = " ".join(spec["notes"])
    assert "ddof 0" in notes and "one run each" in notes


def test_references_without_citation_are_refused(tmp_path):
    spec = yaml.safe_load(REFERENCES.read_text())
    uncited = dict(spec["rows"][3])
    del uncited["citation"]
    path = tmp_path / "refs.yaml"
    path.write_text(yaml.safe_dump({"rows": [spec["rows"][0], uncited]}))
    with pytest.raises(InputError, match=r"rows\[1\].*has no citation"):
        load_cluster_references(path)
    for change, message in (
        ({"test_accuracy": None}, "test_accuracy must be"),
        ({"kind": "moe"}, "kind must be"),
        ({"experts": 8}, "single-CNN row has no experts"),
    ):
        path.write_text(yaml.safe_dump({"rows": [{**spec["rows"][0], **change}]}))
        with pytest.raises(InputError, match=message):
            load_cluster_references(path)
    path.write_text(yaml.safe_dump({"rows": [spec["rows"][0], spec["rows"][0]]}))
    with pytest.raises(InputError, match=r"rows\[1\] repeats rows\[0\]"):
        load_cluster_references(path)


def test_labels():
    assert model_label("cluster_moe", "cubic", 16, 8) == "MoE nonlinear (8 experts, cubic)"
    assert model_label("cluster_moe", "linear", 32, 4) == "MoE linear (4 experts of 32 filters)"
    assert model_label("cluster_single", "linear", 80, None) == "single linear (80 filters)"
