"""The synthetic-cluster family through a real Snakemake, on config/test.yaml's tiny section.

config/test.yaml keeps the family off (`clusters.enabled: false`) so the heat tests and the
report they check stay as they are; the named target `clusters` builds the family from its
section either way. One module-wide build makes the stores, the four models, their metrics,
the table and the figures; the other tests read it, ask Snakemake what it would do, or
refuse bad configs before any job, deleting nothing.
"""

import csv
import json
import re

import pytest
import yaml
from snakemake_runs import (
    built_workdir,
    check_family_report,
    rules_when_enabled,
    run_snakemake,
    snapshot,
    tiny_config,
)

from smoe.families.clusters.store import open_cluster_split

pytestmark = pytest.mark.slow

CLUSTERS = "results/test/clusters"
MODELS = ("moe_nonlinear", "moe_linear", "single_nonlinear", "single_linear")
FAMILY = "Synthetic clusters (Chen et al. 2022)"


@pytest.fixture(scope="module")
def built(repo, tmp_path_factory):
    """A workdir holding the tiny cluster family (`snakemake --cores 2 clusters`)."""
    return built_workdir(repo, tmp_path_factory, "clusters")


def test_the_family_builds_stores_models_metrics_table_and_figures(repo, built):
    clusters = built / CLUSTERS
    section = tiny_config(repo)["clusters"]
    settings, seeds = section["settings"], section["seeds"]
    for setting in settings:
        for split in ("train", "test"):
            data = open_cluster_split(clusters / "data" / setting / f"{split}.zarr")
            assert (data.split, data.setting.name, data.seed) == (split, setting, 0)
            assert len(data) == section["data"][f"n_{split}"]
        for model in MODELS:
            for seed in seeds:
                run = clusters / "models" / setting / model / f"seed{seed}"
                assert all((run / name).is_file() for name in ("best.pt", "train.json"))
                metrics = json.loads(
                    (clusters / f"metrics/{setting}/{model}/seed{seed}.json").read_text()
                )
                assert (metrics["setting"], metrics["model"], metrics["seed"]) == (
                    setting,
                    model,
                    seed,
                )
                assert 0 <= metrics["metrics"]["test_accuracy"] <= 100
                moe = section["models"][model]["kind"] == "cluster_moe"
                assert (metrics["metrics"]["dispatch_entropy"] is not None) == moe
    with open(clusters / "table.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["source"] == "ours"]
    assert sorted((row["setting"], row["model"]) for row in rows) == sorted(
        (setting, model) for setting in settings for model in MODELS
    )
    assert (clusters / "table.md").is_file() and "<table>" in (clusters / "table.html").read_text()
    names = ["dispatch"] + [f"projection_{setting}" for setting in settings]
    for name in names:
        for fmt in ("png", "svg"):
            assert (clusters / "figures" / f"{name}.{fmt}").stat().st_size > 1000


def test_a_second_run_of_the_table_target_has_nothing_to_do(repo, built):
    result = run_snakemake(repo, built, "clusters_table", "-n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Nothing to be done" in result.stdout + result.stderr


def test_the_report_registers_the_family_under_its_subcategory(repo, built):
    placed = {
        "table.html": ("Results", FAMILY),
        "figures/dispatch.png": ("Training diagnostics", FAMILY),
        "figures/projection_s1.png": ("Data", FAMILY),
    }
    check_family_report(repo, built, "clusters", CLUSTERS, placed)


def test_enabled_puts_the_family_into_rule_all_and_disabled_keeps_heat_alone(repo, tmp_path):
    rules = rules_when_enabled(repo, tmp_path, "clusters")
    assert {"cluster_data", "cluster_train", "cluster_aggregate"} <= rules


def test_a_cuda_model_asks_for_a_gpu(repo, tmp_path):
    result = run_snakemake(
        repo,
        tmp_path,
        "clusters",
        "-n",
        "--config",
        "clusters={train: {device: cuda}}",
        env={"SMOE_GPU_CHECK": "cluster"},
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-2000:]
    jobs = re.findall(r"^rule (\w+):\n(.*?)(?=^\S|\Z)", result.stdout, re.M | re.S)
    trains = [body for rule, body in jobs if rule == "cluster_train"]
    others = [body for rule, body in jobs if rule == "cluster_data"]
    assert trains and all("gpu=1" in body for body in trains)
    assert others and not any("gpu=1" in body for body in others)


def clusters_edit(**section):
    def apply(config):
        config["clusters"].update(section)
        return config

    return apply


def moe_options(**options):
    def apply(config):
        config["clusters"]["models"]["moe_nonlinear"]["options"].update(options)
        return config

    return apply


# (id, change of config/test.yaml, the message naming the key)
BAD = [
    (
        "impossible-sizes",
        clusters_edit(data={"n_train": 400, "n_test": 400, "dim": 6}),
        "config key 'clusters.data.dim': 6 dimensions cannot hold 2 x 4 orthonormal vectors",
    ),
    (
        "unknown-setting",
        clusters_edit(settings=["s1", "s7"]),
        "config key 'clusters.settings[1]': unknown setting 's7'; known settings: s1, s2, s3, s4",
    ),
    (
        "zero-experts",
        moe_options(experts=0),
        "config key 'clusters.models.moe_nonlinear.options.experts': 0 is less than the "
        "minimum of 1",
    ),
    (
        "k-above-experts",
        moe_options(experts=2, top_k=3),
        "config key 'clusters.models.moe_nonlinear.options.top_k': top_k=3 must be between 1 "
        "and experts=2",
    ),
    (
        "val-fraction-leaves-nothing",
        clusters_edit(data={"n_train": 400, "n_test": 400, "val_fraction": 0.001}),
        "config key 'clusters.data.val_fraction': 0.001 of 400 train samples holds out 0.4",
    ),
]


@pytest.mark.parametrize("change, message", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_a_bad_clusters_section_is_refused_before_any_job(repo, built, change, message):
    configfile = built.parent / f"{built.name}-bad.yaml"
    configfile.write_text(yaml.safe_dump(change(tiny_config(repo)), sort_keys=False))
    before = snapshot(built / "results")
    result = run_snakemake(repo, built, "clusters", configfile=configfile, cores=1)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-2000:]
    assert message in out, out[-2000:]
    assert "invalid config:" in out
    assert "Traceback" not in out and 'File "' not in out, out[-2000:]
    assert "Building DAG" not in out and "Job stats" not in out
    assert snapshot(built / "results") == before
