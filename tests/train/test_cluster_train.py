"""Cluster family through the shared trainer: learning, resuming, data identity, the
validation carve, evaluation and its JSON, spec checks. Real trainings on small s1 stores
(2,000 train / 2,000 test samples); about 15 s on one core."""

import csv
import json

import numpy as np
import pytest
import torch

from smoe.data.cluster_store import write_cluster_split
from smoe.data.clusters import make_setting
from smoe.errors import InputError
from smoe.models.clusters import ClusterMoE, PatchCNN, build_cluster_model
from smoe.train.checkpoint import load_checkpoint
from smoe.train.cluster_task import (
    carve_validation,
    evaluate_cluster_checkpoint,
    resolve_cluster_spec,
    train_cluster,
    write_json,
)
from smoe.train.loop import TaskTrainer

RESULT_KEYS = {
    "family",
    "setting",
    "model",
    "kind",
    "seed",
    "activation",
    "experts",
    "filters",
    "params",
    "best_epoch",
    "epochs",
    "train_time_s",
    "test_noise",
    "device",
    "precision",
    "metrics",
    "dispatch",
    "store",
    "train_store",
}
METRIC_KEYS = {
    "test_accuracy",
    "train_accuracy",
    "val_accuracy",
    "dispatch_entropy",
    "test_dispatch_entropy",
}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """s1 at 2,000 / 2,000 samples from data seeds 0 and 1."""
    folder = tmp_path_factory.mktemp("cluster_stores")
    setting = make_setting({"setting": "s1", "n_train": 2000, "n_test": 2000})
    return {
        (seed, split): write_cluster_split(setting, seed, split, folder / f"{seed}_{split}.zarr")
        for seed in (0, 1)
        for split in ("train", "test")
    }


def spec(kind="cluster_moe", options=None, name="moe", **train):
    return {"name": name, "kind": kind, "options": options or {}, "train": train}


def read_history(folder):
    with open(folder / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def without_time(rows):
    return [{k: v for k, v in row.items() if k != "time_s"} for row in rows]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def moe_run(stores, tmp_path_factory):
    """The paper's nonlinear MoE with every default (500 epochs, the official early stop)."""
    out = tmp_path_factory.mktemp("moe")
    summary = train_cluster(spec(), stores[0, "train"], 0, out, progress=False)
    return out, summary


def test_nonlinear_moe_learns_the_clusters(moe_run, stores, tmp_path):
    out, summary = moe_run
    result = evaluate_cluster_checkpoint(out / "best.pt", stores[0, "test"], stores[0, "train"])
    metrics = result["metrics"]
    assert metrics["test_accuracy"] >= 95.0, metrics
    assert metrics["dispatch_entropy"] < 0.5, metrics  # each expert keeps (nearly) one cluster
    assert summary["family"] == "clusters" and summary["select_metric"] == "val_accuracy"
    assert summary["train_samples"] == 1800 and summary["val_samples"] == 200
    assert summary["stop_reason"] and summary["epochs"] <= 500
    assert summary["val_metrics"]["val_accuracy"] == metrics["val_accuracy"]  # no test noise
    rows = read_history(out)
    assert len(rows) == summary["epochs"]
    for column in (
        "train_loss",
        "train_accuracy",
        "train_dispatch_entropy",
        "val_accuracy",
        "val_loss",
        "val_dispatch_entropy",
        "lr",
        "router_lr",
    ):
        assert column in rows[0], column
    assert float(rows[0]["router_lr"]) == 0.1 and float(rows[0]["lr"]) == 1e-3
    # Early on the zero router leaves the dispatch to the noise: near ln 4 = 1.386.
    assert float(rows[0]["train_dispatch_entropy"]) > 1.3
    best = max(float(r["val_accuracy"]) for r in rows)
    first_best = next(i for i, r in enumerate(rows) if float(r["val_accuracy"]) == best)
    assert summary["best_epoch"] == first_best  # ties keep the earlier epoch


def test_evaluation_json_has_every_key(moe_run, stores, tmp_path):
    out, summary = moe_run
    result = evaluate_cluster_checkpoint(out / "best.pt", stores[0, "test"], stores[0, "train"])
    assert set(result) == RESULT_KEYS and set(result["metrics"]) == METRIC_KEYS
    assert result["family"] == "clusters" and result["setting"] == "s1"
    assert (result["model"], result["kind"], result["seed"]) == ("moe", "cluster_moe", 0)
    assert result["activation"] == "cubic" and result["experts"] == 8 and result["filters"] == 16
    assert result["params"] == 8 * (16 * 50 + 16) + 50 * 8
    assert result["best_epoch"] == summary["best_epoch"] and result["epochs"] == summary["epochs"]
    assert result["train_time_s"] == pytest.approx(summary["train_time_s"])
    assert result["test_noise"] is False
    assert (result["device"], result["precision"]) == ("cpu", "fp32")
    dispatch = result["dispatch"]
    assert (dispatch["experts"], dispatch["clusters"]) == (8, 4)
    train_counts, test_counts = np.asarray(dispatch["train"]), np.asarray(dispatch["test"])
    assert train_counts.shape == test_counts.shape == (8, 4)
    assert train_counts.sum() == 2000 and test_counts.sum() == 2000  # the whole train store
    assert result["store"] == str(stores[0, "test"])
    assert result["train_store"] == str(stores[0, "train"])
    write_json(result, tmp_path / "eval.json")
    again = evaluate_cluster_checkpoint(out / "best.pt", stores[0, "test"], stores[0, "train"])
    assert json.loads((tmp_path / "eval.json").read_text()) == again  # JSON-able, deterministic


def test_single_cnn_trains(stores, tmp_path):
    options = {"filters_per_class": 40, "activation": "linear"}
    single = spec("cluster_single", options, name="single80", epochs=40, stop_rise=None)
    summary = train_cluster(single, stores[0, "train"], 0, tmp_path, progress=False)
    assert summary["epochs"] == 40 and summary["stop_reason"] == "epochs"
    rows = read_history(tmp_path)
    assert "train_dispatch_entropy" not in rows[0] and "router_lr" not in rows[0]
    assert float(rows[0]["lr"]) == 3e-3  # Adam's default for linear singles
    result = evaluate_cluster_checkpoint(
        tmp_path / "best.pt", stores[0, "test"], stores[0, "train"]
    )
    assert set(result) == RESULT_KEYS and set(result["metrics"]) == METRIC_KEYS
    assert result["dispatch"] is None and result["experts"] is None
    assert result["metrics"]["dispatch_entropy"] is None
    assert result["metrics"]["test_dispatch_entropy"] is None
    assert result["filters"] == 80 and result["params"] == 80 * 51
    assert 60.0 < result["metrics"]["test_accuracy"] < 90.0
    assert result["metrics"]["train_accuracy"] > 60.0


class Interrupted(Exception):
    pass


def test_an_interrupted_run_resumes_exactly(stores, tmp_path, monkeypatch):
    run = spec(epochs=12, stop_loss=None, stop_rise=None, checkpoint_every=4)
    reference = train_cluster(run, stores[0, "train"], 3, tmp_path / "A", progress=False)
    assert load_checkpoint(tmp_path / "A" / "last.pt")["state"]["epoch"] == 12
    validate, calls = TaskTrainer._validate, []

    def interrupt_seventh_validation(self):
        calls.append(1)
        if len(calls) == 7:
            raise Interrupted
        return validate(self)

    with monkeypatch.context() as patch:
        patch.setattr(TaskTrainer, "_validate", interrupt_seventh_validation)
        with pytest.raises(Interrupted):
            train_cluster(run, stores[0, "train"], 3, tmp_path / "B", progress=False)
    saved = load_checkpoint(tmp_path / "B" / "last.pt")["state"]  # saved every 4 epochs
    assert saved["epoch"] == 4 and not (tmp_path / "B" / "train.json").exists()
    summary = train_cluster(run, stores[0, "train"], 3, tmp_path / "B", progress=False)
    assert summary["resumed_from_epoch"] == 4 and summary["fresh_start_reason"] is None
    assert without_time(read_history(tmp_path / "B")) == without_time(read_history(tmp_path / "A"))
    for key in ("epochs", "best_epoch", "best_value", "val_metrics", "stop_reason"):
        assert summary[key] == reference[key], key
    for name in ("best.pt", "last.pt"):
        assert_same_weights(
            load_checkpoint(tmp_path / "B" / name)["model"],
            load_checkpoint(tmp_path / "A" / name)["model"],
        )
    # The router noise is drawn: another model seed trains differently.
    other = train_cluster(run, stores[0, "train"], 4, tmp_path / "C", progress=False)
    assert other["val_metrics"] != reference["val_metrics"]


def test_validation_noise_does_not_touch_the_training_noise(stores, tmp_path):
    """With test_noise the validation routes noisily, from its own generator: the training
    (losses, weights) is the same as without."""
    runs = {}
    for test_noise in (False, True):
        run = spec(options={"test_noise": test_noise}, epochs=8, stop_loss=None, stop_rise=None)
        out = tmp_path / str(test_noise)
        train_cluster(run, stores[0, "train"], 0, out, progress=False)
        runs[test_noise] = out
    losses = [[row["train_loss"] for row in read_history(runs[flag])] for flag in runs]
    assert losses[0] == losses[1]
    assert_same_weights(
        load_checkpoint(runs[False] / "last.pt")["model"],
        load_checkpoint(runs[True] / "last.pt")["model"],
    )
    result = evaluate_cluster_checkpoint(
        runs[True] / "best.pt", stores[0, "test"], stores[0, "train"]
    )
    assert result["test_noise"] is True
    again = evaluate_cluster_checkpoint(
        runs[True] / "best.pt", stores[0, "test"], stores[0, "train"]
    )
    assert again["metrics"] == result["metrics"]  # the noise is seeded


def test_other_data_restart_from_scratch_and_say_why(stores, tmp_path, capsys):
    run = spec(epochs=3, stop_loss=None, stop_rise=None)
    train_cluster(run, stores[0, "train"], 0, tmp_path, progress=False)
    capsys.readouterr()
    summary = train_cluster(run, stores[1, "train"], 0, tmp_path, progress=False)
    assert summary["resumed_from_epoch"] is None and summary["epochs"] == 3
    assert "other data (train." in summary["fresh_start_reason"]
    assert "not resuming" in capsys.readouterr().err
    # Another validation carve is other data too.
    carved = spec(epochs=3, stop_loss=None, stop_rise=None)
    carved["data"] = {"val_fraction": 0.2}
    summary = train_cluster(carved, stores[1, "train"], 0, tmp_path, progress=False)
    assert summary["resumed_from_epoch"] is None
    assert "data.val_fraction: 0.1 -> 0.2" in summary["fresh_start_reason"]
    assert summary["val_samples"] == 400
    # Progress and the checkpoint interval change no result: a run resumes across them.
    carved["train"]["progress"] = False
    carved["train"]["checkpoint_every"] = 1
    summary = train_cluster(carved, stores[1, "train"], 0, tmp_path, progress=False)
    assert summary["resumed_from_epoch"] == 3 and summary["fresh_start_reason"] is None


def test_the_validation_carve_is_the_data_seeds_alone(stores, tmp_path):
    train, val = carve_validation(2000, 0.1, 0)
    assert len(val) == 200 and len(train) == 1800
    assert not set(train) & set(val) and sorted({*train, *val}) == list(range(2000))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    again = carve_validation(2000, 0.1, 0)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    assert not np.array_equal(carve_validation(2000, 0.1, 1)[1], val)
    np.random.seed(123)  # no global state involved
    torch.manual_seed(5)
    assert np.array_equal(carve_validation(2000, 0.1, 0)[1], val)
    assert len(carve_validation(10, 0.01, 0)[1]) == 1  # at least one sample
    # Every model seed of a data set validates on the same samples.
    run = spec(epochs=1, stop_loss=None, stop_rise=None)
    infos = []
    for seed in (0, 1):
        train_cluster(run, stores[0, "train"], seed, tmp_path / str(seed), progress=False)
        infos.append(load_checkpoint(tmp_path / str(seed) / "best.pt")["data"])
    assert infos[0] == infos[1]
    assert infos[0]["data_seed"] == 0 and infos[0]["val_samples"] == 200


def test_evaluation_refuses_stores_of_other_data(moe_run, stores):
    out, _ = moe_run
    best = out / "best.pt"
    with pytest.raises(InputError) as error:
        evaluate_cluster_checkpoint(best, stores[1, "test"], stores[0, "train"])
    message = str(error.value)
    assert str(stores[1, "test"]) in message and str(stores[0, "train"]) in message
    assert "seed 1" in message and "seed 0" in message
    with pytest.raises(InputError, match="not the data the model"):
        evaluate_cluster_checkpoint(best, stores[1, "test"], stores[1, "train"])
    with pytest.raises(InputError, match="not a test split"):
        evaluate_cluster_checkpoint(best, stores[0, "train"], stores[0, "train"])


def test_stop_rules(stores, tmp_path):
    stopped = train_cluster(
        spec(epochs=20, stop_loss=10.0), stores[0, "train"], 0, tmp_path / "a", progress=False
    )
    assert stopped["epochs"] == 1 and "stop_loss" in stopped["stop_reason"]
    full = train_cluster(
        spec(epochs=5, stop_loss=None, stop_rise=None),
        stores[0, "train"],
        0,
        tmp_path / "b",
        progress=False,
    )
    assert full["epochs"] == 5 and full["stop_reason"] == "epochs"


@pytest.mark.parametrize(
    "change, match",
    [
        ({"train": {"momentum": 0.9}}, r"train\.momentum is not a setting"),
        ({"train": {"epochs": 0}}, r"train\.epochs must be a positive integer"),
        ({"train": {"weight_decay": 5e-4}}, r"train\.weight_decay must be null or 0"),
        ({"kind": "cluster_single", "train": {"router_lr": 0.1}}, r"train\.router_lr"),
        ({"train": {"precision": "bf16"}}, r"train\.precision"),
        ({"train": {"checkpoint_every": 0}}, r"train\.checkpoint_every"),
        ({"train": {"select": {"mode": "best"}}}, r"train\.select"),
        ({"data": {"val_fraction": 0.0}}, r"data\.val_fraction"),
        ({"data": {"context": 1}}, r"data\.context is not a setting"),
        ({"options": {"experts": 0}}, r"cluster_moe option experts"),
        ({"options": {"dim": 50}}, r"option 'dim' is not known \(the data give it\)"),
        ({"kind": "cnn"}, r"not a cluster model"),
    ],
)
def test_bad_specs_name_the_key(change, match):
    bad = {**spec(), **change}
    with pytest.raises(InputError, match=match):
        resolve_cluster_spec(bad)


def test_resolved_defaults():
    moe = resolve_cluster_spec(spec())
    assert moe.train["epochs"] == 500 and moe.train["stop_loss"] == 0.314
    assert moe.train["stop_rise"] == 0.02 and moe.train["threads"] == 1
    assert moe.train["select"] == {"metric": "val_accuracy", "mode": "max"}
    assert moe.train["device"] == "cpu" and moe.data == {"val_fraction": 0.1}
    single = resolve_cluster_spec(spec("cluster_single", select={"mode": "max"}))
    assert single.train["epochs"] == 800 and single.train["select"]["metric"] == "val_accuracy"
    assert resolve_cluster_spec(moe) == moe


def test_builder_defaults_singles_to_the_default_init():
    torch.manual_seed(0)
    single = build_cluster_model("cluster_single", {"filters_per_class": 40}, 50)
    torch.manual_seed(0)
    default = PatchCNN(50, 40, init_scale=1.0)
    assert isinstance(single, PatchCNN) and torch.equal(single.weight, default.weight)
    moe = build_cluster_model("cluster_moe", {"experts": 4, "activation": "linear"}, 50)
    assert isinstance(moe, ClusterMoE) and len(moe.experts) == 4
    assert moe.experts[0].weight.abs().max() <= 1e-3 / 50**0.5  # the experts' 1e-3 init
    with pytest.raises(InputError, match="bias must be true or false"):
        build_cluster_model("cluster_single", {"bias": 1}, 50)
    with pytest.raises(InputError, match="classes must be at least 2"):
        build_cluster_model("cluster_single", {"classes": 1}, 50)
