"""Bad input to the synthetic-cluster commands of the real `smoe`: one error line, exit
status 2, nothing changed.

As in tests/test_cli_errors.py, every case runs `python -m smoe ...` as a subprocess in a
fresh copy of a small workspace (train and test stores of a tiny s1, a trained MoE, its
metrics) and checks that stderr is exactly one line ``smoe VERB: error: ...`` naming the
problem, that there is no traceback, that the exit status is 2, and that every file and
folder of the workspace is byte-identical afterwards (and nothing new appeared).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from command_runs import assert_refused, smoe

from smoe.config import validate_config
from smoe.families.clusters.config import cluster_model_spec
from smoe.families.clusters.data import make_setting
from smoe.families.clusters.store import open_cluster_split, write_cluster_split

pytestmark = pytest.mark.slow

SIZES = {"n_train": 60, "n_test": 40, "dim": 12}
CHECKPOINT = "models/moe/seed0/best.pt"


def tiny_config(**options) -> dict:
    return validate_config(
        {
            "models": {"p": {"kind": "persistence"}},
            "clusters": {
                "data": SIZES,
                "train": {"epochs": 2},
                "models": {"moe": {"kind": "cluster_moe", "options": {"experts": 2, **options}}},
            },
        }
    )


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """The workspace every case starts from (copied, never changed)."""
    from smoe.core.report.results import write_json
    from smoe.families.clusters.task import evaluate_cluster_checkpoint, train_cluster

    root = tmp_path_factory.mktemp("pristine_clusters")
    setting = make_setting({"setting": "s1", **SIZES})
    for split in ("train", "test"):
        write_cluster_split(setting, 0, split, root / f"{split}.zarr")
    spec = cluster_model_spec(tiny_config(), "moe")
    (root / "spec.json").write_text(spec.to_json())
    train_cluster(spec, root / "train.zarr", 0, root / "models/moe/seed0", progress=False)
    result = evaluate_cluster_checkpoint(root / CHECKPOINT, root / "test.zarr", root / "train.zarr")
    write_json(result, root / "metrics.json")
    (root / "afile").write_text("a file, not a folder\n")
    (root / "notes.zarr").write_text("a file named like a store\n")
    return root


def data_args(*extra: str, out: str = "new.zarr", setting: str = "s1") -> list[str]:
    return ["cluster-data", "--setting", setting, "--seed", "0", "--split", "train"] + [
        "--out",
        out,
        *extra,
    ]


def spec_with(work: Path, **options) -> str:
    spec = json.loads((work / "spec.json").read_text())
    spec["options"].update(options)
    return json.dumps(spec)


def train_args(spec: str, store: str = "train.zarr", out: str = "out") -> list[str]:
    return ["cluster-train", "--spec", spec, "--train-store", store, "--seed", "0"] + [
        "--out",
        out,
        "--no-progress",
    ]


def evaluate_args(
    checkpoint: str = CHECKPOINT, store: str = "test.zarr", out: str = "m.json"
) -> list[str]:
    return ["cluster-evaluate", "--checkpoint", checkpoint, "--store", store] + [
        "--train-store",
        "train.zarr",
        "--out",
        out,
    ]


DATA_CASES = {
    "unknown-setting": (data_args(setting="s9"), "invalid choice: 's9'"),
    "impossible-dim": (
        data_args("--set", "dim=6"),
        "--set dim: 6 dimensions cannot hold 2 x 4 orthonormal vectors",
    ),
    "unknown-key": (data_args("--set", "sigma=2"), "--set sigma: not a setting key; known:"),
    "no-equals": (data_args("--set", "n_train"), "--set 'n_train': give KEY=VALUE"),
    "setting-as-override": (data_args("--set", "setting=s2"), "choose the setting with --setting"),
    "bad-range": (data_args("--set", "alpha=[0, 1]"), "--set alpha: [0, 1] needs low > 0"),
    "zero-samples": (data_args("--set", "n_train=0"), "--set n_train: must be at least 1"),
    "split-val": (
        ["cluster-data", "--setting", "s1", "--seed", "0", "--split", "val", "--out", "v.zarr"],
        "invalid choice: 'val'",
    ),
    "existing-store": (data_args(out="train.zarr"), "already exists; nothing was changed"),
    "file-at-output": (data_args(out="notes.zarr"), "is a file, where a folder is written"),
    "output-under-a-file": (data_args(out="afile/x.zarr"), "is a file, not a folder"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_cluster_data_refuses_bad_input(work, case):
    args, expect = DATA_CASES[case]
    assert_refused(work, "cluster-data", args, expect)


def test_cluster_data_writes_the_overridden_setting_and_replaces_only_with_overwrite(work):
    result = smoe(work, *data_args("--set", "n_train=30", "--set", "dim=10"))
    assert result.returncode == 0, result.stderr
    data = open_cluster_split(work / "new.zarr")
    assert (len(data), data.setting.dim, data.setting.name, data.seed) == (30, 10, "s1", 0)
    replaced = smoe(work, *data_args("--set", "n_train=20", "--overwrite", out="train.zarr"))
    assert replaced.returncode == 0, replaced.stderr
    assert "replaced existing store" in replaced.stdout
    assert len(open_cluster_split(work / "train.zarr")) == 20


def train_cases(work: Path) -> dict:
    return {
        "missing-store": (train_args(spec_with(work), store="missing.zarr"), "does not exist"),
        "store-is-a-file": (train_args(spec_with(work), store="notes.zarr"), "is a file"),
        "zero-experts": (
            train_args(spec_with(work, experts=0)),
            "--spec key 'options.experts': 0 is less than the minimum of 1",
        ),
        "k-above-experts": (
            train_args(spec_with(work, top_k=3)),
            "--spec key 'options.top_k': top_k=3 must be between 1 and experts=2",
        ),
        "unknown-option": (
            train_args(spec_with(work, kernel=3)),
            "--spec key 'options.kernel': unknown option of model kind 'cluster_moe'",
        ),
        "not-json": (train_args("{moe"), "--spec is not JSON"),
        "config-without-model": (
            ["cluster-train", "--config", "c.yaml", "--train-store", "train.zarr"]
            + ["--seed", "0", "--out", "out"],
            "--config needs --model",
        ),
        "output-is-a-file": (train_args(spec_with(work), out="afile"), "is a file"),
    }


CLUSTER_TRAIN_CASES = [
    "missing-store",
    "store-is-a-file",
    "zero-experts",
    "k-above-experts",
    "unknown-option",
    "not-json",
    "config-without-model",
    "output-is-a-file",
]


@pytest.mark.parametrize("case", CLUSTER_TRAIN_CASES)
def test_cluster_train_refuses_bad_input(work, case):
    args, expect = train_cases(work)[case]
    if case == "config-without-model":
        (work / "c.yaml").write_text("models: {p: {kind: persistence}}\n")
    assert_refused(work, "cluster-train", args, expect)


OTHER_CASES = {
    "evaluate-missing-checkpoint": (
        "cluster-evaluate",
        evaluate_args(checkpoint="models/none/best.pt"),
        "checkpoint 'models/none/best.pt' does not exist",
    ),
    "evaluate-missing-store": (
        "cluster-evaluate",
        evaluate_args(store="missing.zarr"),
        "store 'missing.zarr' does not exist",
    ),
    "evaluate-output-is-a-folder": (
        "cluster-evaluate",
        evaluate_args(out="models"),
        "is a folder, where a file is written",
    ),
    "evaluate-output-is-an-input": (
        "cluster-evaluate",
        evaluate_args(out=CHECKPOINT),
        "is also an input",
    ),
    "table-missing-metrics": (
        "cluster-table",
        ["cluster-table", "missing.json", "--out-dir", "tables"],
        "missing.json",
    ),
    "table-out-dir-is-a-file": (
        "cluster-table",
        ["cluster-table", "metrics.json", "--out-dir", "afile"],
        "is a file, where a folder is written",
    ),
    "dispatch-without-metrics": (
        "figure",
        ["figure", "dispatch", "--out", "d.png"],
        "figure 'dispatch' needs --metrics",
    ),
    "projection-without-store": (
        "figure",
        ["figure", "projection", "--out", "p.png"],
        "figure 'projection' needs --store",
    ),
    "projection-missing-store": (
        "figure",
        ["figure", "projection", "--store", "missing.zarr", "--out", "p.png"],
        "store 'missing.zarr' does not exist",
    ),
}


@pytest.mark.parametrize("case", list(OTHER_CASES))
def test_cluster_evaluate_table_and_figures_refuse_bad_input(work, case):
    verb, args, expect = OTHER_CASES[case]
    assert_refused(work, verb, args, expect)


def run_args(*seeds: str, spec: str | None = None, test: str = "test.zarr") -> list[str]:
    return ["cluster-run", "--spec", spec or "", "--train-store", "train.zarr"] + [
        "--test-store",
        test,
        "--seeds",
        *seeds,
        "--models-dir",
        "runs",
        "--metrics-dir",
        "scores",
        "--no-progress",
    ]


def test_cluster_run_trains_and_evaluates_every_seed_like_the_single_commands(work):
    spec = (work / "spec.json").read_text()
    result = smoe(work, *run_args("0", "1", spec=spec))
    assert result.returncode == 0, result.stderr
    for seed in (0, 1):
        scores = json.loads((work / "scores" / f"seed{seed}.json").read_text())
        assert scores["seed"] == seed and scores["model"] == "moe"
        assert (work / "runs" / f"seed{seed}" / "best.pt").is_file()
    # seed 0 equals what cluster-train + cluster-evaluate made in the pristine workspace
    alone = json.loads((work / "metrics.json").read_text())
    together = json.loads((work / "scores" / "seed0.json").read_text())
    assert together["metrics"] == alone["metrics"] and together["dispatch"] == alone["dispatch"]
    assert "moe seed 1: test accuracy" in result.stdout


@pytest.mark.parametrize(
    "seeds, test, expect",
    [
        (("0", "0"), "test.zarr", "--seeds lists a seed twice: [0, 0]"),
        (("0",), "missing.zarr", "missing.zarr' does not exist"),
        (("-1",), "test.zarr", "argument --seeds"),
    ],
)
def test_cluster_run_refuses_bad_input(work, seeds, test, expect):
    spec = (work / "spec.json").read_text()
    assert_refused(work, "cluster-run", run_args(*seeds, spec=spec, test=test), expect)
