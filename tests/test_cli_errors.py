"""Bad input to the real `smoe` command: one error line, exit status 2, nothing changed.

Every case runs `python -m smoe ...` as a subprocess in a fresh copy of a small workspace
(a region map, train and val stores, a trained model, its metrics, history and predictions)
and checks that stderr is exactly one line ``smoe VERB: error: ...`` naming the problem,
that there is no traceback, that the exit status is 2, and that every file and folder of
the workspace is byte-identical afterwards (and nothing new appeared).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from command_runs import assert_refused, smoe, snapshot

from smoe.config import validate_config
from smoe.core.report.results import write_json
from smoe.families.heat.config import model_spec
from smoe.families.heat.evaluate import evaluate_checkpoint
from smoe.families.heat.simulation import HeatParams
from smoe.families.heat.store import simulate_split
from smoe.families.heat.task import train

pytestmark = pytest.mark.slow

PARAMS = HeatParams((0.0025, 0.025, 0.25), steps=6)
CHECKPOINT = "models/cnn/seed0/best.pt"
HISTORY = "models/cnn/seed0/history.csv"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, small_mask) -> Path:
    """The workspace every case starts from (copied, never changed)."""
    root = tmp_path_factory.mktemp("pristine")
    np.save(root / "mask.npy", small_mask)
    for split, seed, runs in (("train", 1, 5), ("val", 2, 2)):
        simulate_split(
            small_mask,
            PARAMS,
            seed,
            runs,
            root / f"{split}.zarr",
            split=split,
            runs_per_chunk=2,
            progress=False,
        )
    config = validate_config(
        {
            "models": {"cnn": {"kind": "cnn", "options": {"hidden": []}}},
            "train": {"epochs": 1, "batch_size": 8, "threads": 1},
        }
    )
    spec = model_spec(config, "cnn")
    (root / "spec.json").write_text(spec.to_json())
    train(spec, root / "train.zarr", root / "val.zarr", 0, root / "models/cnn/seed0", False)
    result = evaluate_checkpoint(
        root / CHECKPOINT, root / "val.zarr", "cpu", None, root / "predictions.nc"
    )
    write_json(result, root / "metrics.json")
    (root / "afile").write_text("a file, not a folder\n")
    (root / "notes.zarr").write_text("a file named like a store\n")
    (root / "folder.zarr").mkdir()
    (root / "folder.zarr" / "keep.txt").write_text("a folder that is not a store\n")
    return root


def _drop_root_override() -> None:
    """In the child: lose root's power to write anywhere (CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH leave the bounding set, so the exec'd python never has them)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            os._exit(97)


def smoe_as_user(work: Path, *args: str, honour_permissions: bool = False):
    """`smoe ARGS`, as a user that file permissions apply to when asked (root otherwise
    writes anywhere)."""
    preexec = _drop_root_override if honour_permissions and os.geteuid() == 0 else None
    return smoe(work, *args, preexec_fn=preexec)


def assert_refused_as_user(work: Path, verb: str, args, expect: str, honour_permissions=False):
    """:func:`command_runs.assert_refused` as a user that file permissions apply to, when
    asked."""

    def run(folder, *words):
        return smoe_as_user(folder, *words, honour_permissions=honour_permissions)

    return assert_refused(work, verb, args, expect, run=run)


def spec_json(work: Path, **data) -> str:
    spec = json.loads((work / "spec.json").read_text())
    spec["data"].update(data)
    return json.dumps(spec)


def train_args(work: Path, out: str = "out", **data) -> list[str]:
    spec = spec_json(work, **data)
    return ["train", "--spec", spec, "--train-store", "train.zarr", "--val-store", "val.zarr"] + [
        "--seed",
        "0",
        "--out",
        out,
        "--no-progress",
    ]


def evaluate_args(out: str = "m.json", *extra: str) -> list[str]:
    return ["evaluate", "--checkpoint", CHECKPOINT, "--store", "val.zarr", "--out", out, *extra]


def simulate_args(out: str, *extra: str) -> list[str]:
    return [
        "simulate",
        "--mask",
        "mask.npy",
        "--runs",
        "2",
        "--seed",
        "5",
        "--steps",
        "6",
        "--no-progress",
        "--out",
        out,
        *extra,
    ]


# --- outputs that cannot be written --------------------------------------------------------

OUTPUT_UNDER_A_FILE = {
    "mask": ["mask", "--height", "8", "--width", "8", "--out", "afile/m.npy"],
    "mask-png": [
        "mask",
        "--height",
        "8",
        "--width",
        "8",
        "--out",
        "m.npy",
        "--png",
        "afile/a/m.png",
    ],
    "simulate": simulate_args("afile/new.zarr"),
    "export": ["export", "val.zarr", "afile/val.nc", "--no-progress"],
    "train": None,  # built from the workspace's spec
    "evaluate": evaluate_args("afile/m.json"),
    "evaluate-predictions": evaluate_args("m.json", "--predictions", "afile/p.nc"),
    "aggregate": ["aggregate", "metrics.json", "--out-dir", "afile/tables"],
    "figure": ["figure", "bars", "--metrics", "metrics.json", "--out", "afile/bars.png"],
}


@pytest.mark.parametrize("case", list(OUTPUT_UNDER_A_FILE))
def test_output_whose_parent_is_a_file(work, case):
    args = OUTPUT_UNDER_A_FILE[case] or train_args(work, "afile/cnn")
    assert_refused(work, args[0], args, "'afile' is a file, not a folder")


@pytest.fixture
def read_only(work) -> Path:
    """A read-only folder ``ro`` in the workspace; skipped where permissions are not kept."""
    folder = work / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    probe = smoe_as_user(work, "--version", honour_permissions=True)
    writes = subprocess.run(
        [sys.executable, "-c", "open('ro/probe', 'w')"],
        cwd=work,
        capture_output=True,
        preexec_fn=_drop_root_override if os.geteuid() == 0 else None,
    )
    if probe.returncode != 0 or writes.returncode == 0:
        (folder / "probe").unlink(missing_ok=True)
        folder.chmod(0o755)
        pytest.skip("this user writes into read-only folders (cannot drop the privilege)")
    yield folder
    folder.chmod(0o755)


READ_ONLY = {
    "mask": (["mask", "--height", "8", "--width", "8", "--out", "ro/m.npy"], "folder 'ro'"),
    "simulate": (simulate_args("ro/new.zarr"), "folder 'ro' is not writable"),
    "export": (["export", "val.zarr", "ro/val.nc", "--no-progress"], "folder 'ro'"),
    "train-new-folder": (None, "folder 'ro' is not writable"),
    "train-into-folder": (None, "cannot write into 'ro'"),
    "evaluate": (evaluate_args("ro/sub/m.json"), "folder 'ro' is not writable"),
    "aggregate": (["aggregate", "metrics.json", "--out-dir", "ro"], "cannot write into 'ro'"),
    "figure": (["figure", "bars", "--metrics", "metrics.json", "--out", "ro/b"], "folder 'ro'"),
}


@pytest.mark.parametrize("case", list(READ_ONLY))
def test_read_only_output_folder(work, read_only, case):
    args, expect = READ_ONLY[case]
    if args is None:
        args = train_args(work, "ro/cnn" if case == "train-new-folder" else "ro")
    assert_refused_as_user(work, args[0], args, expect, honour_permissions=True)


UNREADABLE = {
    # an operating-system error no check foresaw: the generic one-line handler
    "check-config": (
        ["check-config", "secret.yaml"],
        "cannot use 'secret.yaml': Permission denied",
    ),
    "metrics": (
        ["aggregate", "secret.json", "--out-dir", "tables"],
        "metrics file 'secret.json' cannot be read (Permission denied)",
    ),
    "store-chunk": (
        ["export", "val.zarr", "x.nc", "--no-progress"],
        "chunk u/c/0/0/0/0 cannot be read: permission denied",
    ),
}


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_unreadable_input(work, read_only, case):
    args, expect = UNREADABLE[case]
    (work / "secret.yaml").write_text("seeds: [0]\n")
    (work / "secret.json").write_text((work / "metrics.json").read_text())
    unreadable = [work / "secret.yaml", work / "secret.json", work / "val.zarr/u/c/0/0/0/0"]
    for path in unreadable:
        path.chmod(0o000)
    try:
        assert_refused_as_user(work, args[0], args, expect, honour_permissions=True)
    finally:
        for path in unreadable:
            path.chmod(0o644)


KIND_MISMATCH = {
    "mask-onto-folder": (["mask", "--height", "8", "--width", "8", "--out", "models"], "folder"),
    "export-onto-folder": (["export", "val.zarr", "models.nc"], "folder"),
    "evaluate-onto-input": (evaluate_args(CHECKPOINT), "is also an input"),
    "evaluate-twice": (evaluate_args("x.json", "--predictions", "x.json"), "given twice"),
}


@pytest.mark.parametrize("case", list(KIND_MISMATCH))
def test_output_that_is_a_folder_an_input_or_given_twice(work, case):
    args, expect = KIND_MISMATCH[case]
    if case == "export-onto-folder":
        (work / "models.nc").mkdir()
    assert_refused(work, args[0], args, expect)


# --- options --------------------------------------------------------------------------------


def test_seed_out_of_range(work):
    cases = [
        (train_args(work), "-1"),
        (train_args(work), str(2**32)),
        (simulate_args("new.zarr"), "-1"),
        (["mask", "--out", "m.npy", "--seed", "42"], "-1"),
        (
            ["tune-lr", "--config", "c.yaml", "--model", "cnn", "--lrs", "0.1"]
            + ["--train-store", "train.zarr", "--val-store", "val.zarr", "--out", "lr.csv"]
            + ["--seed", "0"],
            "-3",
        ),
    ]
    for args, seed in cases:
        args = list(args)
        args[args.index("--seed") + 1] = seed
        line = assert_refused(work, args[0], args, "argument --seed: a seed must be between 0")
        assert line.endswith(f"got {int(seed)} (see smoe {args[0]} --help)")


def test_negative_run_or_time_of_a_figure(work):
    base = ["figure", "predictions", "--predictions", "predictions.nc", "--out", "p"]
    assert_refused(work, "figure", [*base, "--run", "-1"], "argument --run: the value must be")
    assert_refused(work, "figure", [*base, "--time", "-2"], "argument --time")
    assert_refused(work, "figure", [*base, "--run", "7"], "has no run 7 at time step")


@pytest.mark.parametrize(
    "spec",
    ['{"name": "cnn", "kind": "cnn"}', "{", "[1, 2]", '{"name": "cnn"}'],
    ids=["missing-keys", "not-json", "not-an-object", "name-only"],
)
def test_partial_or_malformed_spec(work, spec):
    args = train_args(work)
    args[args.index("--spec") + 1] = spec
    line = assert_refused(work, "train", args, "--spec")
    if spec.startswith('{"name": "cnn", "kind"'):
        assert "'options'" in line  # a missing key is named


# --- input files for tables and figures ----------------------------------------------------


def _without(work: Path, key: str) -> None:
    result = json.loads((work / "metrics.json").read_text())
    del result[key]
    (work / f"no_{key}.json").write_text(json.dumps(result))


FILES = {
    "g.json": '{"model": "cnn", "metr',
    "l.json": "[1, 2]",
    "bin.json": bytes(range(256)),
    "h.csv": "epoch,train_loss\n0,0.5\n1,lots\n",
    "g.nc": b"CDF\x02 not really netCDF",
    "empty.json": '{"model": "cnn", "metrics": {}}',
    "models/cnn/seed1/history.csv": "epoch,train_loss,val_mse\n",
}
"""Malformed inputs, written into the workspace before a case runs."""

BAD_INPUTS = {
    "bars-missing": (
        ["figure", "bars", "--metrics", "absent.json"],
        "metrics file 'absent.json' does not exist",
    ),
    "bars-garbled": (
        ["figure", "bars", "--metrics", "g.json"],
        "metrics file 'g.json' is not JSON",
    ),
    "bars-folder": (["figure", "bars", "--metrics", "models"], "metrics file 'models' is a folder"),
    "routing-not-an-object": (
        ["figure", "routing", "--mask", "mask.npy", "--metrics", "l.json"],
        "metrics file 'l.json' is not an evaluation result (not a JSON object)",
    ),
    "kernels-lacks-metrics": (
        ["figure", "kernels", "--metrics", "no_metrics.json"],
        "metrics file 'no_metrics.json' is not an evaluation result: it lacks 'metrics'",
    ),
    "aggregate-missing": (
        ["aggregate", "metrics.json", "absent.json", "--out-dir", "tables"],
        "metrics file 'absent.json' does not exist",
    ),
    "aggregate-lacks-params": (
        ["aggregate", "no_params.json", "--out-dir", "tables"],
        "metrics file 'no_params.json' is not an evaluation result: it lacks 'params'",
    ),
    "aggregate-binary": (
        ["aggregate", "bin.json", "--out-dir", "tables"],
        "metrics file 'bin.json' is not JSON",
    ),
    "curves-missing": (
        ["figure", "curves", "--histories", HISTORY, "absent.csv"],
        "history file 'absent.csv' does not exist",
    ),
    "curves-not-numbers": (
        ["figure", "curves", "--histories", "h.csv"],
        "history file 'h.csv', line 3, column 'train_loss': 'lots' is not a number",
    ),
    "predictions-missing": (
        ["figure", "predictions", "--predictions", "absent.nc"],
        "predictions file 'absent.nc' does not exist",
    ),
    "predictions-garbled": (
        ["figure", "predictions", "--predictions", "g.nc"],
        "predictions file 'g.nc' is not readable netCDF",
    ),
    "predictions-a-store": (
        ["figure", "predictions", "--predictions", "val.zarr"],
        "predictions file 'val.zarr' is a folder",
    ),
    # figures that the results cannot make: an error, never a placeholder picture
    "routing-without-smoe": (
        ["figure", "routing", "--mask", "mask.npy", "--metrics", "metrics.json"],
        "routing figure: none of the metrics files 'metrics.json' has a routing map",
    ),
    "kernels-without-smoe": (
        ["figure", "kernels", "--metrics", "metrics.json"],
        "kernels figure: none of the metrics files 'metrics.json' has learned 3x3 kernels",
    ),
    "bars-without-any-metric": (
        ["figure", "bars", "--metrics", "empty.json"],
        "metric bars: none of the metrics files 'empty.json' has a value of prcntclose1.0",
    ),
    "curves-of-an-empty-history": (
        ["figure", "curves", "--histories", HISTORY, "models/cnn/seed1/history.csv"],
        "history file 'models/cnn/seed1/history.csv' has no rows",
    ),
}


def _write_bad_inputs(work: Path) -> None:
    for name, content in FILES.items():
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    _without(work, "metrics")
    _without(work, "params")


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_missing_or_malformed_input_files_and_figures_they_cannot_make(work, case):
    args, expect = BAD_INPUTS[case]
    _write_bad_inputs(work)
    if args[0] == "figure":
        args = [*args, "--out", "figures/fig.png"]
    assert_refused(work, args[0], args, expect)


# --- damaged stores -------------------------------------------------------------------------


def _replace_in(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new))


DAMAGE = {
    # name: (what is done to the store, given the store and its chunk's key; the message)
    "truncated-chunk": (
        lambda store, key: (store / key).write_bytes((store / key).read_bytes()[:20]),
        "chunk {key} cannot be read",
    ),
    "garbage-chunk": (
        lambda store, key: (store / key).write_bytes(bytes(range(200))),
        "chunk {key} cannot be read",
    ),
    "missing-chunk": (
        lambda store, key: (store / key).unlink(),
        "chunk {key} of the field is missing",
    ),
    "missing-metadata": (
        lambda store, key: (store / "u" / "zarr.json").unlink(),
        "metadata u/zarr.json of array 'u' is missing",
    ),
    "garbled-metadata": (
        lambda store, key: (store / "u" / "zarr.json").write_text('{"shape": [5, 7'),
        "metadata u/zarr.json of array 'u' is unreadable or garbled",
    ),
    "wrong-metadata": (
        lambda store, key: _replace_in(store / "u" / "zarr.json", '"float32"', '"float99"'),
        "metadata u/zarr.json cannot be used",
    ),
    "garbled-store-metadata": (
        lambda store, key: (store / "zarr.json").write_text("not json"),
        "is not a readable zarr store: its metadata zarr.json",
    ),
}

STORE_CASES = [
    *(("export", case) for case in DAMAGE),  # the export's dask pass; the quickest command
    ("train", "truncated-chunk"),  # the eager load, chunk by chunk
    ("train", "missing-chunk"),
    ("train", "missing-metadata"),
    ("train-lazy", "garbage-chunk"),  # per-chunk reads while training
    ("train-zscore", "truncated-chunk"),  # the normalizer's dask reduction
    ("evaluate", "truncated-chunk"),
    ("evaluate", "missing-chunk"),
    ("evaluate", "garbled-metadata"),
]


@pytest.mark.parametrize(("command", "case"), STORE_CASES, ids=[f"{c}-{d}" for c, d in STORE_CASES])
def test_damaged_store(work, command, case):
    if command.startswith("train"):
        store, key = "train.zarr", "u/c/2/0/0/0"  # 5 runs, 2 per chunk: the last chunk
        data = {"eager": False} if command == "train-lazy" else {}
        if command == "train-zscore":
            data = {"normalization": "zscore"}
        args = train_args(work, **data)
    else:
        store, key = "val.zarr", "u/c/0/0/0/0"
        args = (
            evaluate_args()
            if command == "evaluate"
            else ["export", "val.zarr", "x.nc", "--no-progress"]
        )
    damage, expect = DAMAGE[case]
    damage(work / store, key)
    line = assert_refused(work, args[0], args, expect.format(key=key))
    assert f"store '{store}'" in line
    assert f"rm -r {store} then rerun snakemake" in line and "--overwrite" in line


@pytest.mark.parametrize("command", ["train", "evaluate", "export"])
def test_non_finite_field_is_refused(work, command):
    store = "train.zarr" if command == "train" else "val.zarr"
    field = zarr.open_array(work / store / "u", mode="r+")
    field[1, 2, 3, 4:7] = [np.nan, np.inf, -np.inf]
    args = {
        "train": train_args(work),
        "evaluate": evaluate_args(),
        "export": ["export", "val.zarr", "val.nc", "--no-progress"],
    }[command]
    line = assert_refused(work, command, args, f"store '{store}': field u has 3 non-finite")
    assert "run 1: 3" in line


# --- store outputs --------------------------------------------------------------------------

STORE_OUTPUTS = {
    "file": (simulate_args("notes.zarr"), "output 'notes.zarr' is a file"),
    "file-overwrite": (simulate_args("notes.zarr", "--overwrite"), "output 'notes.zarr' is a file"),
    "folder": (simulate_args("folder.zarr"), "output 'folder.zarr' exists and is not a zarr store"),
    "folder-overwrite": (
        simulate_args("folder.zarr", "--overwrite"),
        "output 'folder.zarr' exists and is not a zarr store",
    ),
    "store": (simulate_args("val.zarr"), "store 'val.zarr' already exists; nothing was changed"),
}


@pytest.mark.parametrize("case", list(STORE_OUTPUTS))
def test_existing_path_at_a_store_output(work, case):
    args, expect = STORE_OUTPUTS[case]
    assert_refused(work, "simulate", args, expect)


def test_overwrite_replaces_a_store_and_says_so(work):
    before = snapshot(work)
    result = smoe(work, *simulate_args("val.zarr", "--overwrite"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("replaced existing store val.zarr: 2 runs")
    after = snapshot(work)
    assert after["val.zarr/u/c/0/0/0/0"] != before["val.zarr/u/c/0/0/0/0"]
    assert {k: v for k, v in after.items() if not k.startswith("val.zarr")} == {
        k: v for k, v in before.items() if not k.startswith("val.zarr")
    }
    assert not list(work.glob("*.partial")) and not list(work.glob("*.previous"))


REFUSED_BEFORE_TORCH = [
    (
        ["train", "--spec", '{"name": "cnn", "kind": "cnn"}', "--train-store", "absent.zarr"]
        + ["--val-store", "absent.zarr", "--seed", "0", "--out", "run"],
        "store 'absent.zarr' does not exist",
    ),
    (
        ["evaluate", "--checkpoint", "absent.pt", "--store", "absent.zarr", "--out", "m.json"],
        "checkpoint 'absent.pt' does not exist",
    ),
]


@pytest.mark.parametrize("argv, message", REFUSED_BEFORE_TORCH)
def test_a_missing_input_is_refused_before_pytorch_is_imported(tmp_path, argv, message):
    """A job that only finds its input missing says so in a fraction of a second: the
    check runs before the command imports PyTorch (or any data library)."""
    probe = (
        "import sys; from smoe.cli import main; status = main(sys.argv[1:]); "
        "print(status, sorted({'torch', 'xarray', 'numba'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, *argv], cwd=tmp_path, capture_output=True, text=True
    )
    assert message in result.stderr
    assert result.stdout.split() == ["2", "[]"]
    assert list(tmp_path.iterdir()) == []
