"""Multi-process training under torchrun: 2 CPU processes (gloo) give one process's results
with the same global batch (to 1e-5), checkpoints hold nothing rank-specific and resume
under another number of processes, and what cannot be shared out is refused by name.

Each torchrun launch starts two Python processes; the trainings themselves are tiny."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from smoe.config import validate_config
from smoe.core.errors import InputError
from smoe.core.train import distributed
from smoe.core.train.loop import INTERRUPT_ENV, TaskTrainer, TrainingTask
from smoe.families.clusters.task import ClusterTask
from smoe.families.gated.store import write_image_split
from smoe.families.gated.task import train_gated
from smoe.families.heat.config import model_spec
from smoe.families.heat.dataset import HeatPairs
from smoe.families.heat.simulation import HeatParams
from smoe.families.heat.store import simulate_split
from smoe.families.heat.task import train

PARAMS = HeatParams((0.0025, 0.025, 0.25), steps=8)
PAPER_SMOE = {"gate": "latent", "experts": 3, "k": 1, "rc_loss": True, "damping": True}
ATOL = 1e-5


@pytest.fixture(scope="module")
def heat(tmp_path_factory, small_mask):
    folder = tmp_path_factory.mktemp("heat")
    return {
        split: simulate_split(
            small_mask, PARAMS, seed, runs, folder / f"{split}.zarr", split=split, progress=False
        )
        for split, seed, runs in [("train", 11, 6), ("val", 12, 2)]
    }


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    return {
        split: write_image_split("digits", None, split, 0, 0.1, folder / f"{split}.zarr")
        for split in ("train", "val")
    }


def heat_spec(kind, options, **train_settings):
    settings = {"epochs": 3, "batch_size": 5, "threads": 1, "early_stop": 0, "stop_at": None}
    config = validate_config(
        {"models": {kind: {"kind": kind, "options": options}}, "train": settings | train_settings}
    )
    return model_spec(config, kind)


def gated_spec(**options):
    # 1,294 training images in batches of 99: shares of 50 and 49, a last batch of 7 (4 + 3)
    train = {"epochs": 3, "batch_size": 99, "lr": 0.01, "progress": False}
    return {
        "name": "moe",
        "kind": "gated_moe",
        "options": {"experts": 4, **options},
        "train": train,
    }


def torchrun(args, processes=2, env=None, check=True):
    """``torchrun --standalone --nproc-per-node N -m smoe ARGS``, one thread per process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", str(processes), "-m", "smoe", *args, "--no-progress"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def heat_args(spec, stores, out, seed=0):
    return [
        "train",
        "--spec",
        spec.to_json(),
        "--train-store",
        str(stores["train"]),
        "--val-store",
        str(stores["val"]),
        "--seed",
        str(seed),
        "--out",
        str(out),
    ]


def gated_args(spec, stores, out, seed=0):
    return [
        "gated-train",
        "--spec",
        json.dumps(spec),
        "--train-store",
        str(stores["train"]),
        "--val-store",
        str(stores["val"]),
        "--seed",
        str(seed),
        "--out",
        str(out),
    ]


def rows(folder):
    with open(folder / "history.csv", newline="") as handle:
        return [{k: v for k, v in row.items() if k != "time_s"} for row in csv.DictReader(handle)]


def assert_same_run(folder, reference):
    """The same epochs, selection, metrics (1e-5) and weights (1e-5) as ``reference``."""
    got, want = rows(folder), rows(reference)
    assert [r.keys() for r in got] == [r.keys() for r in want]
    for a, b in zip(got, want, strict=True):
        for key in a:
            assert float(a[key]) == pytest.approx(float(b[key]), rel=ATOL, abs=ATOL), key
    summary = json.loads((folder / "train.json").read_text())
    expected = json.loads((reference / "train.json").read_text())
    for key in ("epochs", "best_epoch", "stop_reason", "select_metric"):
        assert summary[key] == expected[key], key
    assert summary["val_metrics"] == pytest.approx(expected["val_metrics"], rel=ATOL, abs=ATOL)
    for name in ("best.pt", "last.pt"):
        a = torch.load(folder / name, weights_only=True)["model"]
        b = torch.load(reference / name, weights_only=True)["model"]
        assert list(a) == list(b) and not any(k.startswith("module.") for k in a)
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=ATOL, rtol=0, msg=key)


# -- helpers, in one process ------------------------------------------------------------


def test_shares_are_contiguous_and_cover_the_batch():
    for n in (1, 5, 7, 99):
        for size in (1, 2, 3):
            if n < size:
                continue
            bounds = [distributed.share(n, distributed.World(r, size)) for r in range(size)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
            assert [b - a for a, b in bounds] == distributed.share_sizes(n, size)


def test_shared_batches_are_the_one_process_batches_cut(heat):
    data = HeatPairs(heat["train"])
    whole = list(data.batches(5, True, torch.Generator().manual_seed(3)))
    parts = [
        list(data.batches(5, True, torch.Generator().manual_seed(3), part=(r, 2))) for r in (0, 1)
    ]
    for batch, first, second in zip(whole, *parts, strict=True):
        assert len(first[0]) - len(second[0]) in (0, 1)
        assert torch.equal(batch[0], torch.cat([first[0], second[0]]))
        assert torch.equal(batch[1], torch.cat([first[1], second[1]]))


def test_launch_command_for_the_rules():
    assert distributed.smoe_command(1) == "smoe"
    assert distributed.smoe_command(4) == "torchrun --standalone --nproc-per-node 4 -m smoe"
    with pytest.raises(InputError, match="positive integer"):
        distributed.smoe_command(0)


def test_a_minibatch_smaller_than_the_processes_is_refused():
    world = distributed.World(0, 2)
    distributed.check_batches(42, 5, world, "model 'm'")  # last batch of 2: 1 + 1
    with pytest.raises(InputError, match="model 'm': with 2 processes .* holds 1 .*batch_size 5"):
        distributed.check_batches(41, 5, world, "model 'm'")


class _FullBatch(TrainingTask):
    pass


def test_full_batch_families_refuse_several_processes(monkeypatch, tmp_path):
    assert ClusterTask.multi_process is False
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    spec = heat_spec("cnn", {"hidden": [2]})
    with pytest.raises(InputError, match="trains on one process only .* without torchrun"):
        TaskTrainer(_FullBatch(spec), 0, tmp_path)


class _Identity(TrainingTask):
    def identity_spec(self):
        return {**self.spec.to_dict(), "train": {**self.spec.train, "processes": 2}}

    def data_provenance(self):
        return {}


def test_process_count_is_not_part_of_the_identity():
    spec = heat_spec("cnn", {"hidden": [2]})
    trainer = TaskTrainer.__new__(TaskTrainer)  # only the identity is asked for
    trainer.task, trainer.seed = _Identity(spec), 0
    assert spec.train["processes"] == 1  # train.processes is a config key (default 1) ...
    expected = spec.to_dict()
    expected["train"] = {k: v for k, v in spec.train.items() if k != "processes"}
    assert trainer._identity()["spec"] == expected  # ... that a resumed run may change


# -- two processes against one ------------------------------------------------------------


def test_heat_smoe_on_two_processes_matches_one(heat, tmp_path):
    # RC loss and damping: routing decisions from the share's gradient, told its weight;
    # 48 pairs in batches of 5: shares of 3 and 2, a last batch of 3 (2 + 1).
    spec = heat_spec("smoe", dict(PAPER_SMOE))
    train(spec, heat["train"], heat["val"], 0, tmp_path / "one", progress=False)
    torchrun(heat_args(spec, heat, tmp_path / "two"))
    assert_same_run(tmp_path / "two", tmp_path / "one")
    assert {p.name for p in (tmp_path / "two").iterdir()} == {
        "best.pt",
        "last.pt",
        "history.csv",
        "train.json",
    }


def test_batchnorm_run_stopped_on_two_processes_resumes_on_one(heat, tmp_path):
    # a CNN with batch norm (statistics of the whole global batch), stopped after epoch 1
    # under 2 processes as a killed job would be, finished in one process
    spec = heat_spec("cnn", {"hidden": [2], "batchnorm": True}, epochs=3, batch_size=7)
    train(spec, heat["train"], heat["val"], 0, tmp_path / "one", progress=False)
    out = tmp_path / "two"
    stopped = torchrun(heat_args(spec, heat, out), env={INTERRUPT_ENV: "1"}, check=False)
    assert stopped.returncode != 0
    assert torch.load(out / "last.pt", weights_only=True)["state"]["epoch"] == 1
    assert not (out / "train.json").exists()
    summary = train(spec, heat["train"], heat["val"], 0, out, progress=False)
    assert summary["resumed_from_epoch"] == 1
    assert_same_run(out, tmp_path / "one")


def test_gated_moe_with_importance_on_two_processes_matches_one(digits, tmp_path):
    spec = gated_spec(importance=0.5)
    train_gated(spec, digits["train"], digits["val"], 0, tmp_path / "one", progress=False)
    torchrun(gated_args(spec, digits, tmp_path / "two"))
    assert_same_run(tmp_path / "two", tmp_path / "one")


def test_stochastic_attentive_moe_with_similarity_on_two_processes(digits, tmp_path):
    # routes drawn on the whole batch from the trainer's generator; the gate's own last
    # layer is unused when attentive; the similarity loss sees every pair of the batch
    spec = gated_spec(
        variant="stochastic", attentive=True, similarity={"beta_s": 1.0, "beta_d": 0.5}
    )
    train_gated(spec, digits["train"], digits["val"], 0, tmp_path / "one", progress=False)
    torchrun(gated_args(spec, digits, tmp_path / "two"))
    assert_same_run(tmp_path / "two", tmp_path / "one")


def test_gated_run_stopped_on_one_process_resumes_on_two(digits, tmp_path, monkeypatch):
    spec = gated_spec(importance=0.5)
    train_gated(spec, digits["train"], digits["val"], 0, tmp_path / "one", progress=False)
    out = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        patch.setenv(INTERRUPT_ENV, "2")
        with pytest.raises(KeyboardInterrupt):
            train_gated(spec, digits["train"], digits["val"], 0, out, progress=False)
    torchrun(gated_args(spec, digits, out))
    assert json.loads((out / "train.json").read_text())["resumed_from_epoch"] == 2
    assert_same_run(out, tmp_path / "one")
