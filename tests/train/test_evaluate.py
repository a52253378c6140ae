"""Evaluation: the best epoch's weights, routing agreement and kernels, bad input, the CLI."""

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from smoe.cli import main
from smoe.config import validate_config
from smoe.core.errors import InputError
from smoe.families.heat.config import model_spec
from smoe.families.heat.dataset import HeatPairs, Normalizer
from smoe.families.heat.evaluate import dataset_metrics, evaluate_checkpoint
from smoe.families.heat.mask import generate_mask
from smoe.families.heat.reference import reference_stencil
from smoe.families.heat.registry import build_model
from smoe.families.heat.simulation import HeatParams
from smoe.families.heat.store import simulate_split
from smoe.families.heat.task import train

PARAMS = HeatParams((0.0025, 0.025, 0.25), steps=8)
PAPER_SMOE = {
    "gate": "latent",
    "experts": 3,
    "k": 1,
    "rc_loss": True,
    "damping": True,
    "quantile": 0.3,
}


@pytest.fixture(scope="module")
def stores(tmp_path_factory, small_mask):
    folder = tmp_path_factory.mktemp("stores")
    paths = {}
    for split, seed, runs in [("train", 21, 6), ("val", 22, 2), ("test", 23, 2)]:
        paths[split] = simulate_split(
            small_mask, PARAMS, seed, runs, folder / f"{split}.zarr", split=split, progress=False
        )
    other_grid = generate_mask(10, 12, 3, seed=3)
    paths["other_grid"] = simulate_split(
        other_grid, PARAMS, 24, 1, folder / "grid.zarr", progress=False
    )
    other_map = generate_mask(12, 10, 3, seed=4)
    assert not np.array_equal(other_map, small_mask)
    paths["other_map"] = simulate_split(
        other_map, PARAMS, 25, 1, folder / "map.zarr", progress=False
    )
    return paths


def make_spec(kind, options, **train_settings):
    settings = {"epochs": 3, "batch_size": 8, "threads": 1, "early_stop": 0, "stop_at": None}
    config = validate_config(
        {
            "models": {kind: {"kind": kind, "options": options}},
            "train": {**settings, **train_settings},
        }
    )
    return model_spec(config, kind)


@pytest.fixture(scope="module")
def trained(stores, tmp_path_factory):
    """Three trainings: one that gets worse after its first epoch, SMoE, SMoE with the oracle
    gate; each gives (folder, train.json)."""
    setups = {
        # A linear convolution with plain SGD past its stability limit: worse every epoch.
        "worsening": make_spec(
            "cnn",
            {"hidden": [], "batchnorm": False, "bias": True},
            optimizer="sgd",
            lr=2.0,
            momentum=0.0,
            select={"metric": "mse", "mode": "min"},
        ),
        "smoe": make_spec("smoe", dict(PAPER_SMOE)),
        "fixed": make_spec("smoe", {"gate": "fixed", "experts": 3, "k": 1}, epochs=1),
    }
    out = {}
    for name, spec in setups.items():
        folder = tmp_path_factory.mktemp(name)
        summary = train(spec, stores["train"], stores["val"], 0, folder, progress=False)
        out[name] = (folder, summary)
    return out


def assert_metrics_equal(ours, expected):
    assert ours.keys() == expected.keys()
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_evaluation_uses_the_best_epoch_not_the_last(trained, stores):
    folder, summary = trained["worsening"]
    assert summary["epochs"] == 3 and summary["best_epoch"] < 3 - 1
    result = evaluate_checkpoint(folder / "best.pt", stores["val"], device="cpu")
    assert result["best_epoch"] == summary["best_epoch"]
    assert result["model"] == "cnn" and result["kind"] == "cnn" and result["seed"] == 0
    assert result["routing"] is None
    assert_metrics_equal(result["metrics"], summary["val_metrics"])
    assert_metrics_equal(
        result["metrics"], torch.load(folder / "best.pt", weights_only=False)["val_metrics"]
    )

    # The last epoch's weights give other numbers on the same store.
    last = torch.load(folder / "last.pt", weights_only=False)
    info = last["data"]
    model = build_model("cnn", last["spec"]["options"], info["in_channels"], 12, 10)
    model.load_state_dict(last["model"])
    dataset = HeatPairs(stores["val"], normalizer=Normalizer.from_dict(info["normalizer"]))
    at_last = dataset_metrics(model, dataset, torch.device("cpu"), [0.01], None, 256)
    assert at_last["mse"] > 2 * result["metrics"]["mse"]

    test = evaluate_checkpoint(folder / "best.pt", stores["test"], device="cpu")
    assert test["metrics"].keys() == result["metrics"].keys()
    assert test["metrics"]["mse"] != result["metrics"]["mse"]


def best_assignment(confusion):
    """Brute force over every one-to-one matching of experts to types."""
    experts, types = confusion.shape
    return max(
        sum(confusion[e, t] for e, t in zip(chosen, range(types), strict=True))
        for chosen in itertools.permutations(range(experts), types)
    )


def test_smoe_routing_and_kernels(trained, stores, small_mask):
    folder, _ = trained["smoe"]
    result = evaluate_checkpoint(folder / "best.pt", stores["test"], device="cpu")
    routing = result["routing"]
    confusion = np.asarray(routing["confusion"])
    samples = 2 * (PARAMS.steps)  # 2 runs of 9 frames: 8 pairs each
    assert confusion.shape == (3, 3)
    assert confusion.sum() == samples * small_mask.size
    # Every point is counted once per sample, under its own region type.
    np.testing.assert_array_equal(confusion.sum(0), samples * np.bincount(small_mask.ravel()))
    best = best_assignment(confusion)
    assert routing["agreement"] == pytest.approx(100 * best / confusion.sum(), rel=1e-12)
    matching = {int(e): t for e, t in routing["expert_to_type"].items()}
    assert sorted(matching.values()) == [0, 1, 2]
    assert sum(confusion[e, t] for e, t in matching.items()) == best

    routing_map = np.asarray(routing["map"])
    assert routing_map.shape == small_mask.shape
    assert set(np.unique(routing_map)) <= {0, 1, 2}
    as_types = np.vectorize(matching.get)(routing_map)
    assert routing["map_agreement"] == pytest.approx(100 * np.mean(as_types == small_mask))
    # The latent gate ignores its input: each point always goes to its best logit's expert.
    weights = torch.load(folder / "best.pt", weights_only=False)["model"]
    chosen = weights["layers.0.gate.logits"].argmax(0).numpy()
    np.testing.assert_array_equal(routing_map, chosen)
    for e, t in itertools.product(range(3), range(3)):
        assert confusion[e, t] == samples * np.sum((chosen == e) & (small_mask == t))

    kernels = np.asarray(routing["kernels"])
    assert kernels.shape == (3, 3, 3)
    np.testing.assert_allclose(kernels, weights["layers.0.experts.weight"][:, 0].double().numpy())
    stencils = [reference_stencil(a) for a in PARAMS.diffusivity]
    np.testing.assert_array_equal(np.asarray(routing["stencils"]), np.stack(stencils))
    errors = {e: np.abs(kernels[e] - stencils[t]).max() for e, t in matching.items()}
    assert routing["kernel_max_abs_error"] == pytest.approx(max(errors.values()))
    for expert, error in errors.items():
        assert routing["kernel_error_per_expert"][str(expert)] == pytest.approx(error)


def test_fixed_gate_routes_exactly_by_the_map(trained, stores, small_mask):
    folder, _ = trained["fixed"]
    result = evaluate_checkpoint(folder / "best.pt", stores["test"], device="cpu")
    routing = result["routing"]
    assert routing["agreement"] == 100.0 and routing["map_agreement"] == 100.0
    assert routing["expert_to_type"] == {"0": 0, "1": 1, "2": 2}
    np.testing.assert_array_equal(np.asarray(routing["map"]), small_mask)
    confusion = np.asarray(routing["confusion"])
    np.testing.assert_array_equal(confusion, np.diag(np.diag(confusion)))


@pytest.mark.parametrize("store", ["other_grid", "other_map"])
def test_store_from_another_map_is_rejected(trained, stores, store):
    folder, _ = trained["worsening"]
    with pytest.raises(InputError, match="different grid or region map"):
        evaluate_checkpoint(folder / "best.pt", stores[store], device="cpu")


def test_last_checkpoint_is_rejected(trained, stores):
    folder, _ = trained["worsening"]
    with pytest.raises(InputError, match=r"last\.pt.*not a best-model checkpoint.*best\.pt"):
        evaluate_checkpoint(folder / "last.pt", stores["test"], device="cpu")


def test_evaluate_command(trained, stores, tmp_path):
    folder, _ = trained["smoe"]
    out = tmp_path / "metrics" / "x.json"
    routing_map = tmp_path / "map.npy"
    command = [sys.executable, "-m", "smoe", "evaluate", "--checkpoint", str(folder / "best.pt")]
    command += ["--store", str(stores["test"]), "--out", str(out)]
    command += ["--routing-map", str(routing_map), "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "prcntclose1.0 =" in result.stdout and "routing agreement" in result.stdout
    written = json.loads(out.read_text())
    expected = evaluate_checkpoint(folder / "best.pt", stores["test"], device="cpu")
    assert_metrics_equal(written["metrics"], expected["metrics"])
    assert written["routing"]["agreement"] == expected["routing"]["agreement"]
    np.testing.assert_array_equal(np.load(routing_map), np.asarray(expected["routing"]["map"]))


def test_evaluate_command_with_a_missing_checkpoint(stores, tmp_path, capsys):
    missing = tmp_path / "best.pt"
    out = tmp_path / "x.json"
    argv = ["evaluate", "--checkpoint", str(missing), "--store", str(stores["test"])]
    assert main([*argv, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "smoe evaluate: error:" in error and "does not exist" in error and str(missing) in error
    assert not out.exists()


def test_evaluation_batch_sizes_are_rounded_up_to_whole_chunks():
    from smoe.families.heat.evaluate import EVALUATION_CHUNK, evaluation_batch_size

    assert EVALUATION_CHUNK == 32
    sizes = {b: evaluation_batch_size(b) for b in (1, 31, 32, 33, 256, 300)}
    assert sizes == {1: 32, 31: 32, 32: 32, 33: 64, 256: 256, 300: 320}


@pytest.mark.parametrize("name", ["smoe", "worsening"])
def test_metrics_routing_and_predictions_do_not_depend_on_the_evaluation_batch_size(
    name, trained, stores, monkeypatch
):
    """Chunks of 3 samples on the 16-sample split (a partial last chunk), loaded in batches of
    1 (rounded up to 3), 5 (to 6), 7 (to 9) and all at once: one set of numbers, bit for bit.
    Per-batch forward passes and sums would differ in their last digits on some CPUs."""
    from smoe.families.heat import evaluate
    from smoe.families.heat.evaluate import RoutingTally
    from smoe.nn.layer import smoe_layers

    monkeypatch.setattr(evaluate, "EVALUATION_CHUNK", 3)
    folder, _ = trained[name]
    saved = torch.load(folder / "best.pt", weights_only=False)
    info = saved["data"]
    model = build_model(
        saved["spec"]["kind"],
        saved["spec"]["options"],
        info["in_channels"],
        12,
        10,
        mask=info["mask"],
        region_diffusivity=tuple(info["diffusivity"]),
    ).eval()
    model.load_state_dict(saved["model"])
    dataset = HeatPairs(stores["val"], normalizer=Normalizer.from_dict(info["normalizer"]))
    assert len(dataset) % 3 != 0
    layers = smoe_layers(model)
    results = []
    for batch_size in (1, 5, 7, 10**6):
        tally = RoutingTally(layers[-1], dataset.mask) if layers else None
        predictions = []
        metrics = dataset_metrics(
            model,
            dataset,
            torch.device("cpu"),
            [0.01, 0.1],
            [1.0, 2.0, 4.0],
            batch_size,
            tally,
            predictions,
        )
        assert [len(p) for p in predictions] == [3] * (len(dataset) // 3) + [len(dataset) % 3]
        routing = tally.summary() if tally else None
        results.append((metrics, routing, torch.cat(predictions)))
    first_metrics, first_routing, first_predictions = results[0]
    for metrics, routing, predictions in results[1:]:
        assert metrics == first_metrics
        assert routing == first_routing
        assert torch.equal(predictions, first_predictions)
    assert (first_routing is not None) == (name == "smoe")
    if first_routing is not None:
        assert first_routing["agreement"] > 0
