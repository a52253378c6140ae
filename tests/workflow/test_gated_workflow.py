"""The gated modular MoE family through a real Snakemake, on config/test.yaml's tiny section.

config/test.yaml keeps the family off (`gated.enabled: false`) so the heat tests and the report
they check stay as they are; the named target `gated` builds the family from its section
either way. One module-wide build makes the digits stores, the five models (a distilled one
on its attentive teacher's experts, a similarity loss on the single network's features),
their metrics, the table and the figures; the other tests read it, ask Snakemake what it
would do, or refuse bad configs before any job, deleting nothing.
"""

import csv
import gzip
import json
import re

import numpy as np
import pytest
import torch
import yaml
from snakemake_runs import (
    built_workdir,
    check_family_report,
    idx,
    mnist_folder,
    rules_when_enabled,
    run_snakemake,
    snapshot,
    tiny_config,
)

from smoe.families.gated.store import open_image_split

pytestmark = pytest.mark.slow

GATED = "results/test/gated"
FAMILY = "Gated modular MoE (Krishnamurthy et al. 2023)"


@pytest.fixture(scope="module")
def built(repo, tmp_path_factory):
    """A workdir holding the tiny gated family (`snakemake --cores 2 gated`)."""
    return built_workdir(repo, tmp_path_factory, "gated")


def test_the_family_builds_stores_models_metrics_table_and_figures(repo, built):
    gated = built / GATED
    section = tiny_config(repo)["gated"]
    sizes = {}
    for split in ("train", "val", "test"):
        data = open_image_split(gated / "data" / f"{split}.zarr")
        assert (data.dataset, data.split) == ("digits", split)
        sizes[split] = len(data)
    assert sizes == {"train": 1294, "val": 144, "test": 359}  # 1,797 digits, 20 % test
    for model, spec in section["models"].items():
        for seed in section["seeds"]:
            run = gated / "models" / model / f"seed{seed}"
            assert all((run / name).is_file() for name in ("best.pt", "train.json"))
            metrics = json.loads((gated / f"metrics/{model}/seed{seed}.json").read_text())
            assert (metrics["model"], metrics["seed"]) == (model, seed)
            assert metrics["dataset"] == "digits"
            assert 0 <= metrics["metrics"]["test_accuracy"] <= 100
            routed = metrics["routing"]
            assert (routed is None) == (spec["kind"] == "gated_single")
            if routed:
                assert sum(map(sum, routed["matrix"])) == sizes["test"]
    with open(gated / "table.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["variant"] for row in rows] == list(section["models"])
    labels = {row["variant"]: row["label"] for row in rows}
    assert labels["distilled_attentive"] == "distilled attentive top-2 + L_s (network features)"
    assert labels["attentive_top2_similarity"] == "attentive top-2 + L_s (network features)"
    assert all(row["seeds"] == "2" for row in rows)
    html = (gated / "table.html").read_text()
    assert "<table" in html and "Published orderings on our data" in html
    for name in ("routing", "accuracy_usage"):
        for fmt in ("png", "svg"):
            assert (gated / "figures" / f"{name}.{fmt}").stat().st_size > 1000


def test_the_distilled_model_reuses_its_teachers_experts_per_seed(repo, built):
    models = built / GATED / "models"
    for seed in (0, 1):
        teacher = torch.load(models / f"attentive_top2_similarity/seed{seed}/best.pt")
        student = torch.load(models / f"distilled_attentive/seed{seed}/best.pt")
        experts = [key for key in teacher["model"] if key.startswith("experts.")]
        assert experts
        assert all(torch.equal(teacher["model"][k], student["model"][k]) for k in experts)
        record = student["data_provenance"]["teacher"]
        assert record["seed"] == seed and record["spec"]["name"] == "attentive_top2_similarity"
        features = teacher["data_provenance"]["features"]
        assert features["seed"] == seed and features["spec"]["name"] == "single"


def test_a_second_run_of_the_table_target_has_nothing_to_do(repo, built):
    result = run_snakemake(repo, built, "gated_table", "-n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Nothing to be done" in result.stdout + result.stderr


def test_the_number_of_processes_retrains_nothing(repo, built):
    result = run_snakemake(repo, built, "gated", "-n", "--config", "gated={train: {processes: 2}}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Nothing to be done" in result.stdout + result.stderr, result.stdout[-2000:]


def test_editing_the_teacher_retrains_its_students_only(repo, built, tmp_path):
    config = tiny_config(repo)
    config["gated"]["models"]["attentive_top2_similarity"]["options"]["temperature"] = 2.0
    configfile = tmp_path / "edited.yaml"
    configfile.write_text(yaml.safe_dump(config, sort_keys=False))
    result = run_snakemake(repo, built, "gated", "-n", configfile=configfile)
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = re.findall(r"^rule gated_train:\n.*?wildcards: model=(\S+)", result.stdout, re.M | re.S)
    assert sorted(jobs) == ["attentive_top2_similarity", "distilled_attentive"]


def test_the_report_registers_the_family_under_its_subcategory(repo, built):
    placed = {
        "table.html": ("Results", FAMILY),
        "figures/accuracy_usage.png": ("Results", FAMILY),
        "figures/routing.png": ("Training diagnostics", FAMILY),
    }
    check_family_report(repo, built, "gated", GATED, placed)


def test_enabled_puts_the_family_into_rule_all(repo, tmp_path):
    rules = rules_when_enabled(repo, tmp_path, "gated")
    assert {"gated_data", "gated_train", "gated_aggregate", "gated_figure_routing"} <= rules
    assert {"gated_figure_accuracy_usage", "train", "aggregate", "provenance"} <= rules


def test_an_mnist_folder_is_converted_into_stores(repo, tmp_path):
    folder = mnist_folder(tmp_path / "mnist")
    config = tiny_config(repo)
    config["gated"]["data"] = {"dataset": "mnist", "folder": str(folder), "val_fraction": 0.2}
    configfile = tmp_path / "mnist.yaml"
    configfile.write_text(yaml.safe_dump(config, sort_keys=False))
    stores = [f"{GATED}/data/{split}.zarr" for split in ("train", "val", "test")]
    heads = [f"{store}/zarr.json" for store in stores]  # a store's declared output
    result = run_snakemake(repo, tmp_path, *heads, configfile=configfile)
    assert result.returncode == 0, result.stderr[-3000:]
    sizes = [len(open_image_split(tmp_path / store)) for store in stores]
    assert sizes == [24, 6, 10]
    assert open_image_split(tmp_path / stores[0]).image.shape[1:] == (28, 28)


def gated_edit(**section):
    def apply(config, tmp_path):
        config["gated"].update(section)
        return config

    return apply


def model_options(model, **options):
    def apply(config, tmp_path):
        config["gated"]["models"][model]["options"].update(options)
        return config

    return apply


def mnist_data(damage):
    """A config reading a small MNIST folder, damaged by ``damage(folder)``."""

    def apply(config, tmp_path):
        folder = mnist_folder(tmp_path / "mnist")
        damage(folder)
        config["gated"]["data"] = {"dataset": "mnist", "folder": str(folder)}
        return config

    return apply


def remove_test_labels(folder):
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()


def wrong_magic(folder):
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(idx(np.zeros((30, 28, 28)), 2049))


def truncated(folder):
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-200])


def wrong_shape(folder):
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(idx(np.zeros((10, 32, 32)), 2051))


# (id, change of config/test.yaml, the message naming the key or file)
BAD = [
    (
        "k-above-experts",
        model_options("top2_importance", top_k=5),
        "config key 'gated.models.top2_importance.options.top_k': top_k=5 must be between 1 "
        "and experts=4",
    ),
    (
        "distilled-without-teacher",
        model_options("distilled_attentive", teacher=None),
        "config key 'gated.models.distilled_attentive.options.teacher': a "
        "gated_distilled model needs the name of the trained gated_moe",
    ),
    (
        "teacher-not-an-moe",
        model_options("distilled_attentive", teacher="single"),
        "config key 'gated.models.distilled_attentive.options.teacher': 'single' "
        "is a gated_single; the teacher must be a gated_moe model",
    ),
    (
        "unknown-run",
        gated_edit(run=["expectation", "topk9"]),
        "config key 'gated.run': model 'topk9' is not defined under 'gated.models'",
    ),
    (
        "folder-missing-files",
        mnist_data(remove_test_labels),
        "lacks 1 file(s): t10k-labels-idx1-ubyte (or .gz)",
    ),
    ("wrong-magic", mnist_data(wrong_magic), "has magic number 2049, expected 2051"),
    ("truncated", mnist_data(truncated), "train-images-idx3-ubyte.gz' is truncated or damaged"),
    ("wrong-shape", mnist_data(wrong_shape), "holds images of 32 x 32, expected 28 x 28"),
]


@pytest.mark.parametrize("change, message", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_a_bad_gated_section_is_refused_before_any_job(repo, built, tmp_path, change, message):
    configfile = tmp_path / "bad.yaml"
    configfile.write_text(yaml.safe_dump(change(tiny_config(repo), tmp_path), sort_keys=False))
    before = snapshot(built / "results")
    result = run_snakemake(repo, built, "gated", configfile=configfile, cores=1)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-2000:]
    assert message in out, out[-2000:]
    assert "invalid config:" in out
    assert "Traceback" not in out and 'File "' not in out, out[-2000:]
    assert "Building DAG" not in out and "Job stats" not in out
    assert snapshot(built / "results") == before
