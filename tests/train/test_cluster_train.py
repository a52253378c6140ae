"""Cluster family through the shared trainer: learning, each kind's official recipe and early
stop, the published dispatch entropy, the router-noise stream, resuming, data identity, the
validation carve, evaluation and its JSON, spec checks. Real trainings on small s1 stores
(2,000 train / 2,000 test samples); about 25 s on one core."""

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from smoe.core.errors import InputError
from smoe.core.train.checkpoint import load_checkpoint, stream_seed
from smoe.core.train.loop import INTERRUPT_ENV, TaskTrainer
from smoe.families.clusters.data import make_setting
from smoe.families.clusters.metrics import dispatch_entropy
from smoe.families.clusters.models import ClusterMoE, PatchCNN, build_cluster_model
from smoe.families.clusters.store import open_cluster_split, write_cluster_split
from smoe.families.clusters.task import (
    carve_validation,
    evaluate_cluster_checkpoint,
    official_stop,
    resolve_cluster_spec,
    train_cluster,
    write_json,
)

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
    "stop_reason",
    "train_samples",
    "val_samples",
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
    "dispatch_entropy_eval",
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
    """The paper's nonlinear MoE with every default (501 epochs, the official early stop)."""
    out = tmp_path_factory.mktemp("moe")
    summary = train_cluster(spec(), stores[0, "train"], 0, out, progress=False)
    return out, summary


def test_nonlinear_moe_learns_the_clusters(moe_run, stores, tmp_path):
    out, summary = moe_run
    result = evaluate_cluster_checkpoint(out / "best.pt", stores[0, "test"], stores[0, "train"])
    metrics = result["metrics"]
    assert metrics["test_accuracy"] >= 95.0, metrics
    assert metrics["dispatch_entropy"] < 0.5, metrics  # each expert keeps (nearly) one cluster
    assert metrics["dispatch_entropy_eval"] < 0.5, metrics
    assert summary["family"] == "clusters" and summary["select_metric"] == "val_accuracy"
    assert summary["train_samples"] == 1800 and summary["val_samples"] == 200
    assert summary["stop_reason"] and summary["epochs"] <= 501
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
    assert (result["train_samples"], result["val_samples"]) == (1800, 200)
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
    single = spec("cluster_single", options, name="single80", epochs=40)
    summary = train_cluster(single, stores[0, "train"], 0, tmp_path, progress=False)
    assert summary["epochs"] == 40 and summary["stop_reason"] == "epochs"
    rows = read_history(tmp_path)
    assert "train_dispatch_entropy" not in rows[0] and "router_lr" not in rows[0]
    assert float(rows[0]["lr"]) == 3e-3  # Adam's default for linear singles
    adam = load_checkpoint(tmp_path / "last.pt")["optimizer"]
    assert adam["param_groups"][0]["weight_decay"] == 5e-4
    assert all("exp_avg" in state for state in adam["state"].values())
    result = evaluate_cluster_checkpoint(
        tmp_path / "best.pt", stores[0, "test"], stores[0, "train"]
    )
    assert set(result) == RESULT_KEYS and set(result["metrics"]) == METRIC_KEYS
    assert result["dispatch"] is None and result["experts"] is None
    assert result["metrics"]["dispatch_entropy"] is None
    assert result["metrics"]["dispatch_entropy_eval"] is None
    assert result["metrics"]["test_dispatch_entropy"] is None
    assert result["filters"] == 80 and result["params"] == 80 * 51
    assert 60.0 < result["metrics"]["test_accuracy"] < 90.0
    assert result["metrics"]["train_accuracy"] > 60.0


class Interrupted(Exception):
    pass


def test_an_interrupted_run_resumes_exactly(stores, tmp_path, monkeypatch):
    run = spec(epochs=12, stop_on_loss=False, checkpoint_every=4)
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
    saved = load_checkpoint(tmp_path / "B" / "last.pt")  # saved every 4 epochs
    assert saved["state"]["epoch"] == 4 and not (tmp_path / "B" / "train.json").exists()
    assert "router_noise" in saved["streams"]  # the noise stream goes on where it stopped
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


def test_a_run_interrupted_before_its_official_stop_resumes_to_it(stores, tmp_path, monkeypatch):
    """stop_loss 10 stops the MoE at its first loss that is not a new minimum (epoch 19 on
    these data); killed after epoch 8, the run resumes and stops where the uninterrupted one
    did, with the same history, weights and published dispatch entropy."""
    run = spec(epochs=60, stop_loss=10.0, checkpoint_every=4)
    reference = train_cluster(run, stores[0, "train"], 0, tmp_path / "A", progress=False)
    assert 8 < reference["epochs"] < 60 and "stop_loss" in reference["stop_reason"]
    monkeypatch.setenv(INTERRUPT_ENV, "8")
    with pytest.raises(KeyboardInterrupt):
        train_cluster(run, stores[0, "train"], 0, tmp_path / "B", progress=False)
    monkeypatch.delenv(INTERRUPT_ENV)
    summary = train_cluster(run, stores[0, "train"], 0, tmp_path / "B", progress=False)
    assert summary["resumed_from_epoch"] == 8
    assert without_time(read_history(tmp_path / "B")) == without_time(read_history(tmp_path / "A"))
    for key in ("epochs", "best_epoch", "best_value", "val_metrics", "stop_reason"):
        assert summary[key] == reference[key], key
    best = [load_checkpoint(tmp_path / name / "best.pt") for name in "AB"]
    assert (
        best[0]["last_row"]["train_dispatch_entropy"]
        == (best[1]["last_row"]["train_dispatch_entropy"])
    )
    for name in ("best.pt", "last.pt"):
        assert_same_weights(
            load_checkpoint(tmp_path / "B" / name)["model"],
            load_checkpoint(tmp_path / "A" / name)["model"],
        )


def test_validation_noise_does_not_touch_the_training_noise(stores, tmp_path):
    """With test_noise the validation routes noisily, from its own generator: the training
    (losses, weights) is the same as without."""
    runs = {}
    for test_noise in (False, True):
        run = spec(options={"test_noise": test_noise}, epochs=8, stop_on_loss=False)
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
    run = spec(epochs=3, stop_on_loss=False)
    train_cluster(run, stores[0, "train"], 0, tmp_path, progress=False)
    capsys.readouterr()
    summary = train_cluster(run, stores[1, "train"], 0, tmp_path, progress=False)
    assert summary["resumed_from_epoch"] is None and summary["epochs"] == 3
    assert "other data (train." in summary["fresh_start_reason"]
    assert "not resuming" in capsys.readouterr().err
    # Another validation carve is other data too.
    carved = spec(epochs=3, stop_on_loss=False)
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
    run = spec(epochs=1, stop_on_loss=False)
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


# -- the official early stop ------------------------------------------------------------

MOE_STOP = {"stop_loss": 0.314, "stop_rise": 0.02, "stop_from": 0}
SINGLE_STOP = {"stop_loss": None, "stop_rise": 0.02, "stop_from": 501}


def first_stop(losses, **rule):
    """The first epoch at which the rule stops on this loss history (None: never)."""
    return next((e for e in range(len(losses)) if official_stop(losses[: e + 1], **rule)), None)


def test_the_moes_official_stop_on_crafted_losses():
    # A new minimum never stops, even below the 0.314 floor.
    assert official_stop([0.7, 0.5, 0.3135], **MOE_STOP) == ""
    assert official_stop([0.7, 0.5, 0.2], **MOE_STOP) == ""
    # Not a new minimum and <= 0.314: stops.
    assert "stop_loss" in official_stop([0.7, 0.31, 0.312], **MOE_STOP)
    # A tie is a new minimum (the official `loss <= min_loss`): goes on.
    assert official_stop([0.7, 0.31, 0.31], **MOE_STOP) == ""
    # A rise of more than 0.02 above the minimum stops; one of 0.015 does not.
    assert "stop_rise" in official_stop([0.7, 0.5, 0.53], **MOE_STOP)
    assert official_stop([0.7, 0.5, 0.515], **MOE_STOP) == ""
    # The first epoch never stops; the rule may stop from epoch 1.
    assert official_stop([0.2], **MOE_STOP) == ""
    assert first_stop([0.9, 0.95], **MOE_STOP) == 1
    # Thresholds as the official float32 comparisons: the float32 of 0.314 is above 0.314.
    float32_floor = float(np.float32(0.314))
    assert float32_floor > 0.314
    assert official_stop([0.30, float32_floor], **MOE_STOP)
    # Either test alone can be switched off.
    assert official_stop([0.7, 0.31, 0.312], **{**MOE_STOP, "stop_loss": None}) == ""
    assert official_stop([0.7, 0.5, 0.53], **{**MOE_STOP, "stop_rise": None}) == ""


def test_the_singles_official_stop_on_crafted_losses():
    """Losses that rise by 0.1 at epoch 10 (the MoE's rule stops there) and below the MoE's
    floor later: the singles' rule waits for epoch 501 and ignores the floor."""
    losses = [1.0] + [0.5] * 9 + [0.6] + [0.3] * 480 + [0.31] * 20  # epochs 0..510
    assert first_stop(losses, **MOE_STOP) == 10
    assert first_stop(losses, **SINGLE_STOP) is None  # 0.31 <= 0.3 + 0.02 and no floor
    rising = losses[:501] + [0.315, 0.319, 0.33]  # epochs 501..: rises of 0.015, 0.019, 0.03
    assert first_stop(rising, **SINGLE_STOP) == 503  # the first epoch > 500 above min + 0.02
    assert first_stop(rising[:502], **{**SINGLE_STOP, "stop_loss": 0.314}) is None  # 0.315
    early = [1.0, 2.0] + [0.9] * 500 + [2.0]  # a rise at epoch 1, another at epoch 502
    assert first_stop(early, **SINGLE_STOP) == 502
    assert first_stop(early[:501], **SINGLE_STOP) is None
    assert first_stop(early, **{**SINGLE_STOP, "stop_from": 0}) == 1


def test_the_moes_stopping_epoch_takes_no_step(stores, tmp_path):
    """stop_loss 10 stops at the first epoch whose loss is not a new minimum: its history row
    is written, its step is not taken (the weights are those of a run of one epoch less),
    and every epoch before it was a new minimum."""
    stopped = train_cluster(
        spec(epochs=60, stop_loss=10.0), stores[0, "train"], 0, tmp_path / "a", progress=False
    )
    rows = read_history(tmp_path / "a")
    last = stopped["epochs"] - 1
    assert 1 <= last < 59 and len(rows) == last + 1
    assert "stop_loss 10.0" in stopped["stop_reason"] and f"epoch {last}" in stopped["stop_reason"]
    losses = [float(row["train_loss"]) for row in rows]
    assert all(losses[e] <= min(losses[:e]) for e in range(1, last))
    assert losses[last] > min(losses[:last])
    shorter = train_cluster(
        spec(epochs=last, stop_on_loss=False), stores[0, "train"], 0, tmp_path / "b", False
    )
    assert shorter["stop_reason"] == "epochs"
    assert without_time(read_history(tmp_path / "b")) == without_time(rows[:last])
    assert_same_weights(
        load_checkpoint(tmp_path / "a" / "last.pt")["model"],
        load_checkpoint(tmp_path / "b" / "last.pt")["model"],
    )
    # The stopping row's validation is of the unmoved weights: the epoch before's again.
    assert rows[last]["val_accuracy"] == rows[last - 1]["val_accuracy"]
    assert rows[last]["val_loss"] == rows[last - 1]["val_loss"]
    # Off, the same run trains every epoch.
    full = train_cluster(
        spec(epochs=5, stop_on_loss=False), stores[0, "train"], 0, tmp_path / "c", False
    )
    assert full["epochs"] == 5 and full["stop_reason"] == "epochs"


def test_the_single_recipe(stores, tmp_path):
    """A cubic single: Adam at 1e-2 with weight decay 5e-4 on the plain cross-entropy of its
    logits (so the loss goes below the MoE loss's 0.313 floor, and validation reports the same
    loss); its loss rises by far more than 0.02 at epoch 1, but its early stop waits for
    epoch 501."""
    options = {"filters_per_class": 40, "activation": "cubic"}
    run = spec("cluster_single", options, name="single", epochs=150)
    summary = train_cluster(run, stores[0, "train"], 0, tmp_path, progress=False)
    assert summary["epochs"] == 150 and summary["stop_reason"] == "epochs"
    rows = read_history(tmp_path)
    losses = [float(row["train_loss"]) for row in rows]
    assert losses[1] > losses[0] + 0.02  # what would stop the MoE's rule at epoch 1
    assert first_stop(losses, **{**SINGLE_STOP, "stop_from": 0}) == 1
    assert min(losses) < 0.313
    assert float(rows[0]["lr"]) == 1e-2
    adam = load_checkpoint(tmp_path / "last.pt")["optimizer"]
    assert adam["param_groups"][0]["weight_decay"] == 5e-4
    # The validation loss is the same plain cross-entropy, of the kept weights.
    best = load_checkpoint(tmp_path / "best.pt")
    model = build_cluster_model("cluster_single", options, 50)
    model.load_state_dict(best["model"])
    data = open_cluster_split(stores[0, "train"])
    _, val = carve_validation(len(data), 0.1, data.seed)
    with torch.no_grad():
        logits = model(torch.from_numpy(data.x[val]))
    plain = float(F.cross_entropy(logits, torch.from_numpy(data.label[val])))
    assert best["val_metrics"]["val_loss"] == pytest.approx(plain, rel=1e-6)
    # stop_from moves the first epoch that may stop: here the rule's first rise from 20 on.
    early = spec("cluster_single", options, name="single", epochs=150, stop_from=20)
    stopped = train_cluster(early, stores[0, "train"], 0, tmp_path / "early", progress=False)
    expected = next(e for e in range(20, 150) if losses[e] > min(losses[:e]) + 0.02)
    assert stopped["epochs"] == expected + 1, stopped["stop_reason"]


# -- dispatch entropy and the router-noise stream ------------------------------------------


def test_the_published_dispatch_entropy_is_the_last_training_pass(moe_run, stores):
    out, summary = moe_run
    rows = read_history(out)
    best = load_checkpoint(out / "best.pt")
    assert best["last_row"]["epoch"] == summary["epochs"] - 1 == int(rows[-1]["epoch"])
    result = evaluate_cluster_checkpoint(out / "best.pt", stores[0, "test"], stores[0, "train"])
    metrics = result["metrics"]
    assert metrics["dispatch_entropy"] == float(rows[-1]["train_dispatch_entropy"])
    assert metrics["dispatch_entropy"] == best["last_row"]["train_dispatch_entropy"]
    assert result["stop_reason"] == summary["stop_reason"]
    # Beside it, the kept checkpoint's noise-free routing of the whole train store.
    counts = np.asarray(result["dispatch"]["train"])
    assert metrics["dispatch_entropy_eval"] == pytest.approx(dispatch_entropy(counts))


def test_the_router_noise_has_its_own_stream(stores, tmp_path, monkeypatch):
    """The training noise is not the numbers torch.manual_seed(seed) gives (those drew the
    initial weights) but those of the run's "router_noise" stream, saved in last.pt."""
    draws = []
    noise = ClusterMoE._noise

    def record(self, like):
        drawn = noise(self, like)
        draws.append(drawn.clone())
        return drawn

    monkeypatch.setattr(ClusterMoE, "_noise", record)
    seed = 7
    train_cluster(spec(epochs=2, stop_on_loss=False), stores[0, "train"], seed, tmp_path, False)
    first = draws[0]
    assert first.shape == (1800, 8)
    init_stream = torch.rand(first.shape, generator=torch.Generator().manual_seed(seed))
    assert not torch.equal(first, init_stream)
    torch.manual_seed(seed)
    assert not torch.equal(first, torch.rand(first.shape))
    own = torch.Generator().manual_seed(stream_seed(seed, "router_noise"))
    assert torch.equal(first, torch.rand(first.shape, generator=own))
    assert torch.equal(draws[1], torch.rand(first.shape, generator=own))  # one stream, continued
    streams = load_checkpoint(tmp_path / "last.pt")["streams"]
    assert set(streams) == {"router_noise"} and streams["router_noise"]["device"] == "cpu"
    assert torch.equal(streams["router_noise"]["state"], own.get_state())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_moe_trains_and_evaluates_on_cuda_with_noise_on_the_device(stores, tmp_path):
    run = spec(options={"test_noise": True}, epochs=3, device="cuda", stop_on_loss=False)
    train_cluster(run, stores[0, "train"], 0, tmp_path, progress=False)
    streams = load_checkpoint(tmp_path / "last.pt")["streams"]
    assert streams["router_noise"]["device"] == "cuda"
    result = evaluate_cluster_checkpoint(
        tmp_path / "best.pt", stores[0, "test"], stores[0, "train"]
    )
    assert result["device"].startswith("cuda") and result["test_noise"] is True


@pytest.mark.parametrize(
    "change, match",
    [
        ({"train": {"momentum": 0.9}}, r"train\.momentum is not a setting"),
        ({"train": {"epochs": 0}}, r"train\.epochs must be a positive integer"),
        ({"train": {"weight_decay": 5e-4}}, r"train\.weight_decay must be null or 0"),
        ({"kind": "cluster_single", "train": {"router_lr": 0.1}}, r"train\.router_lr"),
        ({"train": {"precision": "bf16"}}, r"train\.precision"),
        ({"train": {"checkpoint_every": 0}}, r"train\.checkpoint_every"),
        ({"train": {"stop_from": -1}}, r"train\.stop_from must be an integer >= 0"),
        ({"train": {"stop_from": 1.5}}, r"train\.stop_from must be an integer >= 0"),
        ({"train": {"stop_rise": -0.1}}, r"train\.stop_rise must be >= 0"),
        ({"train": {"stop_loss": "low"}}, r"train\.stop_loss must be a number or null"),
        ({"train": {"stop_on_loss": "yes"}}, r"train\.stop_on_loss must be true or false"),
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
    assert moe.train["epochs"] == 501 and moe.train["stop_loss"] == 0.314
    assert moe.train["stop_rise"] == 0.02 and moe.train["stop_from"] == 0
    assert moe.train["stop_on_loss"] is True and moe.train["threads"] == 1
    assert moe.train["select"] == {"metric": "val_accuracy", "mode": "max"}
    assert moe.train["device"] == "cpu" and moe.data == {"val_fraction": 0.1}
    single = resolve_cluster_spec(spec("cluster_single", select={"mode": "max"}))
    assert single.train["epochs"] == 801 and single.train["select"]["metric"] == "val_accuracy"
    assert single.train["stop_loss"] is None and single.train["stop_rise"] == 0.02
    assert single.train["stop_from"] == 501
    assert resolve_cluster_spec(moe) == moe and resolve_cluster_spec(single) == single
    own = resolve_cluster_spec(spec("cluster_single", stop_loss=0.3, stop_from=0))
    assert (own.train["stop_loss"], own.train["stop_from"]) == (0.3, 0)


def test_the_stop_settings_in_a_config_resolve_per_kind_and_bad_ones_name_the_key():
    from pathlib import Path

    import yaml

    from smoe.config import validate_config
    from smoe.families.clusters.config import cluster_model_spec

    raw = yaml.safe_load((Path(__file__).parents[2] / "config" / "test.yaml").read_text())
    config = validate_config(json.loads(json.dumps(raw)))
    assert config["clusters"]["train"]["stop_from"] is None  # null: the kind's official
    single = resolve_cluster_spec(cluster_model_spec(config, "single_linear")).train
    moe = resolve_cluster_spec(cluster_model_spec(config, "moe_linear")).train
    assert (single["stop_from"], single["stop_loss"], single["stop_rise"]) == (501, None, 0.02)
    assert (moe["stop_from"], moe["stop_loss"], moe["stop_rise"]) == (0, 0.314, 0.02)
    for where, change, message in (
        ("train", {"stop_from": -1}, r"'clusters\.train\.stop_from': -1 is less than"),
        ("train", {"stop_rise": -1}, r"'clusters\.train\.stop_rise': -1 is less than"),
        ("train", {"stop_on_loss": 3}, r"'clusters\.train\.stop_on_loss': 3 is not of type"),
        (
            "single_linear",
            {"stop_from": 1.5},
            r"'clusters\.models\.single_linear\.train\.stop_from': 1\.5 is not of type",
        ),
    ):
        bad = json.loads(json.dumps(raw))
        section = bad["clusters"]["train"]
        if where != "train":
            section = bad["clusters"]["models"][where].setdefault("train", {})
        section.update(change)
        with pytest.raises(InputError, match=message):
            validate_config(bad)


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
