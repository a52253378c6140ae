"""Checkpoints are read weights-only: what smoe writes loads, what could run code is refused."""

import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from smoe.config import validate_config
from smoe.core.errors import InputError
from smoe.core.train.checkpoint import (
    FORMAT,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_atomic,
    seed_everything,
)
from smoe.families.heat.config import model_spec
from smoe.families.heat.simulation import HeatParams
from smoe.families.heat.store import simulate_split
from smoe.families.heat.task import Trainer

PARAMS = HeatParams((0.0025, 0.025, 0.25), steps=6)


class RunsCode:
    """Unpickling this object runs ``source``: what a malicious checkpoint would hold."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self):
        return (exec, (self.source,))


def leaves_marker(marker) -> RunsCode:
    return RunsCode(f"import pathlib; pathlib.Path({str(marker)!r}).write_text('ran')")


def craft_checkpoint(path, marker):
    """A ``.pt`` that looks like smoe's own (right format, usual keys) but runs code."""
    payload = {
        "format": FORMAT,
        "spec": {"name": "cnn"},
        "model": {"weight": torch.zeros(2)},
        "val_metrics": {"mse": 0.0},
        "hook": leaves_marker(marker),
    }
    torch.save(payload, path)
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory, small_mask):
    folder = tmp_path_factory.mktemp("stores")
    return {
        split: simulate_split(
            small_mask, PARAMS, seed, runs, folder / f"{split}.zarr", split=split, progress=False
        )
        for split, seed, runs in [("train", 31, 4), ("val", 32, 2), ("test", 33, 2)]
    }


def make_spec(kind, options, **train_settings):
    settings = {"epochs": 2, "batch_size": 8, "threads": 1, "early_stop": 0, "stop_at": None}
    config = validate_config(
        {
            "models": {kind: {"kind": kind, "options": options}},
            "train": {**settings, **train_settings},
        }
    )
    return model_spec(config, kind)


def test_the_crafted_file_really_runs_code_when_unpickled_unsafely(tmp_path):
    # The premise of the tests below: this file is dangerous to a full unpickler.
    marker = tmp_path / "ran.txt"
    path = craft_checkpoint(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "ran"


def test_a_checkpoint_that_could_run_code_is_refused_unloaded(tmp_path):
    marker = tmp_path / "ran.txt"
    path = craft_checkpoint(tmp_path / "best.pt", marker)
    with pytest.raises(InputError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert str(path) in message
    assert "contains objects that a weights-only load refuses" in message
    assert "builtins.exec" in message and "could run code" in message
    assert "was not loaded" in message and "\n" not in message
    assert not marker.exists()


def test_evaluate_command_refuses_it_in_one_line(stores, tmp_path):
    marker = tmp_path / "ran.txt"
    path = craft_checkpoint(tmp_path / "best.pt", marker)
    out = tmp_path / "metrics.json"
    command = [sys.executable, "-m", "smoe", "evaluate", "--checkpoint", str(path)]
    command += ["--store", str(stores["test"]), "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("smoe evaluate: error: checkpoint ")
    assert str(path) in lines[0] and "weights-only load refuses" in lines[0]
    assert "Traceback" not in result.stderr
    assert not marker.exists() and not out.exists()


def test_checkpoints_of_the_old_format_ask_for_retraining(tmp_path):
    # Format 1 stored NumPy's RNG state as an array: refused before it is unpickled.
    old_last = tmp_path / "last.pt"
    torch.save({"format": 1, "rng": {"numpy": np.random.get_state()}}, old_last)
    with pytest.raises(InputError, match=r"last\.pt.*weights-only load refuses.*retrain"):
        load_checkpoint(old_last)
    # A format-1 best.pt holds nothing refused, but is of another format all the same.
    old_best = tmp_path / "best.pt"
    torch.save({"format": 1, "model": {}}, old_best)
    with pytest.raises(InputError, match=r"best\.pt.*has format 1.*reads format 2.*retrain"):
        load_checkpoint(old_best)
    not_ours = tmp_path / "other.pt"
    torch.save([torch.zeros(1)], not_ours)
    with pytest.raises(InputError, match=r"other\.pt.*not written by smoe"):
        load_checkpoint(not_ours)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=r"garbage\.pt.*not readable.*not loaded"):
        load_checkpoint(garbage)


def test_trainer_starts_fresh_over_an_old_or_unsafe_last_checkpoint(stores, tmp_path):
    spec = make_spec("cnn", {"hidden": [2]})
    for name, write in [
        ("old", lambda p: torch.save({"format": 1, "rng": np.random.get_state()}, p)),
        ("unsafe", lambda p: craft_checkpoint(p, tmp_path / "ran.txt")),
    ]:
        out = tmp_path / name
        out.mkdir()
        write(out / "last.pt")
        trainer = Trainer(spec, stores["train"], stores["val"], 0, out, progress=False)
        assert trainer._try_resume() is False
        assert trainer.state.epoch == 0
    assert not (tmp_path / "ran.txt").exists()


def rng_snapshot(generator):
    return (
        random.getstate(),
        np.random.get_state(legacy=False),
        torch.get_rng_state(),
        generator.get_state(),
    )


def assert_same_rng(a, b):
    assert a[0] == b[0]
    assert a[1]["bit_generator"] == b[1]["bit_generator"]
    np.testing.assert_array_equal(a[1]["state"]["key"], b[1]["state"]["key"])
    assert a[1]["state"]["pos"] == b[1]["state"]["pos"]
    assert (a[1]["has_gauss"], a[1]["gauss"]) == (b[1]["has_gauss"], b[1]["gauss"])
    assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])


def disturb(generator):
    random.random()
    np.random.standard_normal(3)
    torch.rand(5)
    torch.rand(5, generator=generator)


@pytest.mark.parametrize(
    "kind, options, scheduler",
    [
        ("cnn", {"hidden": [2]}, {"kind": "plateau"}),
        ("smoe", {"gate": "latent", "experts": 3, "k": 1, "rc_loss": True}, {"kind": "cosine"}),
    ],
)
def test_a_real_last_checkpoint_round_trips_weights_only(
    stores, tmp_path, kind, options, scheduler
):
    spec = make_spec(kind, options, scheduler=scheduler)
    trainer = Trainer(spec, stores["train"], stores["val"], 0, tmp_path, progress=False)
    trainer.run()
    # Nothing draws a random number between the final save and here.
    expected = rng_snapshot(trainer.generator)
    for name in ("last.pt", "best.pt"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / name)) == []
        torch.load(tmp_path / name, weights_only=True)  # plain torch agrees
    # Nothing was allow-listed beyond what torch registers for its own types.
    for entry in torch.serialization.get_safe_globals():
        allowed = entry[0] if isinstance(entry, tuple) else entry
        assert allowed.__module__.startswith("torch."), entry
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["format"] == FORMAT and saved["state"]["epoch"] == 2
    generator = torch.Generator().manual_seed(12345)
    disturb(generator)
    restore_rng(saved["rng"], generator)
    assert_same_rng(rng_snapshot(generator), expected)


def test_every_training_state_type_round_trips_weights_only(tmp_path):
    """Optimizers, both schedulers and an active gradient scaler, saved and restored."""
    generator = seed_everything(3)
    np.random.standard_normal()  # leaves a cached Gaussian in NumPy's legacy state
    assert np.random.get_state(legacy=False)["has_gauss"] == 1
    model = torch.nn.Conv2d(1, 2, 3)
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(adam, T_max=5)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(sgd, mode="min", patience=1)
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=8.0)
    for _ in range(2):
        for optimizer in (adam, sgd):
            optimizer.zero_grad()
            scaler.scale(model(torch.randn(2, 1, 5, 5)).square().mean()).backward()
            scaler.step(optimizer)
            scaler.update()
        cosine.step()
        plateau.step(1.0)
    objects = {"adam": adam, "sgd": sgd, "cosine": cosine, "plateau": plateau, "scaler": scaler}
    payload = {"format": FORMAT, **{k: v.state_dict() for k, v in objects.items()}}
    payload["rng"] = capture_rng(generator)
    expected = rng_snapshot(generator)
    save_atomic(payload, tmp_path / "state.pt")
    saved = load_checkpoint(tmp_path / "state.pt")
    assert saved["scaler"]["scale"] == scaler.get_scale()
    assert saved["plateau"]["best"] == plateau.best
    assert saved["adam"]["state"][0]["exp_avg"].equal(adam.state_dict()["state"][0]["exp_avg"])
    fresh = torch.optim.lr_scheduler.ReduceLROnPlateau(torch.optim.SGD(model.parameters()))
    fresh.load_state_dict(saved["plateau"])
    assert fresh.state_dict() == plateau.state_dict()
    disturb(generator)
    restore_rng(saved["rng"], generator)
    assert_same_rng(rng_snapshot(generator), expected)
