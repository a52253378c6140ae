"""Gated-modular-network family through the shared trainer: learning, the importance
regulariser, exact resume, evaluation JSON, the single baseline and the distilled gate.
Real trainings on scikit-learn's digits (1,294 train / 144 val / 359 test images of 8 x 8);
a few seconds on one core."""

import csv
import json

import pytest
import torch

from smoe.data.image_store import write_image_split
from smoe.errors import InputError
from smoe.models.gated import GatedMoE, SingleModel
from smoe.train.checkpoint import load_checkpoint
from smoe.train.gated_task import (
    build_gated_model,
    evaluate_gated_checkpoint,
    gated_label,
    resolve_gated_spec,
    train_gated,
)
from smoe.train.loop import TaskTrainer

RESULT_KEYS = {
    "family",
    "dataset",
    "model",
    "kind",
    "label",
    "options",
    "variant",
    "top_k",
    "attentive",
    "experts",
    "seed",
    "params",
    "best_epoch",
    "epochs",
    "train_time_s",
    "device",
    "routing_rule",
    "metrics",
    "routing",
    "store",
    "train_store",
    "val_store",
}
METRIC_KEYS = {
    "test_accuracy",
    "mutual_information",
    "sample_entropy",
    "usage_entropy",
    "per_task_entropy",
}
FAST = {"epochs": 10, "batch_size": 64, "lr": 0.01}
"""Ten epochs of small batches at a higher rate: the paper's 100 epochs of 512 in seconds."""


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    return {
        split: write_image_split("digits", None, split, 0, 0.1, folder / f"{split}.zarr")
        for split in ("train", "val", "test")
    }


def spec(kind="gated_moe", options=None, name="moe", **train):
    return {"name": name, "kind": kind, "options": options or {}, "train": {**FAST, **train}}


def run(stores, run_spec, seed, out):
    return train_gated(run_spec, stores["train"], stores["val"], seed, out, progress=False)


def read_history(folder):
    with open(folder / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def without_time(rows):
    return [{k: v for k, v in row.items() if k != "time_s"} for row in rows]


@pytest.fixture(scope="module")
def moe_run(stores, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe")
    summary = run(stores, spec(options={"experts": 4}), 0, out)
    return out, summary, evaluate_gated_checkpoint(out / "best.pt", stores["test"])


def test_expectation_moe_learns_digits(moe_run):
    # Measured: test accuracy 73-83 % over seeds 0-3 (chance 10 %).
    _, summary, result = moe_run
    assert summary["val_metrics"]["val_accuracy"] > 50
    assert result["metrics"]["test_accuracy"] > 50
    assert summary["epochs"] == 10 and summary["family"] == "gated"


def test_evaluation_json_has_every_key(moe_run, stores):
    out, _, result = moe_run
    assert set(result) == RESULT_KEYS and set(result["metrics"]) == METRIC_KEYS
    json.dumps(result)  # JSON-able
    assert result["kind"] == "gated_moe" and result["variant"] == "expectation"
    assert result["label"] == "expectation" and result["options"] == {"experts": 4}
    assert result["top_k"] == 1 and result["attentive"] is False
    assert result["experts"] == 4 and result["routing_rule"] == "argmax"
    matrix = result["routing"]["matrix"]
    assert len(matrix) == 4 and all(len(row) == 10 for row in matrix)
    assert sum(map(sum, matrix)) == 359  # every test image (20 % of 1,797) routed once
    metrics = result["metrics"]
    for key in ("mutual_information", "usage_entropy"):
        assert 0 <= metrics[key] <= 2 + 1e-9  # log2 4 bits at most
    assert result["best_epoch"] == int(load_checkpoint(out / "best.pt")["epoch"])


def test_importance_loss_spreads_the_experts(moe_run, stores, tmp_path):
    # Measured over seeds 0-3: usage entropy 0.40-1.15 bits without, 1.93-2.00 with w = 1.
    _, summary, result = moe_run
    regular = run(stores, spec(options={"experts": 4, "importance": 1.0}), 0, tmp_path)
    scored = evaluate_gated_checkpoint(tmp_path / "best.pt", stores["test"])
    assert scored["metrics"]["usage_entropy"] > result["metrics"]["usage_entropy"] + 0.3
    assert regular["val_metrics"]["val_usage_entropy"] > 1.5
    assert "train_importance" in read_history(tmp_path)[0]


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("variant", ["stochastic"])
def test_an_interrupted_run_resumes_exactly(stores, tmp_path, monkeypatch, variant):
    run_spec = spec(options={"experts": 3, "variant": variant}, epochs=6, checkpoint_every=2)
    reference = run(stores, run_spec, 5, tmp_path / "A")
    validate, calls = TaskTrainer._validate, []

    def interrupt_fourth_validation(self):
        calls.append(1)
        if len(calls) == 4:
            raise Interrupted
        return validate(self)

    with monkeypatch.context() as patch:
        patch.setattr(TaskTrainer, "_validate", interrupt_fourth_validation)
        with pytest.raises(Interrupted):
            run(stores, run_spec, 5, tmp_path / "B")
    assert load_checkpoint(tmp_path / "B" / "last.pt")["state"]["epoch"] == 2
    summary = run(stores, run_spec, 5, tmp_path / "B")
    assert summary["resumed_from_epoch"] == 2 and summary["fresh_start_reason"] is None
    assert without_time(read_history(tmp_path / "B")) == without_time(read_history(tmp_path / "A"))
    for key in ("epochs", "best_epoch", "best_value", "val_metrics"):
        assert summary[key] == reference[key], key
    for name in ("best.pt", "last.pt"):
        a = load_checkpoint(tmp_path / "A" / name)["model"]
        b = load_checkpoint(tmp_path / "B" / name)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Progress and the checkpoint interval change no result: resumed across them.
    again = run(
        stores,
        {**run_spec, "train": {**run_spec["train"], "checkpoint_every": 3}},
        5,
        tmp_path / "B",
    )
    assert again["resumed_from_epoch"] == 6


def test_single_model_trains_and_matches_the_moe_size(stores, tmp_path):
    summary = run(stores, spec("gated_single", {"experts": 4}, name="single"), 0, tmp_path)
    result = evaluate_gated_checkpoint(tmp_path / "best.pt", stores["test"])
    assert result["metrics"]["test_accuracy"] > 50  # measured 85 %
    assert result["routing"] is None and result["variant"] is None
    assert all(result["metrics"][k] is None for k in METRIC_KEYS - {"test_accuracy"})
    moe = build_gated_model("gated_moe", {"experts": 4}, (1, 8, 8), 10)
    moe_params = sum(p.numel() for p in moe.parameters())
    assert abs(summary["params"] - moe_params) / moe_params < 0.05


def test_distilled_gate_trains_only_the_gate(moe_run, stores, tmp_path):
    teacher_dir, _, _ = moe_run
    options = {"teacher": str(teacher_dir / "best.pt")}
    run(stores, spec("gated_distilled", options, name="distilled", epochs=3), 0, tmp_path)
    student = load_checkpoint(tmp_path / "best.pt")["model"]
    teacher = load_checkpoint(teacher_dir / "best.pt")["model"]
    experts = [k for k in teacher if k.startswith("experts.")]
    assert experts and all(torch.equal(student[k], teacher[k]) for k in experts)
    assert not torch.equal(student["gate.out.weight"], teacher["gate.out.weight"])
    result = evaluate_gated_checkpoint(tmp_path / "best.pt", stores["test"])
    assert result["kind"] == "gated_distilled" and result["metrics"]["test_accuracy"] > 50
    assert result["label"] == "distilled"  # the teacher's gate was not attentive


def test_similarity_on_a_trained_networks_features(stores, tmp_path):
    single_dir, moe_dir = tmp_path / "single", tmp_path / "moe"
    run(stores, spec("gated_single", {"experts": 4}, name="single", epochs=3), 0, single_dir)
    features = str(single_dir / "best.pt")
    options = {"experts": 4, "similarity": {"beta_s": 1.0, "beta_d": 1.0, "features": features}}
    run(stores, spec(options=options, epochs=2), 0, moe_dir)
    assert read_history(moe_dir)[0]["train_similarity"]  # the loss was computed
    saved = load_checkpoint(moe_dir / "best.pt")
    record = saved["data_provenance"]["features"]
    assert record["seed"] == 0 and len(record["weights_sha256"]) == 64
    # pixel distances give another loss, so another model
    pixel = dict(options, similarity={"beta_s": 1.0, "beta_d": 1.0})
    run(stores, spec(options=pixel, epochs=2), 0, tmp_path / "pixel")
    other = load_checkpoint(tmp_path / "pixel" / "best.pt")["model"]
    assert not torch.equal(other["gate.out.weight"], saved["model"]["gate.out.weight"])
    with pytest.raises(InputError, match="not the best.pt of a trained gated_single"):
        bad = dict(options, similarity={"beta_s": 1.0, "features": str(moe_dir / "best.pt")})
        run(stores, spec(options=bad, epochs=1), 0, tmp_path / "bad")


@pytest.mark.parametrize(
    "kind, options, teacher_attentive, label",
    [
        ("gated_single", {"experts": 4}, False, "single"),
        ("gated_moe", {}, False, "expectation"),
        ("gated_moe", {"variant": "topk", "top_k": 2, "importance": 0.5}, False, "top-2 + L_imp"),
        ("gated_moe", {"variant": "topk", "importance": 0.0}, False, "top-1"),
        ("gated_moe", {"variant": "em"}, False, "EM"),
        (
            "gated_moe",
            {"variant": "topk", "top_k": 2, "attentive": True, "similarity": {"beta_s": 1}},
            False,
            "attentive top-2 + L_s",
        ),
        ("gated_moe", {"variant": "stochastic", "attentive": True}, False, "attentive stochastic"),
        (
            "gated_distilled",
            {"teacher": "t.pt", "importance": 1.0},
            True,
            "distilled attentive + L_imp",
        ),
    ],
)
def test_models_are_named_as_in_the_paper(kind, options, teacher_attentive, label):
    assert gated_label(kind, options, teacher_attentive) == label


def test_builder_and_spec_checks():
    assert isinstance(build_gated_model("gated_moe", {"attentive": True}, (1, 8, 8), 10), GatedMoE)
    assert isinstance(
        build_gated_model("gated_single", {"params_budget": 500}, (8, 8), 10), SingleModel
    )
    resolved = resolve_gated_spec({"name": "m", "kind": "gated_moe"})
    assert resolved.train["epochs"] == 100 and resolved.train["batch_size"] == 512
    assert resolved.train["lr"] == 1e-3 and resolved.train["weight_decay"] == 1e-3
    for bad, match in (
        ({"train": {"batch": 3}}, "train.batch"),
        ({"options": {"expert": 3}}, "expert"),
        ({"options": {"importance": -1}}, "importance"),
        ({"kind": "cluster_moe"}, "not a gated model"),
        ({"train": {"epochs": 0}}, "epochs"),
        ({"options": {"variant": "mean"}}, "variant"),
        ({"options": {"experts": 2, "top_k": 3}}, "top_k"),
        ({"kind": "gated_distilled"}, "teacher"),
    ):
        with pytest.raises(InputError, match=match):
            resolve_gated_spec({"name": "m", "kind": "gated_moe", **bad})
