"""`smoe gated-*` by hand: what they write, and bad input refused in one line, status 2,
nothing changed (the files a user points at, the seeds, the models a model builds on)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from command_runs import assert_refused, smoe

from smoe.families.gated.store import open_image_split, write_image_split

SPEC = {
    "name": "moe",
    "kind": "gated_moe",
    "options": {"experts": 3},
    "train": {"epochs": 2, "batch_size": 64, "lr": 0.01},
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """Digits stores and one trained two-seed MoE (copied for each case, never changed)."""
    root = tmp_path_factory.mktemp("pristine_gated")
    for split in ("train", "val", "test"):
        write_image_split("digits", None, split, 0, 0.1, root / f"{split}.zarr")
    result = smoe(root, *run_args(json.dumps(SPEC), "moe", "0", "1"))
    assert result.returncode == 0, result.stderr
    return root


def run_args(spec: str, name: str, *seeds: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        "gated-run",
        "--spec",
        spec,
        "--train-store",
        "train.zarr",
        "--val-store",
        "val.zarr",
        "--test-store",
        "test.zarr",
        "--seeds",
        *seeds,
        "--models-dir",
        f"models/{name}",
        "--metrics-dir",
        f"metrics/{name}",
        "--no-progress",
        *extra,
    ]


def test_gated_run_writes_every_seed_and_a_distilled_model_uses_its_teacher(work):
    for seed in (0, 1):
        metrics = json.loads((work / f"metrics/moe/seed{seed}.json").read_text())
        assert metrics["seed"] == seed and metrics["experts"] == 3
    distilled = {"name": "d", "kind": "gated_distilled", "options": {"teacher": "moe"}}
    distilled["train"] = SPEC["train"]
    result = smoe(
        work, *run_args(json.dumps(distilled), "d", "1", extra=("--teacher-dir", "models/moe"))
    )
    assert result.returncode == 0, result.stderr
    assert "d seed 1: test accuracy" in result.stdout
    metrics = json.loads((work / "metrics/d/seed1.json").read_text())
    assert metrics["kind"] == "gated_distilled" and metrics["experts"] == 3


def idx(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_gated_data_converts_gzipped_mnist_files(work):
    folder = work / "mnist"
    folder.mkdir()
    for prefix, n in (("train", 20), ("t10k", 6)):
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as handle:
            handle.write(idx(np.full((n, 28, 28), 7), 2051))
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as handle:
            handle.write(idx(np.arange(n) % 10, 2049))
    args = ["gated-data", "--dataset", "mnist", "--folder", "mnist", "--split", "val"]
    result = smoe(work, *args, "--val-fraction", "0.25", "--out", "mnist_val.zarr")
    assert result.returncode == 0, result.stderr
    data = open_image_split(work / "mnist_val.zarr")
    assert len(data) == 5 and data.image.shape[1:] == (28, 28) and data.dataset == "mnist"


def bad_cases() -> list[tuple[str, list[str], str]]:
    moe = json.dumps(SPEC)
    return [
        (
            "gated-data",
            ["gated-data", "--dataset", "mnist", "--folder", "nowhere", "--split", "train"]
            + ["--out", "x.zarr"],
            "mnist folder 'nowhere' does not exist",
        ),
        (
            "gated-data",
            ["gated-data", "--dataset", "digits", "--split", "train", "--out", "train.zarr"],
            "train.zarr",
        ),
        (
            "gated-run",
            run_args(
                json.dumps({"name": "d", "kind": "gated_distilled", "options": {"teacher": "moe"}}),
                "d",
                "0",
                "7",
                extra=("--teacher-dir", "models/moe"),
            ),
            "has no trained model for seed(s) 7",
        ),
        (
            "gated-run",
            run_args(json.dumps({**SPEC, "options": {"experts": 2, "top_k": 3}}), "m", "0"),
            "top_k",
        ),
        ("gated-run", run_args(moe, "m", "0", "0"), "--seeds lists a seed twice"),
        ("gated-run", run_args("{not json", "m", "0"), "--spec is not JSON"),
        (
            "gated-evaluate",
            ["gated-evaluate", "--checkpoint", "none.pt", "--store", "test.zarr"]
            + ["--out", "m.json"],
            "checkpoint 'none.pt' does not exist",
        ),
        (
            "gated-evaluate",
            ["gated-evaluate", "--checkpoint", "models/moe/seed0/best.pt", "--store"]
            + ["train.zarr", "--out", "m.json"],
            "holds the train split, not test",
        ),
    ]


@pytest.mark.parametrize(
    "verb, args, expect", bad_cases(), ids=[f"{c[0]}-{i}" for i, c in enumerate(bad_cases())]
)
def test_gated_commands_refuse_bad_input(work, verb, args, expect):
    assert_refused(work, verb, args, expect)


def test_processes_starts_the_command_under_torchrun_with_one_processs_results(work):
    spec = json.dumps({**SPEC, "options": {"experts": 3, "importance": 0.2}})
    one = smoe(work, *run_args(spec, "one", "0"))
    two = smoe(work, *run_args(spec, "two", "0", extra=("--processes", "2")))
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("seed 0: test accuracy") == 1  # rank 0 speaks for both
    a = json.loads((work / "metrics/one/seed0.json").read_text())["metrics"]
    b = json.loads((work / "metrics/two/seed0.json").read_text())["metrics"]
    assert a["test_accuracy"] == b["test_accuracy"]
    for key in ("mutual_information", "usage_entropy", "sample_entropy"):
        assert abs(a[key] - b[key]) < 1e-5, key
