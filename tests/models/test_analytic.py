"""Analytic reference predictors: the true generator and the best single stencil."""

import json

import pytest
import torch

from smoe.config import validate_config
from smoe.core.errors import InputError
from smoe.families.heat.analytic import GeneratorPredictor, StencilPredictor
from smoe.families.heat.config import model_spec
from smoe.families.heat.dataset import HeatPairs
from smoe.families.heat.evaluate import evaluate_checkpoint
from smoe.families.heat.simulation import HeatParams
from smoe.families.heat.store import open_store, simulate_split
from smoe.families.heat.task import train

DIFFUSIVITY = (0.0025, 0.025, 0.25)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, small_mask):
    folder = tmp_path_factory.mktemp("analytic")
    paths = {}
    for boundary in ("zero", "wrap"):
        params = HeatParams(DIFFUSIVITY, steps=6, boundary=boundary)
        for split, seed, runs in (("train", 1, 2), ("val", 2, 2), ("test", 3, 2)):
            paths[boundary, split] = simulate_split(
                small_mask,
                params,
                seed,
                runs,
                folder / f"{boundary}-{split}.zarr",
                split=split,
                progress=False,
            )
    return paths


@pytest.mark.parametrize("boundary", ["zero", "wrap"])
def test_generator_reproduces_the_simulator_to_float32_precision(stores, small_mask, boundary):
    u = torch.from_numpy(open_store(stores[boundary, "test"])["u"].values)
    model = GeneratorPredictor(
        1,
        *small_mask.shape,
        mask=torch.from_numpy(small_mask),
        region_diffusivity=DIFFUSIVITY,
        boundary=boundary,
    )
    x, y = u[:, :-1].reshape(-1, 1, *small_mask.shape), u[:, 1:].reshape(-1, 1, *small_mask.shape)
    pred = model(x)
    # the simulator steps float64 fields and stores float32; from float32 inputs the step
    # lands within a few float32 ulps of the stored frame
    assert torch.allclose(pred, y, rtol=4e-7, atol=1e-9)
    assert not torch.allclose(x, y, rtol=1e-3, atol=0)  # the field does change


def test_a_single_stencil_is_the_generator_of_a_one_type_map():
    mask = torch.zeros(5, 6, dtype=torch.long)
    x = torch.rand(3, 1, 5, 6)
    stencil = StencilPredictor(1, 5, 6, diffusivity=0.1)
    generator = GeneratorPredictor(1, 5, 6, mask=mask, region_diffusivity=(0.1,))
    torch.testing.assert_close(stencil(x), generator(x), rtol=0, atol=0)
    with pytest.raises(InputError, match=r"in \[0, 0.25\]"):
        StencilPredictor(1, 5, 6, diffusivity=0.3)
    with pytest.raises(InputError, match="needs the data's region diffusivities"):
        StencilPredictor(1, 5, 6)


def spec_of(kind, **options):
    config = validate_config({"models": {kind: {"kind": kind, "options": options}}})
    return model_spec(config, kind)


def test_best_stencil_is_chosen_on_validation_and_carried_to_evaluation(stores, tmp_path):
    train_store, val_store = stores["zero", "train"], stores["zero", "val"]
    summary = train(spec_of("stencil"), train_store, val_store, 0, tmp_path, progress=False)
    scores = {}
    for a in DIFFUSIVITY:  # each candidate's validation score, computed here directly
        pairs = HeatPairs(val_store)
        x = torch.stack([pairs[i][0] for i in range(len(pairs))])
        y = torch.stack([pairs[i][1] for i in range(len(pairs))])
        pred = StencilPredictor(1, *x.shape[-2:], diffusivity=a)(x)
        scores[a] = 100 * float(((pred - y).abs() <= 1e-8 + 0.01 * y.abs()).double().mean())
    best = max(scores, key=scores.get)
    assert len(set(scores.values())) == 3  # the candidates really differ
    assert summary["best_value"] == pytest.approx(scores[best], abs=1e-9)
    assert summary["stop_reason"].endswith(f"chose {best} of {list(DIFFUSIVITY)} on validation")
    result = evaluate_checkpoint(tmp_path / "best.pt", stores["zero", "test"])
    saved = torch.load(tmp_path / "best.pt", weights_only=True)
    assert float(saved["model"]["diffusivity"]) == best
    assert result["params"] == 0 and result["kind"] == "stencil"
    assert json.dumps(result)  # JSON-able as the workflow writes it


def test_generator_scores_100_percent_on_test(stores, tmp_path):
    train(
        spec_of("generator"),
        stores["wrap", "train"],
        stores["wrap", "val"],
        0,
        tmp_path,
        progress=False,
    )
    result = evaluate_checkpoint(tmp_path / "best.pt", stores["wrap", "test"])
    assert result["metrics"]["prcntclose1.0"] == 100.0
    assert result["metrics"]["prcntclose1.0s"] == 100.0
    assert result["metrics"]["mse"] < 1e-14
