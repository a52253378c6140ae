"""Learning-rate selection on validation: smoe tune-lr and smoe.families.heat.tune on tiny
stores."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from smoe.cli import main
from smoe.families.heat.simulation import HeatParams
from smoe.families.heat.store import simulate_split
from smoe.families.heat.tune import Trial, best_trial, work_dir

PARAMS = HeatParams((0.0025, 0.025, 0.25), steps=8)
CONFIG = {
    "models": {
        "persistence": {"kind": "persistence"},
        # a single bias-free 3x3 stencil: the simplest model whose lr matters
        "stencil": {"kind": "cnn", "options": {"hidden": []}},
        # the same with plain SGD, which a huge learning rate makes diverge
        "sgd": {
            "kind": "cnn",
            "options": {"hidden": [], "batchnorm": False},
            "train": {"optimizer": "sgd", "momentum": 0.0},
        },
    },
    "train": {"epochs": 3, "batch_size": 4, "threads": 1, "early_stop": 0, "stop_at": None},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_mask):
    folder = tmp_path_factory.mktemp("tune")
    stores = {}
    for split, seed, runs in [("train", 11, 6), ("val", 12, 2), ("test", 13, 2)]:
        stores[split] = simulate_split(
            small_mask, PARAMS, seed, runs, folder / f"{split}.zarr", split=split, progress=False
        )
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    return folder, config, stores


def args(setup, out, model="stencil", lrs=("0.001", "0.03", "10.0"), *extra):
    _, config, stores = setup
    return [
        "tune-lr",
        "--config",
        str(config),
        "--model",
        model,
        "--lrs",
        *lrs,
        "--seed",
        "0",
        "--train-store",
        str(stores["train"]),
        "--val-store",
        str(stores["val"]),
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


TUNED_LRS = ("0.001", "0.1", "10.0")


@pytest.fixture(scope="module")
def tuned(setup):
    """tune-lr over 0.001, 0.1 and the hopeless 10.0 with 6 epochs (the config says 3)."""
    folder, _, _ = setup
    out = folder / "lr" / "stencil.csv"
    code = main(args(setup, out, "stencil", TUNED_LRS, "--epochs", "6"))
    return out, code


def test_tune_lr_writes_each_rates_best_validation_value(tuned):
    out, code = tuned
    assert code == 0
    rows = read_csv(out)
    assert [float(r["lr"]) for r in rows] == [0.001, 0.1, 10.0]
    assert list(rows[0]) == [
        "lr",
        "metric",
        "best_value",
        "best_epoch",
        "epochs",
        "stop_reason",
        "train_time_s",
        "folder",
    ]
    runs = work_dir(out)
    assert runs == out.parent / "stencil.runs"
    for row in rows:
        folder = Path(row["folder"])
        assert folder.parent == runs and folder.name == f"lr{float(row['lr'])!r}"
        summary = json.loads((folder / "train.json").read_text())
        # every rate trained with its own lr and the --epochs budget, selected on validation
        best = torch.load(folder / "best.pt", weights_only=True)
        assert best["spec"]["train"]["lr"] == float(row["lr"])
        assert best["spec"]["train"]["epochs"] == 6 and summary["epochs"] == 6
        assert row["metric"] == summary["select_metric"] == "prcntclose1.0"
        assert float(row["best_value"]) == summary["best_value"]
        assert int(row["best_epoch"]) == summary["best_epoch"]
        history = list(csv.DictReader(open(folder / "history.csv")))
        values = [float(h["val_prcntclose1.0"]) for h in history]
        assert float(row["best_value"]) == max(values)


def test_tune_lr_chooses_the_argmax_and_a_hopeless_rate_loses(tuned):
    out, _ = tuned
    rows = read_csv(out)
    values = {float(r["lr"]): float(r["best_value"]) for r in rows}
    chosen = max(values, key=values.get)
    # too small to get anywhere in 6 epochs, right, and steps of 10 on stencil weights of
    # size ~0.3 that leave almost nothing within 1 %
    assert chosen == 0.1
    assert values[0.001] < 5.0 and values[10.0] < 5.0 < 10.0 < values[0.1]


def test_tune_lr_resumes_finished_trainings_instead_of_repeating_them(tuned, setup, capsys):
    out, _ = tuned
    before = read_csv(out)
    histories = {r["folder"]: (Path(r["folder"]) / "history.csv").read_text() for r in before}
    assert main(args(setup, out, "stencil", TUNED_LRS, "--epochs", "6")) == 0
    printed = capsys.readouterr().out.splitlines()
    value = float(before[1]["best_value"])
    assert (
        printed[1] == f"lr 0.1: val prcntclose1.0 = {value:.6g} at epoch {before[1]['best_epoch']}"
    )
    assert printed[-1].startswith(f"best lr for stencil: 0.1 (val prcntclose1.0 = {value:.6g}")
    assert printed[-1].endswith(f"max); wrote {out}")
    assert read_csv(out) == before  # time included: nothing was trained again
    for folder, text in histories.items():
        assert (Path(folder) / "history.csv").read_text() == text


def test_a_diverging_rate_is_recorded_and_cannot_win(setup, tmp_path, capsys):
    out = tmp_path / "sgd.csv"
    assert main(args(setup, out, "sgd", ("1e12", "0.01"))) == 0
    rows = read_csv(out)
    assert math.isnan(float(rows[0]["best_value"])) and rows[0]["best_epoch"] == "-1"
    assert rows[0]["stop_reason"].startswith("diverged: model 'sgd': the loss became non-finite")
    assert float(rows[1]["best_value"]) > 0 and rows[1]["stop_reason"] == "epochs"
    printed = capsys.readouterr().out
    assert "lr 1e+12: val prcntclose1.0 = diverged" in printed
    assert "best lr for sgd: 0.01 " in printed


def test_every_rate_diverging_is_an_error_after_the_table(setup, tmp_path, capsys):
    out = tmp_path / "sgd.csv"
    assert main(args(setup, out, "sgd", ("1e12",))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("smoe tune-lr: error: every learning rate diverged")
    assert "\n" not in err
    assert len(read_csv(out)) == 1  # the table is kept to show what happened


@pytest.mark.parametrize(
    ("lrs", "extra", "model", "message"),
    [
        (("0",), (), "stencil", "learning rate 0.0 must be positive"),
        (("-0.1",), (), "stencil", "learning rate -0.1 must be positive"),
        (("nan",), (), "stencil", "learning rate nan is not a finite number"),
        (("0.1", "0.01", "0.1"), (), "stencil", "learning rate 0.1 is given more than once"),
        (("0.1",), ("--epochs", "0"), "stencil", "epochs must be at least 1, got 0"),
        (("0.1",), (), "nope", "model 'nope' is not defined under 'models'"),
        (("0.1",), (), "persistence", "'persistence' has no trainable parameters"),
    ],
)
def test_bad_input_is_one_error_line(setup, tmp_path, capsys, lrs, extra, model, message):
    out = tmp_path / "out.csv"
    assert main(args(setup, out, model, lrs, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("smoe tune-lr: error: ") and message in err and "\n" not in err
    assert not out.exists()


def test_bad_paths_are_named(setup, tmp_path, capsys):
    assert main(args(setup, tmp_path / "out.txt", "stencil", ("0.1",))) == 2
    assert "output" in capsys.readouterr().err and not (tmp_path / "out.txt").exists()
    command = args(setup, tmp_path / "out.csv", "stencil", ("0.1",))
    missing = tmp_path / "nowhere" / "val.zarr"
    command[command.index("--val-store") + 1] = str(missing)
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.startswith("smoe tune-lr: error: ") and str(missing) in err


def test_unparsable_rate_is_a_usage_error(setup, tmp_path):
    command = args(setup, tmp_path / "out.csv", "stencil", ("fast",))
    result = subprocess.run(
        [sys.executable, "-m", "smoe", *command], capture_output=True, text=True
    )
    assert result.returncode == 2 and "--lrs: invalid float value: 'fast'" in result.stderr
    help_text = subprocess.run(
        [sys.executable, "-m", "smoe", "tune-lr", "--help"], capture_output=True, text=True
    )
    assert help_text.returncode == 0 and "usage: smoe tune-lr" in help_text.stdout


def test_ties_go_to_the_first_rate_and_min_mode_is_respected():
    def trial(lr, value):
        return Trial(lr, "m", value, 0, 1, "epochs", 0.0, Path("."))

    trials = [trial(0.1, 5.0), trial(0.01, 7.0), trial(0.001, 7.0), trial(1.0, math.nan)]
    assert best_trial(trials, "max").lr == 0.01
    assert best_trial(trials, "min").lr == 0.1
