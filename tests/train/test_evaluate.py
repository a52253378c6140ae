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


SPLIT_CASES = {
    **{name: name for name in ("persistence", "stencil", "generator", "lcn", "condconv", "mlp")},
    "cnn": ("cnn", {"hidden": [4]}),
    "coordconv": ("coordconv", {"hidden": [4]}),
    "convlcn": ("convlcn", {}),
    **{
        f"smoe-{gate}": ("smoe", {**PAPER_SMOE, "gate": gate})
        for gate in ("latent", "fixed", "conv", "conv1", "coordconv", "lcn", "linear")
    },
    "smoe-hidden": ("smoe", {**PAPER_SMOE, "hidden_layers": [{"experts": 2, "filters": 2}]}),
}


@pytest.mark.parametrize("case", sorted(SPLIT_CASES))
def test_models_said_to_split_exactly_give_the_same_outputs_in_chunks(case):
    """Evaluation runs such models on chunks of 32 samples (faster on the CPU); their outputs
    must be those of the whole batch bit for bit, on the paper's grid and evaluation batch."""
    from smoe.families.heat.evaluate import FORWARD_CHUNK, splits_exactly

    kind, options = SPLIT_CASES[case] if isinstance(SPLIT_CASES[case], tuple) else (case, {})
    mask = np.load("tests/fixtures/paper_mask.npy")
    torch.manual_seed(0)
    model = build_model(
        kind, options, 1, 64, 64, mask=mask, name=case, region_diffusivity=PARAMS.diffusivity
    ).eval()
    if not splits_exactly(model):
        assert kind in ("lcn", "condconv", "mlp", "convlcn") or options["gate"] in ("lcn", "linear")
        return
    x = torch.rand(256, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model(x)
        chunks = torch.cat([model(part) for part in x.split(FORWARD_CHUNK)])
    assert torch.equal(whole, chunks)


def test_chunked_evaluation_gives_the_metrics_and_routing_of_whole_batches(
    trained, stores, monkeypatch
):
    from smoe.families.heat import evaluate

    folder, _ = trained["smoe"]
    results = []
    for chunk in (10**6, 3):  # one forward per batch; then chunks of 3 with a partial last one
        monkeypatch.setattr(evaluate, "FORWARD_CHUNK", chunk)
        results.append(evaluate_checkpoint(folder / "best.pt", stores["val"], device="cpu"))
    whole, chunked = results
    # oneDNN's convolution picks another kernel for batches of 64 and more on some CPUs
    # (AVX-512: outputs 1 ulp apart); the workflow always evaluates the same way, so a
    # metric is reproducible, and chunking moves it by float32 rounding at most
    for name, value in whole["metrics"].items():
        assert chunked["metrics"][name] == pytest.approx(value, rel=1e-6, abs=1e-12), name
    assert chunked["routing"] == whole["routing"]
    assert whole["routing"]["agreement"] > 0
