"""The prepared GPU check, benchmarks/gpu_check.sh: its CPU dry run writes the JSON a GPU run
writes, with real values where the CPU can measure and a stated reason where it cannot, and
without --dry-run a machine without CUDA gets a one-line refusal. What only a GPU runs (the
comparison of fp32 with bf16 and fp16) is checked here on made-up runs."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow

SECTIONS = {"cuda_tests", "precision_agreement", "epochs_per_second", "time_to_100"}


def gpu_check(repo, *args, cwd):
    """``bash benchmarks/gpu_check.sh ARGS`` in ``cwd``, this checkout's package first."""
    env = {**os.environ, "PYTHONPATH": str(repo)}
    return subprocess.run(
        ["bash", str(repo / "benchmarks" / "gpu_check.sh"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def dry_run(repo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu_check")
    result = gpu_check(repo, "--dry-run", "--out", "check.json", cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((folder / "check.json").read_text())


def test_the_dry_run_writes_every_section_and_the_machine(dry_run):
    assert SECTIONS <= set(dry_run) and dry_run["errors"] == {}
    assert dry_run["dry_run"] is True
    assert dry_run["torch_version"] == torch.__version__
    assert dry_run["cuda_version"] == torch.version.cuda
    assert dry_run["device"] == (
        torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    )
    assert 0 < dry_run["wall_s"] < dry_run["budget_s"]


def test_the_cuda_tests_ran_and_skipped_with_the_reason(dry_run):
    tests = dry_run["cuda_tests"]
    assert tests["returncode"] == 0 and tests["failed"] == tests["errors"] == 0
    assert tests["skipped_tests"] >= 10 and tests["passed"] >= 0 and tests["failing"] == []
    expected = "no CUDA device" if not torch.cuda.is_available() else "dry run on the CPU"
    assert tests["skipped"] == expected
    assert "tests/train/test_cuda.py" in tests["command"]


def test_fp32_trained_and_the_mixed_precisions_say_why_not(dry_run):
    check = dry_run["precision_agreement"]
    fp32 = check["runs"]["fp32"]
    assert fp32["skipped"] is None and fp32["device"] == "cpu" and fp32["precision"] == "fp32"
    assert fp32["steps"] == 3 * 2  # 48 pairs in batches of 32, 3 epochs
    assert fp32["val"]["mse"] > 0 and 0 <= fp32["val"]["prcntclose1.0"] <= 100
    assert 0 <= fp32["val"]["routing_agreement"] <= 100
    for name in ("bf16", "fp16"):
        assert "autocast runs on CUDA only" in check["runs"][name]["skipped"]
        assert check["comparisons"][name]["skipped"] == check["runs"][name]["skipped"]
    assert check["selections_same"] is None and check["metrics_within_tolerance"] is None
    assert check["tolerance"] == {"prcntclose1.0_points": 1.0, "mse_relative": 0.1}


def test_both_recipes_give_epochs_per_second(dry_run):
    rates = dry_run["epochs_per_second"]
    for recipe, config in (("quick", "config/config.yaml"), ("paper", "config/paper.yaml")):
        rate = rates[recipe]
        assert rate["config"] == config and rate["device"] == "cpu"
        assert rate["epochs"] == len(rate["epoch_s"]) == 2
        assert rate["pairs"] == 48 and rate["epochs_per_s"] > 0


def test_time_to_100_is_reported_either_way(dry_run):
    result = dry_run["time_to_100"]
    assert result["cap_s"] == 3.0 and result["epochs"] >= 1
    if result["reached"]:
        assert 0 < result["time_s"] <= result["train_time_s"]
        assert result["result"].startswith("reached 100 % after")
    else:
        assert result["time_s"] is None
        assert result["result"].startswith("not reached")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_cuda_the_full_check_refuses_in_one_line(repo, tmp_path):
    result = gpu_check(repo, "--out", "check.json", cwd=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("gpu_check: no CUDA device found")
    assert not (tmp_path / "check.json").exists()


@pytest.fixture(scope="module")
def check_module(repo):
    spec = importlib.util.spec_from_file_location("gpu_check", repo / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_a_precision_run_is_compared_with_fp32_by_selection_and_tolerance(check_module):
    reference = {"val": {"prcntclose1.0": 99.0, "mse": 1.0e-6}}
    selection = torch.tensor([[[0, 1], [2, 1]]])
    same = check_module.compare_runs(reference, reference, selection, selection.clone())
    assert same["selections_equal"] and same["selection_agreement"] == 100.0
    assert same["metrics_within_tolerance"] and same["mse_relative_diff"] == 0.0
    close = {"val": {"prcntclose1.0": 98.5, "mse": 1.05e-6}}
    moved = torch.tensor([[[0, 1], [2, 2]]])
    compared = check_module.compare_runs(reference, close, selection, moved)
    assert not compared["selections_equal"] and compared["selection_agreement"] == 75.0
    assert compared["metrics_within_tolerance"]
    far = {"val": {"prcntclose1.0": 97.0, "mse": 1.05e-6}}
    assert not check_module.compare_runs(reference, far, selection, selection)[
        "metrics_within_tolerance"
    ]
    assert check_module.all_or_none([None, True]) is True
    assert check_module.all_or_none([True, False]) is False
    assert check_module.all_or_none([None]) is None
