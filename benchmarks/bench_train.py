"""The paper's SMoE recipe at the paper's size, trained by today's code and by a baseline
revision side by side on the same machine, to 100 % validation prcntclose1.0.

What is timed is what a user waits for: ``smoe train --config config/paper.yaml --model
smoe`` (the paper's model and recipe: latent gate, 3 experts, top-1, RC loss, damping; Adam
1e-3, batch 32; stop at 100 % prcntclose1.0) on the paper's data (1000 train runs of 100
steps on the 64 x 64 map, 20 validation and 20 test runs), on the CPU with ``--threads``
threads, then ``smoe evaluate`` of the kept checkpoint on the test split. The baseline is a
``git worktree`` of ``--baseline`` (by default the commit before the training-step work)
run through ``PYTHONPATH``; each repeat runs the baseline, then ours, so both see the same
machine load. Printed per run: training time (the trainer's own clock: epochs and
validation, not start-up), epochs, milliseconds per training step, the test metrics, and
whether the two trainings' histories (every epoch's loss and validation metrics) are equal;
then medians and the ratio.

    python benchmarks/bench_train.py [--threads 2] [--repeats 1] [--dir /tmp/smoe-bench-train]
        [--baseline REV] [--epochs N]

``--epochs N`` stops both after N epochs (a quicker step-time comparison). The paper-size
stores (1.3 GB) are made once in ``--dir`` by the workflow's own rules and reused.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "1d06263"
"""main before the training-step work of issue 13 (routing backward, per-step checks)."""


def run(command: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-3000:]}")
    return result.stdout


def make_data(work: Path) -> Path:
    """The paper's stores, made once by the workflow's own rules (results under ``work``)."""
    results = work / "results"
    data = results / "data" / "heat"
    # a store's target is its root zarr.json, the file its rule declares
    targets = [str(data / f"{split}.zarr" / "zarr.json") for split in ("train", "val", "test")]
    if not all(Path(target).exists() for target in targets):
        print("making the paper's stores (1000 + 20 + 20 runs) ...", flush=True)
        run(
            [
                "snakemake",
                *targets,
                "--cores",
                str(os.cpu_count() or 1),
                "--configfile",
                str(ROOT / "config" / "paper.yaml"),
                "--config",
                f"results={results}",
            ],
            cwd=ROOT,
        )
    return data


def write_config(work: Path, threads: int, epochs: int | None) -> Path:
    config = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    config["train"].update(device="cpu", threads=threads)
    if epochs:
        config["train"].update(epochs=epochs, stop_at=None)
    path = work / "bench-config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def baseline_tree(work: Path, revision: str) -> Path:
    tree = work / f"baseline-{revision}"
    if not (tree / "smoe").is_dir():
        run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), revision])
    return tree


def fresh_training(config: Path, model: str, data: Path, out: Path) -> list[str]:
    """``smoe train`` of ``model`` with seed 0 on the paper's stores into ``out``, from
    scratch (an earlier run's checkpoints there are removed, so nothing is resumed)."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("last.pt", "best.pt"):
        (out / stale).unlink(missing_ok=True)
    return [
        *[sys.executable, "-m", "smoe", "train", "--config", str(config), "--model", model],
        *["--train-store", str(data / "train.zarr"), "--val-store", str(data / "val.zarr")],
        *["--seed", "0", "--out", str(out), "--no-progress"],
    ]


def train_and_evaluate(
    name: str, tree: Path, config: Path, data: Path, out: Path, device: str
) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    # run in the tree: its folder comes first on sys.path, before the installed package
    where = run(
        [sys.executable, "-c", "import smoe; print(smoe.__file__)"], env=env, cwd=tree
    ).strip()
    if not where.startswith(str(tree)):
        sys.exit(f"{name}: imported smoe from {where}, not from {tree}")
    smoe = [sys.executable, "-m", "smoe"]
    run(fresh_training(config, "smoe", data, out), env=env, cwd=tree)
    evaluate = [
        *smoe,
        "evaluate",
        "--checkpoint",
        str(out / "best.pt"),
        "--store",
        str(data / "test.zarr"),
        "--out",
        str(out / "test.json"),
        "--device",
        device,
    ]
    run(evaluate, env=env, cwd=tree)
    summary = json.loads((out / "train.json").read_text())
    test = json.loads((out / "test.json").read_text())
    metrics, routing = test["metrics"], test.get("routing") or {}
    with open(out / "history.csv", newline="") as handle:
        history = [
            {k: v for k, v in row.items() if k != "time_s"} for row in csv.DictReader(handle)
        ]
    return {
        "name": name,
        "train_s": summary["train_time_s"],
        "epochs": summary["epochs"],
        "best_epoch": summary["best_epoch"],
        "best_value": summary["best_value"],
        "test_prcntclose": metrics.get("prcntclose1.0"),
        "routing_agreement": routing.get("agreement"),
        "history": history,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=None, help="stop after N epochs")
    parser.add_argument("--baseline", default=BASELINE, help="git revision to compare with")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/smoe-bench-train"))
    args = parser.parse_args()
    work = args.dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = make_data(work)
    config = write_config(work, args.threads, args.epochs)
    trees = {"baseline": baseline_tree(work, args.baseline), "ours": ROOT}
    import zarr

    runs = zarr.open_array(str(data / "train.zarr" / "u"), mode="r").shape
    steps_per_epoch = -(-runs[0] * (runs[1] - 1) // 32)
    results: dict[str, list[dict]] = {name: [] for name in trees}
    print(
        f"paper SMoE recipe, seed 0, CPU, {args.threads} threads, {steps_per_epoch} steps "
        f"of 32 per epoch; baseline {args.baseline}",
        flush=True,
    )
    for repeat in range(args.repeats):
        for name, tree in trees.items():
            result = train_and_evaluate(
                name, tree, config, data, work / "runs" / name / str(repeat), "cpu"
            )
            results[name].append(result)
            step_ms = 1e3 * result["train_s"] / (result["epochs"] * steps_per_epoch)
            print(
                f"  {name:8s} repeat {repeat}: {result['train_s']:7.1f} s training, "
                f"{result['epochs']} epochs (best {result['best_epoch']}), "
                f"{step_ms:.2f} ms/step incl. validation, test prcntclose1.0 "
                f"{result['test_prcntclose']}, routing agreement "
                f"{result['routing_agreement']}",
                flush=True,
            )
    pairs = zip(results["baseline"], results["ours"], strict=True)
    same = all(a["history"] == b["history"] for a, b in pairs)
    base = statistics.median(r["train_s"] for r in results["baseline"])
    ours = statistics.median(r["train_s"] for r in results["ours"])
    print(
        f"median training time: baseline {base:.1f} s, ours {ours:.1f} s: {base / ours:.2f}x; "
        f"histories (loss and validation metrics of every epoch) "
        f"{'identical' if same else 'DIFFER'}"
    )


if __name__ == "__main__":
    main()
