"""The synthetic-cluster family's ``smoe`` commands: ``cluster-data``, ``cluster-train``,
``cluster-evaluate``, ``cluster-run``, ``cluster-table``, and its ``smoe figure`` kinds; each
a workflow job and runnable by hand. Errors follow :mod:`smoe.core.cli`: one line, exit
status 2."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

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
from smoe.core.zarr_store import store_argument


def _add_cluster_data(sub: argparse._SubParsersAction, seeds: Seeds) -> None:
    from smoe.families.clusters.data import SETTING_KEYS, SETTINGS, SPLITS

    fields = ", ".join(key for key in SETTING_KEYS if key != "setting")
    p = sub.add_parser(
        "cluster-data",
        help="generate one split of a synthetic-cluster setting into a zarr store",
        description="Generate the train or test split of one of the synthetic-cluster "
        "settings of Chen et al. (2022), s1..s4, and write it as a zarr v3 store (written to "
        "<out>.partial, renamed when complete). Both splits of a seed share the generating "
        "vectors.",
    )
    p.add_argument("--setting", choices=tuple(SETTINGS), required=True, help="the setting")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a field of the setting (VALUE read as YAML, ranges as [low, high]); "
        f"fields: {fields}",
    )
    p.add_argument(
        "--seed", type=seeds.data, required=True, help="seed of the data set (0 or more)"
    )
    p.add_argument("--split", choices=SPLITS, required=True, help="which split")
    add_store_output(p)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing store at --out (without it an existing store is refused)",
    )
    p.set_defaults(run=_run_cluster_data)


def cluster_overrides(items: Sequence[str]) -> dict:
    """``--set KEY=VALUE`` items as a mapping, each VALUE read as YAML ('400' -> 400,
    '[0.5, 2]' -> [0.5, 2.0])."""
    import re

    import yaml

    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"--set {item!r}: give KEY=VALUE, e.g. --set n_train=2000")
        if key == "setting":
            raise InputError("--set setting=...: choose the setting with --setting")
        if key in overrides:
            raise InputError(f"--set {key}: given twice")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise InputError(f"--set {key}: {text!r} is not a value") from None
        if isinstance(value, str) and re.fullmatch(r"[-+.\deE]+", value):
            try:
                value = float(value)  # '1e-3' is a string to YAML 1.1
            except ValueError:
                pass
        overrides[key] = value
    return overrides


def _run_cluster_data(args: argparse.Namespace) -> None:
    import re

    from smoe.families.clusters.data import make_setting
    from smoe.families.clusters.store import write_cluster_split

    replacing = args.out.is_dir()
    overrides = cluster_overrides(args.overrides)
    try:
        setting = make_setting({**overrides, "setting": args.setting}, key="--set")
    except InputError as exc:  # "--set.dim: ..." -> "--set dim: ..."
        raise InputError(re.sub(r"^--set\.", "--set ", str(exc))) from None
    out = write_cluster_split(setting, args.seed, args.split, args.out, args.overwrite)
    held = (
        f"setting {setting.name}, {setting.samples(args.split)} {args.split} samples x "
        f"{setting.patches} patches x {setting.dim} dims, seed {args.seed}"
    )
    print(store_written(out, replacing, held))


def _add_cluster_train(sub: argparse._SubParsersAction, seeds: Seeds) -> None:
    add_model_command(
        sub,
        "cluster-train",
        help="train one synthetic-cluster model with one seed",
        description="Train a cluster-family model (cluster_moe or cluster_single) full batch on "
        "a train store, holding out the spec's val_fraction of it to select the best epoch. The "
        "model comes from a workflow config (--config and --model, under clusters.models) or a "
        "resolved spec (--spec, as the workflow passes it).",
        section="clusters.models",
        stores=("train",),
        run=_run_cluster_train,
        seed=seeds.train,
        seeds=False,
        processes=False,
    )


def _cluster_spec_argument(args: argparse.Namespace):
    """The model spec of --config/--model or --spec, validated like the workflow's."""
    from smoe.config import load_config
    from smoe.families.clusters.config import cluster_model_spec, validate_cluster_spec

    return spec_from_arguments(
        args, "clusters.models", cluster_model_spec, validate_cluster_spec, load_config
    )


def _run_cluster_train(args: argparse.Namespace) -> None:

    from smoe.families.clusters.store import open_cluster_split

    spec = _cluster_spec_argument(args)
    open_cluster_split(args.train_store)  # a missing or damaged store, named, before torch
    from smoe.families.clusters.task import train_cluster

    summary = train_cluster(spec, args.train_store, args.seed, args.out, args.progress)
    print(f"{training_summary(spec.name, args.seed, summary)}; wrote {args.out}")


def _add_cluster_run(sub: argparse._SubParsersAction, seeds: Seeds) -> None:
    add_model_command(
        sub,
        "cluster-run",
        help="train and evaluate one synthetic-cluster model for several seeds",
        description="For every seed: smoe cluster-train into MODELS_DIR/seed<k>/, then smoe "
        "cluster-evaluate of its best.pt into METRICS_DIR/seed<k>.json, in one process (the "
        "workflow's job per setting and model; starting PyTorch per seed would cost as much "
        "as the training).",
        section="clusters.models",
        stores=("train", "test"),
        run=_run_cluster_run,
        seed=seeds.train,
        seeds=True,
        processes=False,
    )


def _run_cluster_run(args: argparse.Namespace) -> None:

    from smoe.families.clusters.store import open_cluster_split

    check_seeds(args.seeds)
    spec = _cluster_spec_argument(args)
    for store in (args.train_store, args.test_store):
        open_cluster_split(store)  # a missing or damaged store, named, before torch
    from smoe.families.clusters.task import run_cluster_seeds

    results = run_cluster_seeds(
        spec,
        args.train_store,
        args.test_store,
        args.seeds,
        args.models_dir,
        args.metrics_dir,
        args.progress,
    )
    for result in results:
        print(
            f"{spec.name} seed {result['seed']}: test accuracy "
            f"{result['metrics']['test_accuracy']:.2f} % (best epoch {result['best_epoch']})"
        )


def _add_cluster_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cluster-evaluate",
        help="test metrics of a trained synthetic-cluster model (its best checkpoint)",
        description="Evaluate best.pt of smoe cluster-train on a test store: accuracy and, for "
        "an MoE, the dispatch of samples to experts per cluster and its entropy (on the "
        "train store, as the paper measures it).",
    )
    add_evaluation_arguments(p, "smoe cluster-train")
    p.add_argument(
        "--train-store",
        type=store_argument,
        required=True,
        help="train split (.zarr): dispatch entropy",
    )
    p.set_defaults(run=_run_cluster_evaluate)


def _run_cluster_evaluate(args: argparse.Namespace) -> None:
    from smoe.families.clusters.store import open_cluster_split

    if not args.checkpoint.is_file():
        raise InputError(
            f"checkpoint {str(args.checkpoint)!r} does not exist (train it with smoe cluster-train)"
        )
    for store in (args.store, args.train_store):
        open_cluster_split(store)  # a missing or damaged store, named, before torch
    from smoe.core.report.results import write_json
    from smoe.families.clusters.task import evaluate_cluster_checkpoint

    result = evaluate_cluster_checkpoint(args.checkpoint, args.store, args.train_store)
    write_json(result, args.out)
    summary = {
        key: value
        for key, value in (result.get("metrics") or result).items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    shown = ", ".join(f"{key} = {value:.6g}" for key, value in list(summary.items())[:4])
    print(f"wrote {args.out}" + (f": {shown}" if shown else ""))


def _add_cluster_table(sub: argparse._SubParsersAction) -> None:
    add_table_command(
        sub,
        "cluster-table",
        help="the synthetic-cluster table (CSV, Markdown and HTML)",
        description="Aggregate metrics JSON files of smoe cluster-evaluate into table.csv, "
        "table.md and table.html: test accuracy (and, for an MoE, dispatch entropy) per setting "
        "and model, mean +- std over seeds, beside the figures Chen et al. (2022) publish.",
        writer="smoe.families.clusters.table:cluster_table",
    )


CLUSTER_TABLES = ("table.csv", "table.md", "table.html")


def add_commands(sub: argparse._SubParsersAction, seeds: Seeds) -> None:
    """Register the family's subcommands."""
    _add_cluster_data(sub, seeds)
    _add_cluster_train(sub, seeds)
    _add_cluster_evaluate(sub)
    _add_cluster_run(sub, seeds)
    _add_cluster_table(sub)


def paths(args: argparse.Namespace) -> tuple[list, list] | None:
    """Inputs and outputs of one of the family's command lines; None for other commands."""
    command = args.command
    if command == "cluster-data":
        return [], [(args.out, "folder")]
    if command == "cluster-train":
        return [args.config, args.train_store], [(args.out, "folder")]
    if command == "cluster-evaluate":
        return [args.checkpoint, args.store, args.train_store], [(args.out, "file")]
    if command == "cluster-run":
        return [args.train_store, args.test_store], seed_runs_outputs(args)
    if command == "cluster-table":
        return table_outputs(args, CLUSTER_TABLES)
    return None


# -- smoe figure KIND ----------------------------------------------------------------------


def _draw_dispatch(args: argparse.Namespace):
    from smoe.families.clusters.figures import dispatch_figure
    from smoe.families.clusters.table import load_cluster_results

    return dispatch_figure(load_cluster_results(args.metrics), args.out)


def _draw_projection(args: argparse.Namespace):
    from smoe.families.clusters.figures import projection_figure
    from smoe.families.clusters.store import open_cluster_split

    open_cluster_split(args.store)  # a missing or damaged store, named
    return projection_figure(args.store, args.out)


FIGURES = {
    "dispatch": (
        ("metrics",),
        _draw_dispatch,
        "samples of each cluster per expert, with the dispatch entropy, per MoE",
    ),
    "projection": (
        ("store",),
        _draw_projection,
        "a split's samples projected on the generating vectors",
    ),
}
