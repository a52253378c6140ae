"""Gated-modular-network family through the shared trainer: learning, the importance
regulariser, exact resume, evaluation JSON, the single baseline, the distilled student, the
kept (last) epoch and the randomness streams. Real trainings on scikit-learn's digits (1,294
train / 144 val / 359 test images of 8 x 8), a few seconds on one core; one on the
5,000-image MNIST subset."""

import csv
import json

import pytest
import torch

from smoe.core.errors import InputError
from smoe.core.train.checkpoint import load_checkpoint
from smoe.core.train.loop import TaskTrainer
from smoe.families.gated.models import GatedMoE, SingleModel
from smoe.families.gated.spec import build_gated_model, gated_label, resolve_gated_spec
from smoe.families.gated.store import write_image_split
from smoe.families.gated.task import augment_cifar, evaluate_gated_checkpoint, train_gated

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
    "architecture",
    "hard_routing",
    "seed",
    "params",
    "best_epoch",
    "epochs",
    "kept",
    "val_accuracy",
    "last_val_accuracy",
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
FAST = {"epochs": 10, "batch_size": 64, "lr": 0.01, "weight_decay": 0.0}
"""Ten epochs of small batches at a higher rate, without weight decay: the paper's 100
epochs of 512 in seconds (with the MoE's weight decay 1e-3, nine features of 8 x 8 digits
die within an epoch)."""


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


def test_expectation_moe_learns_digits_and_the_last_epoch_is_kept(moe_run):
    out, summary, result = moe_run
    assert summary["val_metrics"]["val_accuracy"] > 50
    assert result["metrics"]["test_accuracy"] > 50
    assert summary["epochs"] == 10 and summary["family"] == "gated"
    # the official code tests the last epoch's model: best.pt holds epoch 9
    assert summary["best_epoch"] == 9 and result["kept"] == "last epoch"
    history = read_history(out)
    assert float(history[-1]["val_accuracy"]) == pytest.approx(result["last_val_accuracy"])
    assert result["val_accuracy"] == pytest.approx(result["last_val_accuracy"])


def test_evaluation_json_has_every_key(moe_run, stores):
    out, _, result = moe_run
    assert set(result) == RESULT_KEYS and set(result["metrics"]) == METRIC_KEYS
    json.dumps(result)  # JSON-able
    assert result["kind"] == "gated_moe" and result["variant"] == "expectation"
    assert result["label"] == "expectation" and result["options"] == {"experts": 4}
    assert result["top_k"] == 1 and result["attentive"] is False
    assert result["experts"] == 4 and result["routing_rule"] == "argmax"
    assert result["architecture"] == "mnist" and result["hard_routing"] is False
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


def test_single_is_one_expert_with_its_own_recipe(stores, tmp_path):
    single = spec("gated_single", {"experts": 4}, name="single", weight_decay=None)
    summary = run(stores, single, 0, tmp_path)
    result = evaluate_gated_checkpoint(tmp_path / "best.pt", stores["test"])
    assert result["metrics"]["test_accuracy"] > 30
    assert result["routing"] is None and result["variant"] is None
    assert result["label"] == "single"
    assert all(result["metrics"][k] is None for k in METRIC_KEYS - {"test_accuracy"})
    one_expert = build_gated_model("gated_moe", {"experts": 1}, (1, 8, 8), 10).experts
    assert summary["params"] == sum(p.numel() for p in one_expert.parameters())
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["optimizer"]["param_groups"][0]["weight_decay"] == 1e-6  # the code's
    wide = run(
        stores,
        spec("gated_single", {"experts": 4, "params_budget": "match"}, name="wide", epochs=1),
        0,
        tmp_path / "wide",
    )
    moe = build_gated_model("gated_moe", {"experts": 4}, (1, 8, 8), 10)
    moe_params = sum(p.numel() for p in moe.parameters())
    assert abs(wide["params"] - moe_params) / moe_params < 0.05
    scored = evaluate_gated_checkpoint(tmp_path / "wide" / "best.pt", stores["test"])
    assert scored["label"] == "single (mixture-sized)"


def _gate_trunk(state, prefix="gate."):
    return {
        k[len(prefix) :]: v
        for k, v in state.items()
        if k.startswith(prefix) and not k.startswith(prefix + "out.")
    }


def test_distilled_student_starts_from_the_teachers_trunk_and_trains_it(stores, tmp_path):
    """The published distilled model: an attentive teacher with L_imp; the student copies
    its experts (frozen) and its gate trunk (trained on), a fresh output layer, plain CE,
    Adam without weight decay."""
    teacher_options = {"experts": 4, "attentive": True, "importance": 0.2}
    run(stores, spec(options=teacher_options, name="teacher", epochs=3), 0, tmp_path / "t")
    options = {"teacher": str(tmp_path / "t" / "best.pt")}
    student_spec = spec("gated_distilled", options, name="distilled", epochs=3, weight_decay=None)
    task_trainer = TaskTrainer(
        __import__("smoe.families.gated.task", fromlist=["GatedTask"]).GatedTask(
            student_spec, stores["train"], stores["val"]
        ),
        0,
        tmp_path / "unused",
        progress=False,
    )
    teacher = load_checkpoint(tmp_path / "t" / "best.pt")["model"]
    at_start = task_trainer.model.state_dict()
    trunk = _gate_trunk(teacher)
    assert trunk and all(torch.equal(at_start["gate." + k], v) for k, v in trunk.items())
    assert task_trainer.optimizer.param_groups[0]["weight_decay"] == 0.0
    run(stores, student_spec, 0, tmp_path / "s")
    student = load_checkpoint(tmp_path / "s" / "best.pt")["model"]
    experts = [k for k in teacher if k.startswith("experts.")]
    assert experts and all(torch.equal(student[k], teacher[k]) for k in experts)
    assert any(not torch.equal(student["gate." + k], v) for k, v in trunk.items())
    assert (
        "query.weight" not in student and "train_importance" not in read_history(tmp_path / "s")[0]
    )
    result = evaluate_gated_checkpoint(tmp_path / "s" / "best.pt", stores["test"])
    assert result["kind"] == "gated_distilled" and result["metrics"]["test_accuracy"] > 30
    assert result["label"] == "distilled attentive expectation + L_imp"


def test_every_draw_uses_a_generator_on_its_tensors_device(stores, tmp_path, monkeypatch):
    """Sampling ops (the stochastic routes, CIFAR-10's flips and crops) are given a
    generator, and one on the device of the tensors they draw for."""
    calls = []
    for name in ("multinomial", "rand", "randint"):
        original = getattr(torch, name)

        def recording(*args, _original=original, _name=name, **kwargs):
            generator = kwargs.get("generator")
            device = kwargs.get("device") or (args[0].device if _name == "multinomial" else None)
            calls.append(
                (
                    _name,
                    None if generator is None else generator.device.type,
                    torch.device(device or "cpu").type,
                )
            )
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, name, recording)
    run(stores, spec(options={"experts": 3, "variant": "stochastic"}, epochs=1), 0, tmp_path)
    augment_cifar(torch.zeros(4, 3, 32, 32), torch.Generator().manual_seed(0))
    drawn = [call for call in calls if call[0] == "multinomial"]
    assert drawn and all(g == d for _, g, d in drawn)
    augmentation = [call for call in calls if call[0] in ("rand", "randint")]
    assert len(augmentation) == 3 and all(g == d for _, g, d in augmentation)


def test_cifar_augmentation_flips_and_crops():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    out = augment_cifar(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    again = augment_cifar(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # seeded
    padded = torch.nn.functional.pad(torch.cat([x, x.flip(3)]), (4,) * 4, mode="reflect")
    for n in range(2):  # each output is a 32 x 32 window of the padded image or its mirror
        windows = padded.unfold(2, 32, 1).unfold(3, 32, 1)  # [2N, C, 9, 9, 32, 32]
        found = [
            (a, i, j)
            for a in (n, n + 2)
            for i in range(9)
            for j in range(9)
            if torch.equal(windows[a, :, i, j], out[n])
        ]
        assert found


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
    "kind, options, teacher, label",
    [
        ("gated_single", {"experts": 4}, None, "single"),
        ("gated_single", {"params_budget": "match"}, None, "single (mixture-sized)"),
        ("gated_moe", {}, None, "expectation"),
        ("gated_moe", {"variant": "topk", "top_k": 2, "importance": 0.5}, None, "top-2 + L_imp"),
        ("gated_moe", {"variant": "topk", "importance": 0.0}, None, "top-1"),
        ("gated_moe", {"variant": "em"}, None, "EM"),
        (
            "gated_moe",
            {"variant": "topk", "top_k": 2, "attentive": True, "similarity": {"beta_s": 1}},
            None,
            "attentive top-2 + L_s",
        ),
        (
            "gated_moe",
            {"similarity": {"beta_s": 1, "features": "single.pt"}},
            None,
            "expectation + L_s (network features)",
        ),
        ("gated_moe", {"variant": "stochastic", "attentive": True}, None, "attentive stochastic"),
        (
            "gated_distilled",
            {"teacher": "t.pt"},
            {"attentive": True, "importance": 0.2},
            "distilled attentive expectation + L_imp",
        ),
    ],
)
def test_models_are_named_as_in_the_paper(kind, options, teacher, label):
    assert gated_label(kind, options, teacher) == label


def test_builder_and_spec_checks():
    assert isinstance(build_gated_model("gated_moe", {"attentive": True}, (1, 8, 8), 10), GatedMoE)
    assert isinstance(
        build_gated_model("gated_single", {"params_budget": 500}, (8, 8), 10), SingleModel
    )
    resolved = resolve_gated_spec({"name": "m", "kind": "gated_moe"})
    assert resolved.train["epochs"] == 100 and resolved.train["batch_size"] == 512
    assert resolved.train["lr"] == 1e-3 and resolved.train["weight_decay"] is None
    assert resolved.train["select"] == {"metric": "val_accuracy", "mode": "last"}
    for bad, match in (
        ({"train": {"batch": 3}}, "train.batch"),
        ({"options": {"expert": 3}}, "expert"),
        ({"options": {"importance": -1}}, "importance"),
        ({"kind": "cluster_moe"}, "not a gated model"),
        ({"train": {"epochs": 0}}, "epochs"),
        ({"options": {"variant": "mean"}}, "variant"),
        ({"options": {"experts": 2, "top_k": 3}}, "top_k"),
        ({"kind": "gated_distilled"}, "teacher"),
        ({"kind": "gated_distilled", "options": {"teacher": "t", "importance": 1}}, "importance"),
        ({"options": {"params_budget": 3}}, "params_budget"),
        ({"train": {"early_stop": 3}}, "early_stop needs a direction"),
    ):
        with pytest.raises(InputError, match=match):
            resolve_gated_spec({"name": "m", "kind": "gated_moe", **bad})
