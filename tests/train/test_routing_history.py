"""Routing agreement per epoch in the training history: values, independence from what is
learned, resuming, models without SMoE layers, and the routing tally's counting."""

import csv
import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from smoe.config import validate_config
from smoe.families.heat.config import model_spec
from smoe.families.heat.dataset import HeatPairs, Normalizer, loader
from smoe.families.heat.evaluate import RoutingTally, evaluate_checkpoint
from smoe.families.heat.registry import build_model
from smoe.families.heat.simulation import HeatParams
from smoe.families.heat.store import simulate_split
from smoe.families.heat.task import Trainer, train
from smoe.nn.layer import smoe_layers

PARAMS = HeatParams((0.0025, 0.025, 0.25), steps=8)
PAPER_SMOE = {
    "gate": "latent",
    "experts": 3,
    "k": 1,
    "rc_loss": True,
    "damping": True,
    "quantile": 0.3,
}
ROUTING_COLUMNS = ("val_routing_agreement", "val_map_agreement")
ROUTING_METRICS = ("routing_agreement", "map_agreement")


@pytest.fixture(scope="module")
def stores(tmp_path_factory, small_mask):
    folder = tmp_path_factory.mktemp("stores")
    paths = {}
    for split, seed, runs in [("train", 31, 6), ("val", 32, 2)]:
        paths[split] = simulate_split(
            small_mask, PARAMS, seed, runs, folder / f"{split}.zarr", split=split, progress=False
        )
    return paths


def make_spec(kind="smoe", options=None, **train_settings):
    settings = {"epochs": 4, "batch_size": 8, "threads": 1, "early_stop": 0, "stop_at": None}
    config = validate_config(
        {
            "models": {kind: {"kind": kind, "options": options or {}}},
            "train": {**settings, **train_settings},
        }
    )
    return model_spec(config, kind)


def smoe_spec(**train_settings):
    # A gate learning rate large enough that the routing changes within 4 tiny epochs.
    return make_spec("smoe", dict(PAPER_SMOE), gate_lr=0.3, **train_settings)


def run(spec, stores, out):
    return train(spec, stores["train"], stores["val"], 0, out, progress=False)


def read_history(folder):
    with open(folder / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def without(rows, columns):
    return [{k: v for k, v in row.items() if k not in columns} for row in rows]


def load(path):
    return torch.load(path, weights_only=False)


def assert_same_state(a, b, where="state"):
    """Nested dicts, lists and tensors equal to the bit."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{where}[{index}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def trained(stores, tmp_path_factory):
    folder = tmp_path_factory.mktemp("smoe")
    return folder, run(smoe_spec(), stores, folder)


def recomputed_agreement(checkpoint, store, mask):
    """Routing agreement of a checkpoint's weights on a store, without RoutingTally: every
    point's top-1 expert counted with numpy, the best matching found by brute force."""
    saved = load(checkpoint)
    info, spec = saved["data"], saved["spec"]
    model = build_model(
        spec["kind"],
        spec["options"],
        info["in_channels"],
        info["height"],
        info["width"],
        mask=info["mask"],
        region_diffusivity=tuple(info["diffusivity"]),
    )
    model.load_state_dict(saved["model"])
    model.eval()
    layer = smoe_layers(model)[-1]
    dataset = HeatPairs(store, normalizer=Normalizer.from_dict(info["normalizer"]))
    experts, types = layer.routing.experts, int(mask.max()) + 1
    per_point = np.zeros((experts, *mask.shape), dtype=np.int64)
    with torch.no_grad():
        for x, _ in loader(dataset, 5, shuffle=False, generator=None):
            model(x)
            chosen = layer.last_selection[:, 0].numpy()
            for expert in range(experts):
                per_point[expert] += (chosen == expert).sum(0)
    confusion = np.array(
        [[per_point[e][mask == t].sum() for t in range(types)] for e in range(experts)]
    )
    best, matching = max(
        (sum(confusion[e, t] for t, e in enumerate(chosen)), chosen)
        for chosen in itertools.permutations(range(experts), types)
    )
    to_type = np.full(experts, -1)
    to_type[list(matching)] = range(types)
    map_agreement = 100.0 * np.mean(to_type[per_point.argmax(0)] == mask)
    return 100.0 * best / confusion.sum(), map_agreement, confusion


def test_smoe_history_has_the_routing_agreement_of_every_epoch(trained):
    folder, summary = trained
    rows = read_history(folder)
    assert len(rows) == 4
    for column in ROUTING_COLUMNS:
        values = [float(row[column]) for row in rows]
        # The best of the 3! matchings counts at least a third of the points.
        assert all(100 / 3 - 1e-9 <= value <= 100 for value in values), (column, values)
    agreement = [float(row["val_routing_agreement"]) for row in rows]
    assert len(set(agreement)) > 1, "the routing should change while the gate learns"
    # train.json and best.pt report them for the best epoch, like every other val metric.
    best = rows[summary["best_epoch"]]
    for metric in ROUTING_METRICS:
        assert summary["val_metrics"][metric] == float(best[f"val_{metric}"])
    assert load(folder / "best.pt")["val_metrics"] == summary["val_metrics"]


def test_final_epoch_agreement_equals_an_independent_recomputation(trained, stores, small_mask):
    folder, _ = trained
    final = read_history(folder)[-1]
    agreement, map_agreement, confusion = recomputed_agreement(
        folder / "last.pt", stores["val"], small_mask
    )
    assert confusion.sum() == 2 * PARAMS.steps * small_mask.size  # 2 runs of 8 pairs
    assert float(final["val_routing_agreement"]) == pytest.approx(agreement, rel=1e-12)
    # RoutingTally averages the map in float32.
    assert float(final["val_map_agreement"]) == pytest.approx(map_agreement, rel=1e-6)


def test_best_epoch_agreement_equals_the_evaluation_of_best_pt(trained, stores, small_mask):
    folder, summary = trained
    best = read_history(folder)[summary["best_epoch"]]
    routing = evaluate_checkpoint(folder / "best.pt", stores["val"], device="cpu")["routing"]
    assert float(best["val_routing_agreement"]) == routing["agreement"]
    assert float(best["val_map_agreement"]) == routing["map_agreement"]
    agreement, _, confusion = recomputed_agreement(folder / "best.pt", stores["val"], small_mask)
    np.testing.assert_array_equal(np.asarray(routing["confusion"]), confusion)
    assert routing["agreement"] == pytest.approx(agreement, rel=1e-12)


def test_the_routing_columns_change_nothing_learned(trained, stores, tmp_path, monkeypatch):
    """The same training without the tally: same weights, optimizer state, selection and
    metrics; only the routing columns are missing."""
    folder, summary = trained
    monkeypatch.setattr(Trainer, "_routing_tally", lambda self: None)
    plain = run(smoe_spec(), stores, tmp_path)
    rows, plain_rows = read_history(folder), read_history(tmp_path)
    assert not set(ROUTING_COLUMNS) & set(plain_rows[0])
    assert without(rows, (*ROUTING_COLUMNS, "time_s")) == without(plain_rows, ("time_s",))
    for key in ("epochs", "best_epoch", "best_value", "stop_reason"):
        assert plain[key] == summary[key], key
    expected = {k: v for k, v in summary["val_metrics"].items() if k not in ROUTING_METRICS}
    assert plain["val_metrics"] == expected
    assert_same_state(load(tmp_path / "best.pt")["model"], load(folder / "best.pt")["model"])
    ours, theirs = load(folder / "last.pt"), load(tmp_path / "last.pt")
    for part in ("model", "optimizer", "scheduler", "rng"):
        assert_same_state(ours[part], theirs[part], part)


class Interrupted(Exception):
    pass


def test_a_resumed_history_has_the_routing_columns_for_every_epoch(
    trained, stores, tmp_path, monkeypatch
):
    folder, summary = trained
    validate, calls = Trainer._validate, []

    def interrupt_third_validation(self):
        calls.append(1)
        if len(calls) == 3:
            raise Interrupted
        return validate(self)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_validate", interrupt_third_validation)
        with pytest.raises(Interrupted):
            run(smoe_spec(), stores, tmp_path)
    saved = load(tmp_path / "last.pt")["state"]["history"]
    assert len(saved) == 2 and all(column in saved[0] for column in ROUTING_COLUMNS)
    resumed = run(smoe_spec(), stores, tmp_path)
    assert resumed["resumed_from_epoch"] == 2
    rows = read_history(tmp_path)
    assert all(row[column] != "" for row in rows for column in ROUTING_COLUMNS)
    assert without(rows, ("time_s",)) == without(read_history(folder), ("time_s",))
    assert resumed["val_metrics"] == summary["val_metrics"]


@pytest.mark.parametrize("kind", ["cnn", "persistence"])
def test_models_without_smoe_layers_get_no_routing_columns(stores, tmp_path, kind):
    options = {"hidden": [2]} if kind == "cnn" else {}
    summary = run(make_spec(kind, options, epochs=1), stores, tmp_path)
    assert not set(ROUTING_COLUMNS) & set(read_history(tmp_path)[0])
    assert not set(ROUTING_METRICS) & set(summary["val_metrics"])
    on_disk = json.loads((tmp_path / "train.json").read_text())
    assert not set(ROUTING_METRICS) & set(on_disk["val_metrics"])


def one_hot_count(selections, experts):
    """The tally's former counting: a one-hot per point, summed over the batch."""
    count = 0
    for chosen in selections:
        one_hot = torch.nn.functional.one_hot(chosen[:, 0], experts)
        count = count + one_hot.sum(0).permute(2, 0, 1)
    return count


@pytest.mark.parametrize(("experts", "k"), [(3, 1), (5, 2)])
def test_tally_counts_like_a_one_hot_sum(experts, k):
    generator = torch.Generator().manual_seed(experts)
    mask = torch.randint(0, 3, (7, 6), generator=generator)
    layer = SimpleNamespace(routing=SimpleNamespace(experts=experts), last_selection=None)
    tally = RoutingTally(layer, mask)
    selections = []
    for batch in (4, 1, 9):
        scores = torch.rand(batch, experts, 7, 6, generator=generator)
        layer.last_selection = scores.topk(k, dim=1).indices
        selections.append(layer.last_selection)
        tally.update()
    expected = one_hot_count(selections, experts)
    assert tally.per_point.dtype == torch.long
    assert torch.equal(tally.per_point, expected)
    assert int(tally.per_point.sum()) == 14 * mask.numel()
    summary = tally.summary()
    confusion = np.array(
        [[int(expected[e][mask == t].sum()) for t in range(3)] for e in range(experts)]
    )
    np.testing.assert_array_equal(np.asarray(summary["confusion"]), confusion)


def test_tally_refuses_a_routing_of_another_grid():
    layer = SimpleNamespace(
        routing=SimpleNamespace(experts=3), last_selection=torch.zeros(2, 1, 6, 7).long()
    )
    with pytest.raises(ValueError, match=r"grid \(6, 7\).*region map \(7, 6\)"):
        RoutingTally(layer, torch.zeros(7, 6)).update()
