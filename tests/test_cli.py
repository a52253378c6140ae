import re
import subprocess
import sys

import numpy as np
import pytest

from smoe.cli import main
from smoe.families.heat.store import open_store


def smoe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smoe", *args], capture_output=True, text=True)


@pytest.mark.parametrize("command", [[], ["mask"], ["simulate"], ["export"], ["check-config"]])
def test_every_command_has_help(command):
    result = smoe(*command, "--help")
    assert result.returncode == 0
    assert "usage: smoe" in result.stdout


def test_console_script_is_installed():
    result = subprocess.run(["smoe", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("smoe ")


def test_mask_command_writes_the_paper_map_and_picture(tmp_path, paper_mask, capsys):
    assert (
        main(
            [
                "mask",
                "--seed",
                "42",
                "--out",
                str(tmp_path / "m.npy"),
                "--png",
                str(tmp_path / "m.png"),
            ]
        )
        == 0
    )
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), paper_mask)
    assert (tmp_path / "m.png").stat().st_size > 1000
    assert "cells per type [1449, 1212, 1435]" in capsys.readouterr().out


def test_mask_command_checks_an_existing_map(tmp_path, small_mask, capsys):
    np.save(tmp_path / "given.npy", small_mask)
    assert (
        main(
            [
                "mask",
                "--from",
                str(tmp_path / "given.npy"),
                "--types",
                "3",
                "--out",
                str(tmp_path / "m.nc"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "mask",
                "--from",
                str(tmp_path / "given.npy"),
                "--types",
                "2",
                "--out",
                str(tmp_path / "m2.nc"),
            ]
        )
        == 2
    )
    assert "outside 0..1" in capsys.readouterr().err
    assert not (tmp_path / "m2.nc").exists()


def test_simulate_and_export_commands(tmp_path, small_mask):
    np.save(tmp_path / "mask.npy", small_mask)
    store = tmp_path / "test.zarr"
    result = smoe(
        "simulate",
        "--mask",
        str(tmp_path / "mask.npy"),
        "--runs",
        "3",
        "--seed",
        "4",
        "--steps",
        "5",
        "--diffusivity",
        "0.01",
        "0.1",
        "0.2",
        "--boundary",
        "wrap",
        "--heat-rate",
        "2",
        "--workers",
        "2",
        "--out",
        str(store),
    )
    assert result.returncode == 0, result.stderr
    assert "100%" in result.stderr  # the progress bar
    ds = open_store(store)
    assert ds.attrs["split"] == "test" and ds.attrs["boundary"] == "wrap"
    assert ds.attrs["heat_rate"] == 2 and ds.sizes["time"] == 6
    result = smoe("export", str(store), str(tmp_path / "test.nc"), "--no-progress")
    assert result.returncode == 0 and (tmp_path / "test.nc").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--runs", "0"], "runs must be at least 1"),
        (["--runs", "2", "--diffusivity", "0.1", "0.2", "0.26"], r"diffusivity\[2\]: 0.26"),
        (["--runs", "2", "--diffusivity", "0.1", "0.2"], "outside 0..1"),
        (["--runs", "2", "--diffusivity", "0.1", "-0.2", "0.1"], "negative"),
    ],
)
def test_simulate_rejects_bad_input_and_keeps_existing_output(tmp_path, small_mask, extra, message):
    np.save(tmp_path / "mask.npy", small_mask)
    out = tmp_path / "train.zarr"
    out.mkdir()
    (out / "keep").write_text("old")
    result = smoe(
        "simulate", "--mask", str(tmp_path / "mask.npy"), "--seed", "1", *extra, "--out", str(out)
    )
    assert result.returncode == 2
    assert "smoe simulate: error:" in result.stderr and "Traceback" not in result.stderr
    assert re.search(message, result.stderr)
    assert (out / "keep").read_text() == "old"


def test_simulate_names_a_missing_mask(tmp_path):
    result = smoe(
        "simulate",
        "--mask",
        str(tmp_path / "absent.npy"),
        "--runs",
        "1",
        "--seed",
        "1",
        "--out",
        str(tmp_path / "x.zarr"),
    )
    assert result.returncode == 2
    assert "absent.npy' does not exist" in result.stderr


def test_check_config_prints_defaults_or_errors(tmp_path, repo):
    result = smoe("check-config", str(repo / "config" / "test.yaml"))
    assert result.returncode == 0 and "compression: lz4" in result.stdout
    (tmp_path / "bad.yaml").write_text("heat: {splits: {train: {runs: -1, seed: 1}}}\n")
    result = smoe("check-config", str(tmp_path / "bad.yaml"))
    assert result.returncode == 2
    assert "'heat.splits.train.runs': -1 is less than the minimum of 1" in result.stderr
