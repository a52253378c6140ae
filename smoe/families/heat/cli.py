"""The heat family's ``smoe`` commands: ``mask``, ``simulate``, ``export``, ``train``,
``tune-lr``, ``evaluate``, ``aggregate``, and its ``smoe figure`` kinds; each a workflow job
and runnable by hand. Errors follow :mod:`smoe.core.cli`: one line, exit status 2."""

from __future__ import annotations

import argparse
from pathlib import Path

from smoe.core.cli import (
    Seeds,
    add_evaluation_arguments,
    add_model_command,
    add_store_output,
    add_stores,
    add_table_command,
    positive,
    spec_from_arguments,
    store_written,
    table_outputs,
    training_summary,
)
from smoe.core.zarr_store import store_argument


def _add_mask(sub: argparse._SubParsersAction, seeds: Seeds) -> None:
    p = sub.add_parser(
        "mask",
        help="generate a region map (or check and copy an existing one)",
        description="Draw a region map with the SMoE paper's sampler (seed 42, 64x64, 3 types "
        "gives the paper's map), or validate an existing .npy/.nc map with --from.",
    )
    p.add_argument("--height", type=int, default=64, help="rows (default 64)")
    p.add_argument("--width", type=int, default=64, help="columns (default 64)")
    p.add_argument("--types", type=int, default=3, help="region types T (default 3)")
    p.add_argument("--seed", type=seeds.data, default=42, help="generator seed (default 42)")
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


def _add_simulate(sub: argparse._SubParsersAction, seeds: Seeds) -> None:
    from smoe.families.heat.choices import BOUNDARIES, COMPRESSIONS, INIT_KINDS, SCHEDULERS

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
        type=seeds.data,
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
    add_store_output(p)
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
    held = f"{args.runs} runs x {args.steps + 1} frames x {mask.shape[0]}x{mask.shape[1]}"
    print(store_written(out, replacing, held))


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a zarr store as netCDF4",
        description="Copy a simulation store into one compressed netCDF4 file (CF attributes "
        "kept) for tools that read netCDF but not zarr.",
    )
    p.add_argument("store", type=store_argument, help="input zarr store")
    p.add_argument("out", type=Path, help="output netCDF file (.nc)")
    p.add_argument("--workers", type=positive, default=1, help="dask threads (default 1)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> None:
    from smoe.families.heat.store import export_netcdf

    out = export_netcdf(args.store, args.out, progress=args.progress, workers=args.workers)
    print(f"wrote {out}")


def _add_train(sub: argparse._SubParsersAction, seeds: Seeds) -> None:
    add_model_command(
        sub,
        "train",
        help="train one model with one seed",
        description="Train a model on a train store, selecting the best epoch on a validation "
        "store. The model comes from a workflow config (--config and --model) or a resolved "
        "spec (--spec, as the workflow passes it). Resumes from OUT/last.pt when it exists.",
        section="models",
        stores=("train", "val"),
        run=_run_train,
        seed=seeds.train,
        seeds=False,
        processes=True,
    )


def _check_inputs_exist(*stores: Path, checkpoint: Path | None = None) -> None:
    """Refuse a missing checkpoint or store before the heavy imports (PyTorch, xarray): a
    wrong path is said in a fraction of a second, not after three."""
    from smoe.core.file_checks import require_checkpoint
    from smoe.core.zarr_store import check_store_folder
    from smoe.families.heat.choices import STORE_REDO

    if checkpoint is not None:
        require_checkpoint(checkpoint)
    for store in stores:
        check_store_folder(Path(store), STORE_REDO)


def _run_train(args: argparse.Namespace) -> None:
    _check_inputs_exist(args.train_store, args.val_store)
    from smoe.config import load_config
    from smoe.core.train.distributed import is_main
    from smoe.families.heat.config import model_spec, validate_spec
    from smoe.families.heat.task import train

    spec = spec_from_arguments(
        args,
        "models",
        model_spec,
        # the workflow's checks of a model, keys named; the store gives types and steps
        lambda raw: validate_spec(raw, args.train_store),
        load_config,
    )
    summary = train(spec, args.train_store, args.val_store, args.seed, args.out, args.progress)
    if is_main():  # under torchrun: rank 0 speaks for all
        print(training_summary(spec.name, args.seed, summary))


def _add_tune_lr(sub: argparse._SubParsersAction, seeds: Seeds) -> None:
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
        type=seeds.train,
        required=True,
        help="training seed (same for every rate)",
    )
    add_stores(p, "train", "val")
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
    add_evaluation_arguments(p, "smoe train")
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
    _check_inputs_exist(args.store, checkpoint=args.checkpoint)
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


def add_commands(sub: argparse._SubParsersAction, seeds: Seeds) -> None:
    """Register the family's subcommands."""
    _add_mask(sub, seeds)
    _add_simulate(sub, seeds)
    _add_export(sub)
    _add_train(sub, seeds)
    _add_tune_lr(sub, seeds)
    _add_evaluate(sub)
    _add_aggregate(sub)


def paths(args: argparse.Namespace) -> tuple[list, list] | None:
    """Inputs and outputs (path, ``file`` or ``folder``) of one of the family's command
    lines, for the checks before any work; None for other commands."""
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
    if command == "aggregate":
        from smoe.families.heat.aggregate import OUTPUTS

        return table_outputs(args, list(OUTPUTS.values()))
    return None


# -- smoe figure KIND ----------------------------------------------------------------------


def _draw_routing(args: argparse.Namespace):
    from smoe.families.heat import figures
    from smoe.families.heat.mask import load_mask

    metrics = figures.load_metrics(args.metrics)
    return figures.routing_figure(load_mask(args.mask), metrics, args.out, args.metrics)


def _draw_predictions(args: argparse.Namespace):
    from smoe.families.heat.prediction_figure import predictions_figure

    return predictions_figure(args.predictions, args.out, args.sample_run, args.time)


def _draw_curves(args: argparse.Namespace):
    from smoe.families.heat import figures

    return figures.learning_curves_figure(figures.load_histories(args.histories), args.out)


def _draw_bars(args: argparse.Namespace):
    from smoe.families.heat import figures

    return figures.metric_bars_figure(
        figures.load_metrics(args.metrics), args.out, sources=args.metrics
    )


def _draw_kernels(args: argparse.Namespace):
    from smoe.families.heat.figures import load_metrics
    from smoe.families.heat.kernel_figure import kernels_figure

    return kernels_figure(load_metrics(args.metrics), args.out, args.metrics)


def _draw_dynamics(args: argparse.Namespace):
    from smoe.families.heat.dynamics import dynamics_figure
    from smoe.families.heat.figures import load_histories

    return dynamics_figure(load_histories(args.histories), args.out)


def _draw_experts(args: argparse.Namespace):
    from smoe.families.heat.dynamics import expert_region_figure
    from smoe.families.heat.figures import load_metrics

    return expert_region_figure(load_metrics(args.metrics), args.out, sources=args.metrics)


FIGURES = {
    "routing": (("metrics", "mask"), _draw_routing, "true map beside each SMoE routing map"),
    "predictions": (
        ("predictions",),
        _draw_predictions,
        "input/target/prediction/error per model",
    ),
    "curves": (("histories",), _draw_curves, "learning curves"),
    "bars": (("metrics",), _draw_bars, "metrics per model"),
    "kernels": (("metrics",), _draw_kernels, "learned kernels beside the true stencils"),
    "dynamics": (
        ("histories",),
        _draw_dynamics,
        "SMoE misrouted fraction, RC loss and routing agreement per epoch",
    ),
    "experts": (("metrics",), _draw_experts, "SMoE expert x region-type counts"),
}
