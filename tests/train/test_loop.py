"""Training: artefacts, model selection, determinism, stopping rules, resuming, errors."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from smoe.config import validate_config
from smoe.core.errors import InputError
from smoe.core.train.loop import TrainingError
from smoe.families.heat.config import model_spec
from smoe.families.heat.simulation import HeatParams
from smoe.families.heat.store import open_store, simulate_split
from smoe.families.heat.task import Trainer, train

PARAMS = HeatParams((0.0025, 0.025, 0.25), steps=8)
PAPER_SMOE = {
    "gate": "latent",
    "experts": 3,
    "k": 1,
    "rc_loss": True,
    "damping": True,
    "quantile": 0.3,
}
# A linear convolution trained with plain SGD at a learning rate past its stability limit:
# the validation error grows every epoch but stays finite for a few epochs.
DIVERGING = dict(
    kind="cnn",
    options={"hidden": [], "batchnorm": False, "bias": True},
    optimizer="sgd",
    lr=2.0,
    momentum=0.0,
    select={"metric": "mse", "mode": "min"},
)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, small_mask):
    folder = tmp_path_factory.mktemp("stores")
    paths = {}
    for split, seed, runs in [("train", 11, 6), ("val", 12, 2)]:
        paths[split] = simulate_split(
            small_mask, PARAMS, seed, runs, folder / f"{split}.zarr", split=split, progress=False
        )
    return paths


def make_spec(kind="cnn", options=None, name="model", **train_settings):
    """A validated spec; a tiny default training that only stops when its epochs run out."""
    settings = {"epochs": 3, "batch_size": 8, "threads": 1, "early_stop": 0, "stop_at": None}
    config = validate_config(
        {
            "models": {name: {"kind": kind, "options": options or {}}},
            "train": {**settings, **train_settings},
        }
    )
    return model_spec(config, name)


def cnn_spec(**train_settings):
    return make_spec("cnn", {"hidden": [2]}, name="cnn", **train_settings)


def smoe_spec(**train_settings):
    return make_spec("smoe", dict(PAPER_SMOE), name="smoe", **train_settings)


def run(spec, stores, out, seed=0):
    return train(spec, stores["train"], stores["val"], seed, out, progress=False)


def read_history(folder):
    with open(folder / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def without_time(rows):
    return [{k: v for k, v in row.items() if k != "time_s"} for row in rows]


def load(path):
    return torch.load(path, weights_only=False)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def trained(stores, tmp_path_factory):
    """cnn and paper-style smoe, 3 epochs each, seed 0."""
    out = {}
    for name, spec in [("cnn", cnn_spec()), ("smoe", smoe_spec())]:
        folder = tmp_path_factory.mktemp(name)
        out[name] = (spec, folder, run(spec, stores, folder))
    return out


@pytest.mark.parametrize("name", ["cnn", "smoe"])
def test_training_writes_every_artefact(trained, name):
    spec, folder, summary = trained[name]
    assert {p.name for p in folder.iterdir()} == {
        "best.pt",
        "last.pt",
        "history.csv",
        "train.json",
    }
    rows = read_history(folder)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    required = {
        "epoch",
        "train_loss",
        "train_aux",
        "train_rc",
        "train_misrouted",
        "val_mse",
        "val_mae",
        "val_rmse",
        "val_nrmse",
        "val_vrmse",
        "val_prcntclose1.0",
        "val_prcntclose1.0s",
        "lr",
        "time_s",
    }
    assert required <= set(rows[0])
    assert not any("-" in column for column in rows[0])  # per-region metrics stay out
    rc = [float(r["train_rc"]) for r in rows]
    if name == "smoe":
        assert all(value > 0 for value in rc)  # the RC loss is on and reported
        assert all(0 <= float(r["train_misrouted"]) <= 1 for r in rows)
    else:
        assert rc == [0.0, 0.0, 0.0]
    assert all(float(r["lr"]) == 0.001 for r in rows)
    times = [float(r["time_s"]) for r in rows]
    assert times == sorted(times) and times[0] > 0

    on_disk = json.loads((folder / "train.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["model"] == name and on_disk["kind"] == spec.kind
    assert on_disk["seed"] == 0 and on_disk["epochs"] == 3 and on_disk["stop_reason"] == "epochs"
    assert on_disk["params"] > 0 and on_disk["select_metric"] == "prcntclose1.0"

    # The best epoch is the argmax of the selection metric (the first one on ties).
    selection = [float(r["val_prcntclose1.0"]) for r in rows]
    best = int(np.argmax(selection))
    assert on_disk["best_epoch"] == best
    assert on_disk["best_value"] == selection[best] == on_disk["val_metrics"]["prcntclose1.0"]
    for key, value in rows[best].items():
        if key.startswith("val_"):
            assert on_disk["val_metrics"][key[4:]] == float(value), key

    best_pt, last_pt = load(folder / "best.pt"), load(folder / "last.pt")
    assert best_pt["epoch"] == best and best_pt["val_metrics"] == on_disk["val_metrics"]
    # the spec the run is identified by: all of it but the number of processes
    identity = {
        **spec.to_dict(),
        "train": {k: v for k, v in spec.train.items() if k != "processes"},
    }
    assert best_pt["spec"] == identity and best_pt["seed"] == 0
    assert last_pt["state"]["epoch"] == 3 and last_pt["state"]["best_epoch"] == best
    assert_same_weights(last_pt["state"]["best_model"], best_pt["model"])


@pytest.mark.parametrize("name", ["cnn", "smoe"])
def test_same_seed_same_run_other_seed_other_run(trained, stores, tmp_path, name):
    spec, folder, _ = trained[name]
    run(spec, stores, tmp_path / "again", seed=0)
    assert without_time(read_history(tmp_path / "again")) == without_time(read_history(folder))
    assert_same_weights(
        load(tmp_path / "again" / "best.pt")["model"], load(folder / "best.pt")["model"]
    )
    run(spec, stores, tmp_path / "other", seed=1)
    assert without_time(read_history(tmp_path / "other")) != without_time(read_history(folder))
    other = load(tmp_path / "other" / "last.pt")["model"]
    same = load(folder / "last.pt")["model"]
    assert any(not torch.equal(other[k], same[k]) for k in same)


def test_persistence_is_validated_once(stores, tmp_path):
    summary = run(make_spec("persistence", name="persistence"), stores, tmp_path)
    assert summary["stop_reason"] == "no trainable parameters"
    assert summary["params"] == 0 and summary["epochs"] == 1 and summary["best_epoch"] == 0
    assert (
        json.loads((tmp_path / "train.json").read_text())["stop_reason"] == summary["stop_reason"]
    )
    assert len(read_history(tmp_path)) == 1
    # Direct computation on the validation store: predict u(t+1) = u(t).
    u = open_store(stores["val"])["u"].values.astype(np.float64)
    x, y = u[:, :-1], u[:, 1:]
    close = 100 * np.mean(np.abs(x - y) <= 1e-8 + 0.01 * np.abs(y))
    assert 1 < close < 99
    assert summary["val_metrics"]["prcntclose1.0"] == pytest.approx(close, rel=1e-12)
    assert summary["best_value"] == summary["val_metrics"]["prcntclose1.0"]
    assert summary["val_metrics"]["mse"] == pytest.approx(np.mean((x - y) ** 2), rel=1e-9)
    assert load(tmp_path / "best.pt")["val_metrics"] == summary["val_metrics"]


def test_stop_at_ends_training_once_the_target_is_reached(stores, tmp_path):
    spec = cnn_spec(epochs=5, stop_at=0, select={"metric": "prcntclose1.0", "mode": "max"})
    summary = run(spec, stores, tmp_path)
    assert summary["epochs"] == 1 and len(read_history(tmp_path)) == 1
    assert "reached" in summary["stop_reason"] and "prcntclose1.0" in summary["stop_reason"]
    assert load(tmp_path / "last.pt")["state"]["epoch"] == 1


def test_early_stop_after_epochs_without_improvement(stores, tmp_path):
    options = {k: v for k, v in DIVERGING.items() if k not in ("kind", "options")}
    spec = make_spec(DIVERGING["kind"], DIVERGING["options"], epochs=6, early_stop=2, **options)
    summary = run(spec, stores, tmp_path)
    val_mse = [float(r["val_mse"]) for r in read_history(tmp_path)]
    assert len(val_mse) == 3 and summary["epochs"] == 3
    assert val_mse[0] < val_mse[1] < val_mse[2] < float("inf")  # worse every epoch
    assert summary["best_epoch"] == 0
    assert summary["stop_reason"] == "no improvement for 2 epochs"


def test_changed_spec_restarts_instead_of_resuming(stores, tmp_path):
    spec4 = smoe_spec(epochs=4)
    run(spec4, stores, tmp_path / "A")
    run(smoe_spec(epochs=2), stores, tmp_path / "B")
    first = read_history(tmp_path / "B")
    assert len(first) == 2
    summary = run(spec4, stores, tmp_path / "B")
    again = read_history(tmp_path / "B")
    assert summary["epochs"] == 4
    assert without_time(again) == without_time(read_history(tmp_path / "A"))
    # A resumed run keeps the rows (and timings) of the epochs it did not redo.
    assert [r["time_s"] for r in again[:2]] != [r["time_s"] for r in first]
    assert_same_weights(
        load(tmp_path / "B" / "best.pt")["model"], load(tmp_path / "A" / "best.pt")["model"]
    )
    assert_same_weights(
        load(tmp_path / "B" / "last.pt")["model"], load(tmp_path / "A" / "last.pt")["model"]
    )


def test_changed_data_restarts_instead_of_resuming(stores, tmp_path, small_mask, capsys):
    """A finished last.pt of the same spec and seed is not reused on other data: the run
    equals a clean run on the new data, and the log and train.json say why."""
    other = {}
    for split, seed, runs in [("train", 11, 7), ("val", 12, 2)]:  # one more train run
        other[split] = simulate_split(
            small_mask,
            PARAMS,
            seed,
            runs,
            tmp_path / f"{split}.zarr",
            split=split,
            progress=False,
        )
    spec = cnn_spec(epochs=2)
    run(spec, stores, tmp_path / "reused")
    capsys.readouterr()
    summary = run(spec, other, tmp_path / "reused")
    log = capsys.readouterr().err
    assert "not resuming" in log and "other data" in log and "runs: 6 -> 7" in log
    assert "train.generator.runs: 6 -> 7" in summary["fresh_start_reason"]
    assert summary["resumed_from_epoch"] is None
    clean = run(spec, other, tmp_path / "clean")
    assert without_time(read_history(tmp_path / "reused")) == without_time(
        read_history(tmp_path / "clean")
    )
    assert summary["val_metrics"] == clean["val_metrics"]
    assert_same_weights(
        load(tmp_path / "reused" / "best.pt")["model"],
        load(tmp_path / "clean" / "best.pt")["model"],
    )


def test_unreadable_last_checkpoint_is_reported_and_training_starts_over(stores, tmp_path, capsys):
    spec = cnn_spec(epochs=2)
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    summary = run(spec, stores, tmp_path)
    log = capsys.readouterr().err
    assert "not resuming" in log and "last.pt" in log and "training from scratch" in log
    assert summary["epochs"] == 2 and summary["resumed_from_epoch"] is None
    assert "last.pt" in summary["fresh_start_reason"]
    resumed = run(cnn_spec(epochs=3), stores, tmp_path)  # another spec: starts over too
    assert "another model spec (train.epochs: 2 -> 3)" in resumed["fresh_start_reason"]


class Interrupted(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_result(stores, tmp_path, monkeypatch):
    spec = smoe_spec(epochs=4)
    reference = run(spec, stores, tmp_path / "A")

    validate = Trainer._validate
    calls = []

    def interrupt_third_validation(self):
        calls.append(1)
        if len(calls) == 3:
            raise Interrupted
        return validate(self)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_validate", interrupt_third_validation)
        with pytest.raises(Interrupted):
            run(spec, stores, tmp_path / "B")
    saved = load(tmp_path / "B" / "last.pt")["state"]
    assert saved["epoch"] == 2 and not (tmp_path / "B" / "train.json").exists()

    summary = run(spec, stores, tmp_path / "B")
    rows = read_history(tmp_path / "B")
    assert [float(r["time_s"]) for r in rows[:2]] == [row["time_s"] for row in saved["history"]]
    assert without_time(rows) == without_time(read_history(tmp_path / "A"))
    for key in ("epochs", "best_epoch", "best_value", "val_metrics", "stop_reason"):
        assert summary[key] == reference[key], key
    assert_same_weights(
        load(tmp_path / "B" / "best.pt")["model"], load(tmp_path / "A" / "best.pt")["model"]
    )
    assert_same_weights(
        load(tmp_path / "B" / "last.pt")["model"], load(tmp_path / "A" / "last.pt")["model"]
    )


def _train_command(spec, stores, out):
    return [
        sys.executable,
        "-m",
        "smoe",
        "train",
        "--spec",
        spec.to_json(),
        "--train-store",
        str(stores["train"]),
        "--val-store",
        str(stores["val"]),
        "--seed",
        "3",
        "--out",
        str(out),
        "--no-progress",
    ]


@pytest.mark.slow
def test_killed_training_resumes_to_the_uninterrupted_result(stores, tmp_path):
    spec = smoe_spec(epochs=20, batch_size=4)
    out = tmp_path / "B"
    last = out / "last.pt"
    process = subprocess.Popen(_train_command(spec, stores, out))
    try:
        seen = set()
        deadline = time.monotonic() + 120
        while len(seen) < 3:  # last.pt written, then rewritten twice: mid-training
            assert process.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline
            try:
                seen.add(last.stat().st_mtime_ns)
            except FileNotFoundError:
                pass
            time.sleep(0.002)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "train.json").exists()
    killed = load(last)["state"]
    assert 3 <= killed["epoch"] < 20

    subprocess.run(_train_command(spec, stores, out), check=True, capture_output=True)
    resumed = json.loads((out / "train.json").read_text())
    rows = read_history(out)
    assert len(rows) == 20
    done = killed["epoch"]
    assert [float(r["time_s"]) for r in rows[:done]] == [r["time_s"] for r in killed["history"]]

    reference = run(spec, stores, tmp_path / "A", seed=3)
    assert resumed["epochs"] == 20
    assert resumed["best_epoch"] == reference["best_epoch"]
    assert resumed["val_metrics"] == reference["val_metrics"]
    assert without_time(rows) == without_time(read_history(tmp_path / "A"))
    assert_same_weights(load(out / "best.pt")["model"], load(tmp_path / "A" / "best.pt")["model"])


def test_diverging_loss_names_epoch_and_step(stores, tmp_path):
    spec = cnn_spec(optimizer="sgd", lr=1e12)
    with pytest.raises(TrainingError, match=r"'cnn'.*non-finite.*epoch 0, step [1-9]\d*"):
        run(spec, stores, tmp_path)
    assert issubclass(TrainingError, InputError)


def test_missing_validation_store_is_named(stores, tmp_path):
    missing = tmp_path / "nowhere" / "val.zarr"
    with pytest.raises(InputError, match=f"{missing}.*does not exist"):
        train(cnn_spec(), stores["train"], missing, 0, tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"kind": "transformer"}, r"'models\.m\.kind': unknown model kind 'transformer'"),
        (
            {"kind": "smoe", "options": {"gate": "bogus"}},
            r"'models\.m\.options\.gate': unknown gate 'bogus'",
        ),
        (
            {"kind": "smoe", "options": {"experts": 2, "k": 3}},
            r"'models\.m\.options'.*k=3.*experts=2",
        ),
    ],
)
def test_bad_model_config_is_named(model, message):
    with pytest.raises(InputError, match=message):
        validate_config({"models": {"m": model}})


def test_selection_metric_must_be_computed(stores, tmp_path):
    """Refused when the config is validated, before any job; and by the trainer too for a
    spec that bypassed validation."""
    with pytest.raises(InputError, match=r"'train.select.metric': 'prcntclose7\.0' is not"):
        cnn_spec(epochs=1, select={"metric": "prcntclose7.0", "mode": "max"})
    spec = cnn_spec(epochs=1)
    spec.train["select"]["metric"] = "prcntclose7.0"
    with pytest.raises(InputError, match=r"'prcntclose7\.0'.*available:.*prcntclose1\.0"):
        run(spec, stores, tmp_path)
    assert not (tmp_path / "best.pt").exists()


def test_selection_metric_must_be_computed_for_persistence(stores, tmp_path):
    spec = make_spec("persistence", name="persistence")
    spec.train["select"]["metric"] = "prcntclose7.0"
    with pytest.raises(InputError, match=r"'prcntclose7\.0'.*available:"):
        run(spec, stores, tmp_path)


def test_gate_gets_its_own_learning_rate(stores, tmp_path):
    trainer = Trainer(
        smoe_spec(epochs=1, gate_lr=0.05), stores["train"], stores["val"], 0, tmp_path, False
    )
    groups = trainer.optimizer.param_groups
    assert len(groups) == 2
    gate = [g for g in groups if g.get("name") == "gate"]
    assert len(gate) == 1 and gate[0]["lr"] == 0.05
    assert [g["lr"] for g in groups if g.get("name") != "gate"] == [0.001]
    gate_params = {id(p) for n, p in trainer.model.named_parameters() if ".gate." in f".{n}"}
    assert gate_params and {id(p) for p in gate[0]["params"]} == gate_params
    trainer.run()
    row = read_history(tmp_path)[0]
    assert float(row["gate_lr"]) == 0.05 and float(row["lr"]) == 0.001

    plain = Trainer(smoe_spec(epochs=1), stores["train"], stores["val"], 0, tmp_path / "p", False)
    assert len(plain.optimizer.param_groups) == 1
    no_gate = Trainer(
        cnn_spec(gate_lr=0.05), stores["train"], stores["val"], 0, tmp_path / "c", False
    )
    assert len(no_gate.optimizer.param_groups) == 1
