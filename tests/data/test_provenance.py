"""A store that no longer matches how it was made, or data from other physics, is refused."""

import subprocess
import sys

import pytest
import zarr

from smoe.config import validate_config
from smoe.core.errors import InputError
from smoe.families.heat.config import model_spec
from smoe.families.heat.dataset import HeatPairs
from smoe.families.heat.simulation import HeatParams
from smoe.families.heat.store import simulate_split
from smoe.families.heat.task import train

PARAMS = HeatParams((0.0025, 0.025, 0.25), steps=4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_mask):
    folder = tmp_path_factory.mktemp("provenance")
    stores = {
        split: simulate_split(
            small_mask, PARAMS, seed, 2, folder / f"{split}.zarr", split=split, progress=False
        )
        for split, seed in (("train", 1), ("val", 2), ("test", 3))
    }
    config = validate_config(
        {"models": {"cnn": {"kind": "cnn"}}, "train": {"epochs": 1, "batch_size": 8}}
    )
    train(
        model_spec(config, "cnn"), stores["train"], stores["val"], 0, folder / "cnn", progress=False
    )
    return folder, stores


def evaluate(folder, store):
    command = [
        sys.executable,
        "-m",
        "smoe",
        "evaluate",
        "--checkpoint",
        str(folder / "cnn" / "best.pt"),
        "--store",
        str(store),
        "--out",
        str(folder / "metrics.json"),
    ]
    return subprocess.run(command, capture_output=True, text=True)


def test_a_store_edited_after_it_was_written_is_refused(trained, tmp_path, small_mask):
    folder, _ = trained
    edited = simulate_split(small_mask, PARAMS, 3, 2, tmp_path / "test.zarr", progress=False)
    zarr.open_array(edited / "diffusivity", mode="r+")[2] = 0.2
    with pytest.raises(
        InputError,
        match=r"diffusivity variable \[0.0025, 0.025, 0.2\] differs "
        r"from its record \[0.0025, 0.025, 0.25\]",
    ):
        HeatPairs(edited)
    result = evaluate(folder, edited)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"smoe evaluate: error: store '{edited}' cannot be used")
    assert not (folder / "metrics.json").exists()


def test_test_data_from_other_physics_is_refused(trained, tmp_path, small_mask):
    folder, _ = trained
    other = HeatParams((0.0025, 0.025, 0.2), steps=4)
    store = simulate_split(small_mask, other, 3, 2, tmp_path / "other.zarr", progress=False)
    result = evaluate(folder, store)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        "has diffusivity [0.0025, 0.025, 0.2] but the model was trained on diffusivity "
        "[0.0025, 0.025, 0.25]" in result.stderr
    )
    wrapped = simulate_split(
        small_mask,
        HeatParams(PARAMS.diffusivity, steps=4, boundary="wrap"),
        3,
        2,
        tmp_path / "wrap.zarr",
        progress=False,
    )
    result = evaluate(folder, wrapped)
    assert result.returncode == 2 and "has boundary wrap but" in result.stderr


def test_the_matching_test_store_is_evaluated(trained):
    folder, stores = trained
    result = evaluate(folder, stores["test"])
    assert result.returncode == 0, result.stderr
    assert (folder / "metrics.json").exists()
