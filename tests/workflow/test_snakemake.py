"""Real Snakemake runs of the workflow on the tiny config (config/test.yaml)."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr
import yaml
from snakemake_runs import run_snakemake

from smoe.families.heat.store import open_store

pytestmark = pytest.mark.slow


snakemake = run_snakemake


@pytest.fixture(scope="module")
def built(built_workflow):
    return built_workflow


def test_tiny_config_builds_mask_stores_and_netcdf(built, paper_mask):
    data = built / "results" / "test" / "data"
    assert np.load(data / "mask.npy").shape == (16, 16)
    assert (data / "mask.png").stat().st_size > 1000
    for split, runs in (("train", 6), ("val", 2), ("test", 3)):
        ds = open_store(data / "heat" / f"{split}.zarr")
        assert ds.sizes["run"] == runs and ds.sizes["time"] == 11
        assert ds.attrs["split"] == split
        assert ds["u"].encoding["chunks"][0] == 2
        assert (data / "heat" / f"{split}.nc").exists()
    assert (built / "results" / "test" / "logs" / "data" / "simulate_train.log").exists()
    assert not list(data.glob("heat/*.partial"))


MODELS = ("persistence", "stencil", "generator", "cnn", "smoe")
REFERENCE = ("persistence", "stencil", "generator")


def test_workflow_stores_open_without_a_warning(built):
    import warnings

    results = built / "results" / "test"
    for split in ("train", "val", "test"):
        store = results / "data" / "heat" / f"{split}.zarr"
        # The rule declares the root metadata, so Snakemake marks no directory output.
        assert not (store / ".snakemake_timestamp").exists()
        assert '"consolidated_metadata"' in (store / "zarr.json").read_text()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            open_store(store).load()
            xr.open_zarr(store).load()  # plain xarray reads the consolidated metadata
        assert [str(w.message) for w in caught] == [], split
    logs = [p.read_text() for p in (results / "logs").rglob("*.log")]
    assert logs and not [log for log in logs if "snakemake_timestamp" in log]


def test_tiny_config_trains_and_evaluates_every_model(built):
    results = built / "results" / "test"
    for model in MODELS:
        folder = results / "models" / model / "seed0"
        expected = {"best.pt", "history.csv", "train.json"}
        if model not in REFERENCE:  # nothing to resume for a model without parameters
            expected.add("last.pt")
        assert expected <= {p.name for p in folder.iterdir()}
        metrics = json.loads((results / "metrics" / model / "seed0.json").read_text())
        assert metrics["model"] == model and metrics["seed"] == 0
        assert metrics["device"] == "cpu" and metrics["precision"] == "fp32"
        assert (metrics["routing"] is not None) == (model == "smoe")
    # persistence's score, computed here straight from the test store with numpy
    u = open_store(results / "data" / "heat" / "test.zarr")["u"].values
    now, later = u[:, :-1], u[:, 1:]
    close = np.abs(now - later) <= 1e-8 + 0.01 * np.abs(later)
    persistence = json.loads((results / "metrics" / "persistence" / "seed0.json").read_text())
    assert persistence["metrics"]["prcntclose1.0"] == pytest.approx(100 * close.mean(), abs=1e-9)
    train = json.loads((results / "models" / "smoe" / "seed0" / "train.json").read_text())
    assert train["epochs"] == 2 and train["params"] == 3 * 9 + 3 * 16 * 16


def test_training_and_evaluation_jobs_ask_for_a_gpu_only_when_sent_to_cuda(repo, tmp_path):
    # Planned as for a cluster, where the GPUs are on the nodes, not on this machine.
    cluster = {"SMOE_GPU_CHECK": "cluster"}
    config = yaml.safe_load((repo / "config" / "test.yaml").read_text())
    for device, expected in (("cuda", "gpu=1"), ("auto", "gpu=0")):
        config["train"]["device"] = device
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
        result = snakemake(repo, tmp_path, "-n", "-p", configfile=tmp_path / "c.yaml", env=cluster)
        assert result.returncode == 0, result.stderr[-2000:]
        out = result.stdout + result.stderr
        for rule in ("train", "evaluate"):
            resources = re.findall(rf"rule {rule}:.*?resources: ([^\n]*)", out, re.S)
            assert len(resources) == len(MODELS), rule
            assert all(expected in line for line in resources), (rule, resources)
        evaluations = re.findall(r"smoe evaluate [^\n]*", out)
        assert len(evaluations) == len(MODELS)
        assert all(f"--device {device}" in line for line in evaluations), evaluations


def test_tables_figures_and_provenance(repo, built):
    results = built / "results" / "test"
    summary = (results / "tables" / "summary.md").read_text()
    for model in MODELS:
        label = f"{model} *(reference)*" if model in REFERENCE else model
        assert f"| {label} | 1 |" in summary
    assert "| generator *(reference)* | 1 | 0 | 100.00 | 100.00 |" in summary
    assert "published" not in summary  # nothing on the tiny config was published
    figures = ("predictions", "learning_curves", "metric_bars", "routing", "kernels")
    for name in figures + ("smoe_dynamics", "expert_regions"):
        for suffix in (".png", ".svg"):
            assert (results / "figures" / f"{name}{suffix}").stat().st_size > 1000, name
    assert "<table>" in (results / "tables" / "summary.html").read_text()
    assert "results: results/test" in (results / "report" / "provenance.html").read_text()
    # the report built from these outputs: tests/workflow/test_report.py


def test_changing_one_model_retrains_only_that_model(repo, built):
    config = yaml.safe_load((repo / "config" / "test.yaml").read_text())
    config["models"]["cnn"]["options"]["hidden"] = [3]
    (built / "changed.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(repo, built, "-n", configfile=built / "changed.yaml")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout + result.stderr
    trained = re.findall(r"rule train:.*?wildcards: model=([\w-]+)", out, re.S)
    assert trained == ["cnn"]
    assert "rule simulate:" not in out


def test_a_figure_target_builds_only_what_it_needs(repo, tmp_path):
    result = snakemake(repo, tmp_path, "-n", "results/test/figures/kernels.png")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout + result.stderr
    assert re.findall(r"rule train:.*?wildcards: model=([\w-]+)", out, re.S) == ["smoe"]
    assert "rule figure_predictions:" not in out and "rule aggregate:" not in out


def test_changed_data_retrains_from_scratch_like_a_clean_run(repo, built, tmp_path):
    """Editing heat.diffusivity re-simulates the data; the retrained models must not resume
    their finished checkpoints from the old data: metrics equal a clean run's."""
    reused = tmp_path / "reused"
    shutil.copytree(built, reused, symlinks=True)
    config = yaml.safe_load((repo / "config" / "test.yaml").read_text())
    config["heat"]["diffusivity"] = [0.005, 0.05, 0.2]
    # keep the model specs as they were (the scaled tolerances default to the diffusivities)
    config["evaluate"] = {"region_rtol_scale": [0.01, 0.1, 1.0]}
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(config))
    targets = [f"results/test/metrics/{model}/seed0.json" for model in ("cnn", "smoe")]
    result = snakemake(repo, reused, *targets, configfile=tmp_path / "changed.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    log = (reused / "results" / "test" / "logs" / "train" / "cnn_seed0.log").read_text()
    assert "not resuming" in log and "other data" in log and "diffusivity" in log
    clean = tmp_path / "clean"
    clean.mkdir()
    result = snakemake(repo, clean, *targets, configfile=tmp_path / "changed.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    for target in targets:
        ours, fresh = (json.loads((root / target).read_text()) for root in (reused, clean))
        assert ours["metrics"] == fresh["metrics"], target
        assert ours["routing"] == fresh["routing"], target
        old = json.loads((built / target).read_text())
        assert ours["metrics"] != old["metrics"], target


def test_second_run_has_nothing_to_do(repo, built):
    result = snakemake(repo, built, "-n")
    assert result.returncode == 0
    assert "Nothing to be done" in result.stdout + result.stderr


def test_single_target_builds_only_what_it_needs(repo, tmp_path):
    result = snakemake(repo, tmp_path, "results/test/data/heat/val.zarr/zarr.json")
    assert result.returncode == 0, result.stderr[-3000:]
    heat = tmp_path / "results" / "test" / "data" / "heat"
    assert sorted(p.name for p in heat.iterdir()) == ["val.zarr"]


def test_lint_is_clean(repo, tmp_path):
    result = snakemake(repo, tmp_path, "--lint")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations" in result.stdout + result.stderr


@pytest.mark.parametrize(
    "change, message",
    [
        ({"heat": {"stepz": 3}}, "unknown config key 'heat.stepz'"),
        ({"heat": {"steps": "many"}}, "'heat.steps': 'many' is not of type 'integer'"),
        (
            {"heat": {"splits": {"train": {"runs": 0, "seed": 1}}}},
            "'heat.splits.train.runs': 0 is less than the minimum of 1",
        ),
        ({"heat": {"diffusivity": [0.0025, 0.025, 0.26]}}, "'heat.diffusivity[2]': 0.26"),
        ({"heat": {"diffusivity": [0.0025, -0.025, 0.25]}}, "'heat.diffusivity[1]': -0.025"),
        ({"heat": {"diffusivity": [0.0025, 0.025]}}, "2 values for mask.types=3"),
        ({"mask": {"file": "missing/mask.npy"}}, "mask file 'missing/mask.npy' does not exist"),
        ({"mask": {"file": "bad_mask.npy"}}, "values [5] outside 0..2"),
    ],
)
def test_bad_config_fails_before_any_job_and_deletes_nothing(repo, built, change, message):
    bad_mask = np.load(built / "results" / "test" / "data" / "mask.npy")
    bad_mask[0, 0] = 5
    np.save(built / "bad_mask.npy", bad_mask)
    config = yaml.safe_load((repo / "config" / "test.yaml").read_text())
    for key, value in change.items():
        config[key] = {**config[key], **value}
    configfile = built / "bad.yaml"
    configfile.write_text(yaml.safe_dump(config))
    before = {p: p.stat().st_mtime_ns for p in (built / "results").rglob("*")}
    result = snakemake(repo, built, configfile=configfile)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert "Select jobs to execute" not in result.stdout + result.stderr
    assert {p: p.stat().st_mtime_ns for p in (built / "results").rglob("*")} == before


def test_existing_mask_file_is_checked_and_used(repo, tmp_path, paper_mask):
    np.save(tmp_path / "paper_mask.npy", paper_mask)
    config = yaml.safe_load((repo / "config" / "test.yaml").read_text())
    config["mask"] = {"file": "paper_mask.npy", "types": 3}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(repo, tmp_path, "results/test/data/mask.npy", configfile=tmp_path / "c.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "results/test/data/mask.npy"), paper_mask)


def test_paper_config_plans_the_full_data_stage(repo, tmp_path):
    result = snakemake(repo, tmp_path, "-n", configfile=repo / "config" / "paper.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert re.search(r"simulate\s+3\n", out) and re.search(r"mask\s+1\n", out)
    assert re.search(r"train\s+33\n", out) and re.search(r"evaluate\s+33\n", out)
    assert re.search(r"aggregate\s+1\n", out) and re.search(r"figure_routing\s+1\n", out)


def test_default_config_plans(repo, tmp_path):
    result = snakemake(repo, tmp_path, "-n", configfile=repo / "config" / "config.yaml")
    assert result.returncode == 0, result.stderr[-3000:]


def test_snakefmt_is_clean(repo):
    if shutil.which("snakefmt") is None:
        pytest.skip("snakefmt is part of the dev extra")
    result = subprocess.run(
        ["snakefmt", "--check", str(repo / "Snakefile"), str(repo / "workflow")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_local_profile_runs_and_slurm_profile_names_the_executor(repo, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-n",
            "--profile",
            str(repo / "profiles" / "local"),
            "--snakefile",
            str(repo / "Snakefile"),
            "--directory",
            str(tmp_path),
            "--configfile",
            str(repo / "config" / "test.yaml"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    slurm = yaml.safe_load((repo / "profiles" / "slurm" / "profile.yaml").read_text())
    assert slurm["executor"] == "slurm"
    assert {"mem_mb", "runtime", "slurm_partition"} <= set(slurm["default-resources"])


def tree_state(root):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}


def test_outputs_edited_after_they_were_written_are_refused_before_any_job(repo, built, tmp_path):
    """A store whose variables were edited, or a region map replaced by another grid, looks
    up to date to Snakemake; the workflow refuses to plan, naming file, field and the fix,
    and changes nothing."""
    import zarr

    work = tmp_path / "work"
    shutil.copytree(built, work, symlinks=True)
    data = work / "results" / "test" / "data"
    zarr.open_array(data / "heat" / "test.zarr" / "diffusivity", mode="r+")[2] = 0.2
    before = tree_state(work / "results")
    result = snakemake(repo, work, "-n")
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "Traceback" not in out
    assert "test.zarr: its diffusivity variable [0.0025, 0.025, 0.2] differs from its record" in out
    assert "rm -r results/test/data/heat/test.zarr" in out
    assert tree_state(work / "results") == before
    shutil.rmtree(data / "heat" / "test.zarr")
    np.save(data / "mask.npy", np.zeros((8, 8), dtype=np.int64))
    result = snakemake(repo, work, "-n")
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "mask.npy is 8x8 but mask.height x mask.width is 16x16" in out
