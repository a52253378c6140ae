"""The ``smoe`` command: one subcommand per workflow step, each runnable by hand.

The CLI only parses options and calls one package function. Anything a user can get wrong
(an option, an input file, an output path, a damaged store) ends in one line
``smoe COMMAND: error: ...`` on stderr and exit status 2, never a traceback; outputs are
checked before any work, and nothing that existed is changed. An unexpected failure (a bug)
ends in one line asking for a report and exit status 1; ``SMOE_DEBUG=1`` shows its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from smoe import __version__
from smoe.core.errors import InputError, describe_os_error, one_line

MAX_TRAIN_SEED = 2**32 - 1  # numpy's legacy seeding (np.random.seed) takes 32 bits
MAX_DATA_SEED = 2**63 - 1  # stores record the seed as int64


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other error of ``smoe``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def _integer(text: str, what: str, low: int, high: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise argparse.ArgumentTypeError(f"{what} must be {bound}, got {value}")
    return value


def _seed(high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        return _integer(text, "a seed", 0, high)

    parse.__name__ = "seed"
    return parse


def _non_negative(text: str) -> int:
    return _integer(text, "the value", 0)


def _positive(text: str) -> int:
    return _integer(text, "the value", 1)


def _add_mask(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mask",
        help="generate a region map (or check and copy an existing one)",
        description="Draw a region map with the SMoE paper's sampler (seed 42, 64x64, 3 types "
        "gives the paper's map), or validate an existing .npy/.nc map with --from.",
    )
    p.add_argument("--height", type=int, default=64, help="rows (default 64)")
    p.add_argument("--width", type=int, default=64, help="columns (default 64)")
    p.add_argument("--types", type=int, default=3, help="region types T (default 3)")
    p.add_argument(
        "--seed", type=_seed(MAX_DATA_SEED), default=42, help="generator seed (default 42)"
    )
    p.add_argument(
        "--from",
        dest="source",
        type=Path,
        default=None,
        help="use this existing map (.npy or netCDF) instead of generating one",
    )
    p.add_argument("--out", type=Path, required=True, help="output map (.npy or .nc)")
    p.add_argument("--png", type=Path, default=None, help="also save a picture of the map")
    p.set_defaults(run=_run_mask)


def _run_mask(args: argparse.Namespace) -> None:
    from smoe.families.heat.mask import check_mask, generate_mask, load_mask, plot_mask, save_mask

    if args.source is not None:
        mask = check_mask(load_mask(args.source), args.types, f"mask file {str(args.source)!r}")
        title = f"region map from {args.source.name}"
    else:
        mask = check_mask(
            generate_mask(args.height, args.width, args.types, args.seed),
            args.types,
            "generated mask",
        )
        title = f"region map, seed {args.seed}"
    save_mask(mask, args.out)
    if args.png is not None:
        plot_mask(mask, args.png, title=title)
    counts = [int((mask == t).sum()) for t in range(args.types)]
    print(f"wrote {args.out}: {mask.shape[0]}x{mask.shape[1]}, cells per type {counts}")


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    from smoe.families.heat.choices import COMPRESSIONS, SCHEDULERS
    from smoe.families.heat.simulation import BOUNDARIES, INIT_KINDS

    p = sub.add_parser(
        "simulate",
        help="simulate heat diffusion runs into a zarr store",
        description="Simulate location-dependent heat diffusion for one split and write it as a "
        "chunked zarr v3 store (written to <out>.partial, renamed when complete).",
    )
    p.add_argument("--mask", type=Path, required=True, help="region map (.npy or .nc)")
    p.add_argument(
        "--diffusivity",
        type=float,
        nargs="+",
        default=[0.0025, 0.025, 0.25],
        help="one diffusion number per region type, each in [0, 0.25]",
    )
    p.add_argument("--runs", type=int, required=True, help="number of runs")
    p.add_argument(
        "--seed",
        type=_seed(MAX_DATA_SEED),
        required=True,
        help="seed of the split's random stream (0 or more)",
    )
    p.add_argument("--steps", type=int, default=100, help="time steps per run (default 100)")
    p.add_argument("--boundary", choices=BOUNDARIES, default="zero", help="default: zero")
    p.add_argument(
        "--init",
        choices=INIT_KINDS,
        default="uniform",
        help="initial field: uniform random or zero (default uniform)",
    )
    p.add_argument(
        "--init-range",
        type=float,
        nargs=2,
        action="append",
        metavar=("LOW", "HIGH"),
        default=None,
        help="uniform range per region type, once per type in order (default [0, 0.1) everywhere)",
    )
    p.add_argument("--negative-sources", action="store_true", help="sources are +1 or -1")
    p.add_argument(
        "--heat-rate",
        type=int,
        default=0,
        help="re-inject source values every K steps (default 0: never)",
    )
    p.add_argument(
        "--clip",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=None,
        help="clip the field to [LOW, HIGH] after every step",
    )
    p.add_argument(
        "--split",
        default=None,
        help="split name recorded in the store (default: the output's name, "
        "e.g. test for test.zarr)",
    )
    p.add_argument(
        "--runs-per-chunk",
        type=int,
        default=None,
        help="runs per stored chunk (default: chunks of about 8 MiB)",
    )
    p.add_argument("--compression", choices=COMPRESSIONS, default="lz4", help="default: lz4")
    p.add_argument(
        "--scheduler",
        default="threads",
        help=f"dask scheduler: one of {', '.join(SCHEDULERS)}, or the tcp:// "
        "address of a running dask scheduler (default threads)",
    )
    p.add_argument("--workers", type=int, default=1, help="dask workers (default 1)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--out", type=Path, required=True, help="output store (name ends in .zarr)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing store at --out (without it an existing store is refused)",
    )
    p.set_defaults(run=_run_simulate)


def _run_simulate(args: argparse.Namespace) -> None:
    from smoe.families.heat.mask import check_mask, load_mask
    from smoe.families.heat.simulation import HeatParams
    from smoe.families.heat.store import keep_freed_memory_mapped, simulate_split

    replacing = args.out.is_dir()
    keep_freed_memory_mapped()
    params = HeatParams(
        diffusivity=tuple(args.diffusivity),
        steps=args.steps,
        boundary=args.boundary,
        init=args.init,
        init_ranges=tuple(tuple(r) for r in args.init_range) if args.init_range else None,
        negative_sources=args.negative_sources,
        heat_rate=args.heat_rate,
        clip=tuple(args.clip) if args.clip else None,
    ).validate(key="simulate")
    source = f"mask file {str(args.mask)!r}"
    mask = check_mask(load_mask(args.mask), params.types, source)
    out = simulate_split(
        mask,
        params,
        seed=args.seed,
        runs=args.runs,
        out=args.out,
        split=args.split or args.out.stem,
        mask_source=str(args.mask),
        runs_per_chunk=args.runs_per_chunk,
        compression=args.compression,
        scheduler=args.scheduler,
        workers=args.workers,
        progress=args.progress,
        overwrite=args.overwrite,
    )
    print(
        f"{'replaced existing store' if replacing else 'wrote'} {out}: {args.runs} runs x "
        f"{args.steps + 1} frames x {mask.shape[0]}x{mask.shape[1]}"
    )


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a zarr store as netCDF4",
        description="Copy a simulation store into one compressed netCDF4 file (CF attributes "
        "kept) for tools that read netCDF but not zarr.",
    )
    p.add_argument("store", type=Path, help="input zarr store")
    p.add_argument("out", type=Path, help="output netCDF file (.nc)")
    p.add_argument("--workers", type=_positive, default=1, help="dask threads (default 1)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> None:
    from smoe.families.heat.store import export_netcdf

    out = export_netcdf(args.store, args.out, progress=args.progress, workers=args.workers)
    print(f"wrote {out}")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train one model with one seed",
        description="Train a model on a train store, selecting the best epoch on a validation "
        "store. The model comes from a workflow config (--config and --model) or a resolved "
        "spec (--spec, as the workflow passes it). Resumes from OUT/last.pt when it exists.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="workflow config file (with --model)")
    source.add_argument("--spec", help="resolved model spec as JSON")
    p.add_argument("--model", help="model name under 'models' in --config")
    p.add_argument("--train-store", type=Path, required=True, help="train split (.zarr)")
    p.add_argument("--val-store", type=Path, required=True, help="validation split (.zarr)")
    p.add_argument(
        "--seed", type=_seed(MAX_TRAIN_SEED), required=True, help="training seed (0 to 2**32-1)"
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder for best.pt, last.pt, history.csv, train.json",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_processes_option(p)
    p.set_defaults(run=_run_train)


def add_processes_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--processes",
        type=_positive,
        default=1,
        help="train on N processes: the command starts itself under torchrun "
        "(DistributedDataParallel on shares of each global minibatch; same results as 1)",
    )


def _relaunch_under_torchrun(args: argparse.Namespace, argv: Sequence[str]) -> int | None:
    """With ``--processes N`` > 1 outside torchrun, run this very command line on N
    processes (``torchrun --standalone``) and return its exit status; None to go on here.
    Under torchrun, ``--processes`` must be the number torchrun started."""
    from smoe.core.train.distributed import launched, smoe_command

    processes = getattr(args, "processes", 1)
    world = launched()
    if "WORLD_SIZE" in os.environ:
        if processes not in (1, world.size):
            raise InputError(
                f"--processes {processes}, but torchrun started {world.size} processes"
            )
        return None
    if processes == 1:
        return None
    import shlex
    import subprocess

    rest = list(argv)
    for index, word in enumerate(rest):  # drop --processes N / --processes=N
        if word == "--processes":
            del rest[index : index + 2]
            break
        if word.startswith("--processes="):
            del rest[index]
            break
    command = shlex.split(smoe_command(processes)) + rest
    environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(command, env=environment).returncode


def _run_train(args: argparse.Namespace) -> None:
    import json

    from smoe.config import load_config
    from smoe.core.train.distributed import is_main
    from smoe.families.heat.config import model_spec, validate_spec
    from smoe.families.heat.task import train

    if args.config is not None:
        if not args.model:
            raise InputError("--config needs --model NAME (a name under 'models')")
        spec = model_spec(load_config(args.config), args.model)
    else:
        try:
            raw = json.loads(args.spec)
        except json.JSONDecodeError as exc:
            raise InputError(f"--spec is not JSON: {exc}") from exc
        # the workflow's checks of a model, keys named; the store gives types and steps
        spec = validate_spec(raw, args.train_store)
    summary = train(spec, args.train_store, args.val_store, args.seed, args.out, args.progress)
    if is_main():  # under torchrun: rank 0 speaks for all
        print(
            f"trained {spec.name} (seed {args.seed}): {summary['epochs']} epochs, best epoch "
            f"{summary['best_epoch']}, {summary['select_metric']} = {summary['best_value']:.6g} "
            f"({summary['stop_reason']})"
        )


def _add_tune_lr(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune-lr",
        help="choose a model's learning rate on the validation split",
        description="Train a model from a workflow config once per candidate learning rate "
        "(same seed), each in its own folder under <OUT without .csv>.runs/, and write a CSV "
        "of each rate's best validation value of the config's selection metric "
        "(train.select) and its epoch. Prints the winning rate. The test split is never used; "
        "a rate whose loss becomes non-finite is marked diverged and cannot win. Rerunning "
        "the same command resumes unfinished trainings.",
    )
    p.add_argument("--config", type=Path, required=True, help="workflow config file")
    p.add_argument("--model", required=True, help="model name under 'models' in --config")
    p.add_argument("--lrs", type=float, nargs="+", required=True, help="candidate learning rates")
    p.add_argument(
        "--seed",
        type=_seed(MAX_TRAIN_SEED),
        required=True,
        help="training seed (same for every rate)",
    )
    p.add_argument("--train-store", type=Path, required=True, help="train split (.zarr)")
    p.add_argument("--val-store", type=Path, required=True, help="validation split (.zarr)")
    p.add_argument("--out", type=Path, required=True, help="CSV of rate -> validation value")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs per training (default: the model's train.epochs in --config)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(run=_run_tune_lr)


def _run_tune_lr(args: argparse.Namespace) -> None:
    from smoe.config import load_config
    from smoe.families.heat.config import model_spec
    from smoe.families.heat.tune import tune_lr

    spec = model_spec(load_config(args.config), args.model)
    result = tune_lr(
        spec,
        args.lrs,
        args.train_store,
        args.val_store,
        args.seed,
        args.out,
        epochs=args.epochs,
        progress=args.progress,
    )
    for trial in result.trials:
        value = (
            f"{trial.best_value:.6g} at epoch {trial.best_epoch}" if trial.finished else "diverged"
        )
        print(f"lr {trial.lr:g}: val {trial.metric} = {value}")
    best = result.best
    print(
        f"best lr for {spec.name}: {best.lr:g} (val {best.metric} = {best.best_value:.6g} at "
        f"epoch {best.best_epoch}, {result.mode}); wrote {result.csv}"
    )


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="test metrics of a trained model (its best checkpoint)",
        description="Evaluate best.pt on a store: mse, mae, rmse, nrmse, vrmse, prcntclose "
        "(overall and per region type) and, for SMoE, routing agreement and learned kernels.",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="best.pt from smoe train")
    p.add_argument("--store", type=Path, required=True, help="test split (.zarr)")
    p.add_argument("--out", type=Path, required=True, help="metrics JSON to write")
    p.add_argument(
        "--routing-map",
        type=Path,
        default=None,
        help="also save an SMoE model's majority routing map (.npy)",
    )
    p.add_argument(
        "--predictions",
        type=Path,
        default=None,
        help="also write the test predictions beside the true field (netCDF)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> None:
    from smoe.core.report.results import write_json
    from smoe.families.heat.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint, args.store, args.device, args.routing_map, args.predictions
    )
    write_json(result, args.out)
    metrics = result["metrics"]
    line = f"{result['model']}: prcntclose1.0 = {metrics.get('prcntclose1.0', float('nan')):.4f}"
    if result["routing"]:
        line += f", routing agreement = {result['routing']['agreement']:.2f} %"
    print(line)
    if args.routing_map is not None and not result["routing"]:
        print(f"no routing map written to {args.routing_map}: {result['model']} has no SMoE layer")


def add_table_command(
    sub: argparse._SubParsersAction, name: str, help: str, description: str, writer: str
) -> None:
    """A command that aggregates metrics JSON files into tables in ``--out-dir``;
    ``writer`` is "module:function" (imported when the command runs), called as
    ``function(metrics, out_dir)`` and returning the paths it wrote."""
    p = sub.add_parser(name, help=help, description=description)
    p.add_argument("metrics", type=Path, nargs="+", help="metrics JSON files")
    p.add_argument("--out-dir", type=Path, required=True, help="folder for the tables")
    p.set_defaults(run=_run_table_command, writer=writer)


def _run_table_command(args: argparse.Namespace) -> None:
    import importlib

    module, function = args.writer.split(":")
    outputs = getattr(importlib.import_module(module), function)(args.metrics, args.out_dir)
    print("wrote " + ", ".join(str(path) for path in outputs.values()))


def _add_aggregate(sub: argparse._SubParsersAction) -> None:
    add_table_command(
        sub,
        "aggregate",
        help="tables of every evaluation result (CSV, Markdown and HTML)",
        description="Aggregate metrics JSON files (smoe evaluate) into metrics_long.csv, "
        "summary.csv, summary.md and summary.html: mean +- std over seeds per model (the mean "
        "alone with one seed), overall and per region "
        "type, with published reference figures where they apply.",
        writer="smoe.families.heat.aggregate:aggregate",
    )


def _add_cluster_data(sub: argparse._SubParsersAction) -> None:
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
        "--seed", type=_seed(MAX_DATA_SEED), required=True, help="seed of the data set (0 or more)"
    )
    p.add_argument("--split", choices=SPLITS, required=True, help="which split")
    p.add_argument("--out", type=Path, required=True, help="output store (name ends in .zarr)")
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
    print(
        f"{'replaced existing store' if replacing else 'wrote'} {out}: setting {setting.name}, "
        f"{setting.samples(args.split)} {args.split} samples x {setting.patches} patches x "
        f"{setting.dim} dims, seed {args.seed}"
    )


def _add_cluster_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cluster-train",
        help="train one synthetic-cluster model with one seed",
        description="Train a cluster-family model (cluster_moe or cluster_single) full batch on "
        "a train store, holding out the spec's val_fraction of it to select the best epoch. The "
        "model comes from a workflow config (--config and --model, under clusters.models) or a "
        "resolved spec (--spec, as the workflow passes it).",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="workflow config file (with --model)")
    source.add_argument("--spec", help="resolved model spec as JSON")
    p.add_argument("--model", help="model name under 'clusters.models' in --config")
    p.add_argument("--train-store", type=Path, required=True, help="train split (.zarr)")
    p.add_argument(
        "--seed", type=_seed(MAX_TRAIN_SEED), required=True, help="training seed (0 to 2**32-1)"
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder for best.pt, last.pt, history.csv, train.json",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(run=_run_cluster_train)


def _cluster_spec_argument(args: argparse.Namespace):
    """The model spec of --config/--model or --spec, validated like the workflow's."""
    import json

    from smoe.config import load_config
    from smoe.families.clusters.config import cluster_model_spec, validate_cluster_spec

    if args.config is not None:
        if not args.model:
            raise InputError("--config needs --model NAME (a name under 'clusters.models')")
        return cluster_model_spec(load_config(args.config), args.model)
    try:
        raw = json.loads(args.spec)
    except json.JSONDecodeError as exc:
        raise InputError(f"--spec is not JSON: {exc}") from exc
    return validate_cluster_spec(raw)


def _run_cluster_train(args: argparse.Namespace) -> None:

    from smoe.families.clusters.store import open_cluster_split

    spec = _cluster_spec_argument(args)
    open_cluster_split(args.train_store)  # a missing or damaged store, named, before torch
    from smoe.families.clusters.task import train_cluster

    summary = train_cluster(spec, args.train_store, args.seed, args.out, args.progress)
    print(
        f"trained {spec.name} (seed {args.seed}): {summary['epochs']} epochs, best epoch "
        f"{summary['best_epoch']}, {summary['select_metric']} = {summary['best_value']:.6g} "
        f"({summary['stop_reason']}); wrote {args.out}"
    )


def _add_cluster_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cluster-run",
        help="train and evaluate one synthetic-cluster model for several seeds",
        description="For every seed: smoe cluster-train into MODELS_DIR/seed<k>/, then smoe "
        "cluster-evaluate of its best.pt into METRICS_DIR/seed<k>.json, in one process (the "
        "workflow's job per setting and model; starting PyTorch per seed would cost as much "
        "as the training).",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="workflow config file (with --model)")
    source.add_argument("--spec", help="resolved model spec as JSON")
    p.add_argument("--model", help="model name under 'clusters.models' in --config")
    p.add_argument("--train-store", type=Path, required=True, help="train split (.zarr)")
    p.add_argument("--test-store", type=Path, required=True, help="test split (.zarr)")
    p.add_argument(
        "--seeds", type=_seed(MAX_TRAIN_SEED), nargs="+", required=True, help="training seeds"
    )
    p.add_argument("--models-dir", type=Path, required=True, help="folder of the seed folders")
    p.add_argument("--metrics-dir", type=Path, required=True, help="folder of seed<k>.json")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(run=_run_cluster_run)


def _run_cluster_run(args: argparse.Namespace) -> None:

    from smoe.families.clusters.store import open_cluster_split

    if len(set(args.seeds)) != len(args.seeds):
        raise InputError(f"--seeds lists a seed twice: {args.seeds}")
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
    p.add_argument("--checkpoint", type=Path, required=True, help="best.pt from cluster-train")
    p.add_argument("--store", type=Path, required=True, help="test split (.zarr)")
    p.add_argument(
        "--train-store", type=Path, required=True, help="train split (.zarr): dispatch entropy"
    )
    p.add_argument("--out", type=Path, required=True, help="metrics JSON to write")
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


FIGURES = (
    "routing",
    "predictions",
    "curves",
    "bars",
    "kernels",
    "dynamics",
    "experts",
    "dispatch",
    "projection",
    "gated-routing",
    "accuracy-usage",
)


def _add_figure(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "figure",
        help="one report figure (PNG and SVG)",
        description="Draw one figure of the report and save it as OUT.png and OUT.svg: "
        "routing (true map beside each SMoE routing map), predictions (input/target/"
        "prediction/error per model), curves (learning curves), bars (metrics per model), "
        "kernels (learned kernels beside the true stencils), dynamics (SMoE misrouted fraction, "
        "RC loss and routing agreement per epoch), experts (SMoE expert x region-type counts); "
        "for the synthetic clusters: dispatch (samples of each cluster per expert, with the "
        "dispatch entropy, per MoE), projection (a split's samples projected on the "
        "generating vectors); for the gated modular MoE: gated-routing (expert x class "
        "routing per MoE), accuracy-usage (test accuracy against expert-usage entropy H_u, "
        "beside the published MNIST points).",
    )
    p.add_argument("kind", choices=FIGURES, help="which figure")
    p.add_argument(
        "--metrics",
        type=Path,
        nargs="+",
        default=[],
        help="metrics JSON files (routing, bars, kernels, experts, dispatch, gated-routing, "
        "accuracy-usage)",
    )
    p.add_argument(
        "--store", type=Path, default=None, help="synthetic-cluster split .zarr (projection)"
    )
    p.add_argument("--mask", type=Path, default=None, help="region map .npy/.nc (routing)")
    p.add_argument(
        "--predictions",
        type=Path,
        nargs="+",
        default=[],
        help="prediction netCDF files of smoe evaluate (predictions)",
    )
    p.add_argument(
        "--histories",
        type=Path,
        nargs="+",
        default=[],
        help="history.csv files of smoe train (curves, dynamics)",
    )
    p.add_argument(
        "--run",
        dest="sample_run",
        type=_non_negative,
        default=0,
        help="test run shown (predictions)",
    )
    p.add_argument("--time", type=_non_negative, default=None, help="time step shown (predictions)")
    p.add_argument("--out", type=Path, required=True, help="output path (.png and .svg)")
    p.set_defaults(run=_run_figure)


def _run_figure(args: argparse.Namespace) -> None:
    from smoe.families.heat import figures

    needs = {
        "routing": ("metrics", "mask"),
        "predictions": ("predictions",),
        "curves": ("histories",),
        "bars": ("metrics",),
        "kernels": ("metrics",),
        "dynamics": ("histories",),
        "experts": ("metrics",),
        "dispatch": ("metrics",),
        "projection": ("store",),
        "gated-routing": ("metrics",),
        "accuracy-usage": ("metrics",),
    }
    for option in needs[args.kind]:
        if not getattr(args, option):
            raise InputError(f"figure {args.kind!r} needs --{option}")
    if args.kind == "routing":
        from smoe.families.heat.mask import load_mask

        paths = figures.routing_figure(
            load_mask(args.mask), figures.load_metrics(args.metrics), args.out, args.metrics
        )
    elif args.kind == "predictions":
        paths = figures.predictions_figure(args.predictions, args.out, args.sample_run, args.time)
    elif args.kind == "curves":
        paths = figures.learning_curves_figure(figures.load_histories(args.histories), args.out)
    elif args.kind == "bars":
        paths = figures.metric_bars_figure(
            figures.load_metrics(args.metrics), args.out, sources=args.metrics
        )
    elif args.kind == "dynamics":
        from smoe.families.heat.dynamics import dynamics_figure

        paths = dynamics_figure(figures.load_histories(args.histories), args.out)
    elif args.kind == "experts":
        from smoe.families.heat.dynamics import expert_region_figure

        paths = expert_region_figure(
            figures.load_metrics(args.metrics), args.out, sources=args.metrics
        )
    elif args.kind == "dispatch":
        from smoe.families.clusters.figures import dispatch_figure
        from smoe.families.clusters.table import load_cluster_results

        paths = dispatch_figure(load_cluster_results(args.metrics), args.out)
    elif args.kind == "projection":
        from smoe.families.clusters.figures import projection_figure
        from smoe.families.clusters.store import open_cluster_split

        open_cluster_split(args.store)  # a missing or damaged store, named
        paths = projection_figure(args.store, args.out)
    elif args.kind in ("gated-routing", "accuracy-usage"):
        from smoe.families.gated import figures as gated_figures

        draw = {
            "gated-routing": gated_figures.plot_gated_routing,
            "accuracy-usage": gated_figures.plot_accuracy_usage,
        }[args.kind]
        draw(args.metrics, args.out)
        paths = figures.figure_paths(args.out)
    else:
        paths = figures.kernels_figure(figures.load_metrics(args.metrics), args.out, args.metrics)
    print("wrote " + ", ".join(str(path) for path in paths))


def _add_check_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check-config",
        help="validate a workflow config and print it with defaults filled in",
        description="Validate a config file against workflow/schemas/config.schema.yaml and the "
        "cross-key checks the workflow runs before any job.",
    )
    p.add_argument("config", type=Path, help="YAML config file")
    p.set_defaults(run=_run_check_config)


def _run_check_config(args: argparse.Namespace) -> None:
    import yaml

    from smoe.config import load_config

    print(yaml.safe_dump(load_config(args.config), sort_keys=False), end="")


def _add_provenance(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "provenance",
        help="the resolved config and software versions as a report page",
        description="Write OUT (an HTML page for the report) with the software versions and "
        "the resolved config, plus config.yaml and versions.json beside it.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--config", type=Path, help="YAML config file (validated, defaults filled in)"
    )
    source.add_argument(
        "--config-json", help="an already validated config as a JSON object (the workflow's)"
    )
    p.add_argument("--out", type=Path, required=True, help="HTML page to write")
    p.set_defaults(run=_run_provenance)


def _run_provenance(args: argparse.Namespace) -> None:
    import json

    from smoe.core.report.provenance import write_provenance

    if args.config is not None:
        from smoe.config import load_config

        config = load_config(args.config)
    else:
        try:
            config = json.loads(args.config_json)
        except ValueError as exc:
            raise InputError(f"--config-json is not JSON ({exc})") from exc
        if not isinstance(config, dict):
            raise InputError("--config-json is not a JSON object")
    paths = write_provenance(config, args.out)
    print("wrote " + ", ".join(str(path) for path in paths.values()))


def _add_gated(sub: argparse._SubParsersAction) -> None:
    from smoe.families.gated.cli import add_gated_commands

    add_gated_commands(sub, _seed(MAX_TRAIN_SEED), _seed(MAX_DATA_SEED))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="smoe",
        description="Spatial Mixture-of-Experts workflow steps. Each subcommand is one step "
        "of the Snakemake workflow and also runs by hand.",
    )
    parser.add_argument("--version", action="version", version=f"smoe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_mask,
        _add_simulate,
        _add_export,
        _add_train,
        _add_tune_lr,
        _add_evaluate,
        _add_aggregate,
        _add_cluster_data,
        _add_cluster_train,
        _add_cluster_evaluate,
        _add_cluster_run,
        _add_cluster_table,
        _add_gated,
        _add_figure,
        _add_provenance,
        _add_check_config,
    ):
        add(sub)
    return parser


def _paths(args: argparse.Namespace) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The input files and the outputs (path, ``file`` or ``folder``) of a command line."""
    command = args.command
    if command == "mask":
        return [args.source], [(args.out, "file"), (args.png, "file")]
    if command == "simulate":
        return [args.mask], [(args.out, "folder")]
    if command == "export":
        return [args.store], [(args.out, "file")]
    if command == "train":
        return [args.config, args.train_store, args.val_store], [(args.out, "folder")]
    if command == "tune-lr":
        runs = args.out.with_name(f"{args.out.stem}.runs")
        inputs = [args.config, args.train_store, args.val_store]
        return inputs, [(args.out, "file"), (runs, "folder")]
    if command == "evaluate":
        outputs = [(args.out, "file"), (args.routing_map, "file"), (args.predictions, "file")]
        return [args.checkpoint, args.store], outputs
    if command == "provenance":
        beside = [args.out.with_name(name) for name in ("config.yaml", "versions.json")]
        return [args.config], [(path, "file") for path in (args.out, *beside)]
    if command == "aggregate":
        from smoe.families.heat.aggregate import OUTPUTS

        tables = [args.out_dir / name for name in OUTPUTS.values()]
        return list(args.metrics), [(args.out_dir, "folder"), *((t, "file") for t in tables)]
    if command == "cluster-data":
        return [], [(args.out, "folder")]
    if command == "cluster-train":
        return [args.config, args.train_store], [(args.out, "folder")]
    if command == "cluster-evaluate":
        return [args.checkpoint, args.store, args.train_store], [(args.out, "file")]
    if command == "cluster-run":
        outputs = [(args.models_dir, "folder"), (args.metrics_dir, "folder")]
        seeds = dict.fromkeys(args.seeds)  # a repeated seed is refused by the command itself
        outputs += [(args.metrics_dir / f"seed{seed}.json", "file") for seed in seeds]
        return [args.train_store, args.test_store], outputs
    if command == "cluster-table":
        tables = [args.out_dir / name for name in CLUSTER_TABLES]
        return list(args.metrics), [(args.out_dir, "folder"), *((t, "file") for t in tables)]
    if command.startswith("gated-"):
        from smoe.families.gated.cli import gated_paths

        return gated_paths(args)
    if command == "figure":
        from smoe.core.report.figures import figure_paths

        inputs = [*args.metrics, args.mask, *args.predictions, *args.histories, args.store]
        return inputs, [(path, "file") for path in figure_paths(args.out)]
    return [], []


def check_paths(args: argparse.Namespace) -> None:
    """Refuse, before any work, outputs that cannot be written or that would overwrite an
    input or each other."""
    from smoe.core.atomic import check_output

    inputs, outputs = _paths(args)
    outputs = [(Path(path), kind) for path, kind in outputs if path is not None]
    seen: dict[Path, Path] = {}
    read = {Path(p).resolve(): Path(p) for p in inputs if p is not None}
    for path, kind in outputs:
        check_output(path, kind)
        resolved = path.resolve()
        if resolved in read:
            raise InputError(
                f"output {str(path)!r} is also an input ({str(read[resolved])!r}); "
                "it would be overwritten: choose another output"
            )
        if resolved in seen:
            raise InputError(f"output {str(path)!r} is given twice ({str(seen[resolved])!r})")
        seen[resolved] = path


def _one_line_message(exc: InputError) -> str:
    """A message listing several problems (one per line) as one line, joined by '; '."""
    first, *rest = str(exc).splitlines() or [""]
    rest = [line.strip() for line in rest if line.strip()]
    return " ".join([first.rstrip(), "; ".join(rest)]) if rest else first


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prefix = f"smoe {args.command}: error:"
    try:
        check_paths(args)
        status = _relaunch_under_torchrun(args, sys.argv[1:] if argv is None else argv)
        if status is not None:
            return status
        args.run(args)
    except InputError as exc:
        print(f"{prefix} {_one_line_message(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a read-only folder, a full disk, a file that went away
        print(f"{prefix} {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except MemoryError as exc:  # a size asked for that this machine cannot hold
        print(f"{prefix} not enough memory ({one_line(exc) or 'MemoryError'})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"smoe {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("SMOE_DEBUG"):
            raise
        print(
            f"{prefix} unexpected {type(exc).__name__}: {one_line(exc)} (this is a bug in smoe: "
            "please report it with the command line; SMOE_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
