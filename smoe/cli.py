"""The ``smoe`` command, built from the core's verbs (``figure``, ``provenance``,
``check-config``) and each registered family's (:data:`smoe.families.NAMES`): one subcommand
per workflow step, each runnable by hand. Errors follow :mod:`smoe.core.cli`: one line
``smoe COMMAND: error: ...`` and exit status 2, never a traceback.

Starting it imports no family's models, no PyTorch and no data library: a family's commands
import what they use when they run, so ``smoe --help`` and a job that only checks its inputs
start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from smoe import __version__
from smoe.core.cli import SEEDS, Parser, non_negative, run_command
from smoe.core.errors import InputError
from smoe.core.zarr_store import store_argument
from smoe.families import families


def figure_kinds() -> dict[str, tuple]:
    """Every family's ``smoe figure`` kinds: kind -> (options it needs, draw, what it shows)."""
    kinds: dict[str, tuple] = {}
    for family in families():
        kinds.update(family.hook("figures") or {})
    return kinds


def _add_figure(sub: argparse._SubParsersAction) -> None:
    kinds = figure_kinds()
    shown = "; ".join(f"{kind} ({what})" for kind, (_, _, what) in kinds.items())
    p = sub.add_parser(
        "figure",
        help="one report figure (PNG and SVG)",
        description=f"Draw one figure of the report and save it as OUT.png and OUT.svg: {shown}.",
    )
    p.add_argument("kind", choices=tuple(kinds), help="which figure")
    p.add_argument("--metrics", type=Path, nargs="+", default=[], help="metrics JSON files")
    p.add_argument(
        "--store", type=store_argument, default=None, help="a data split .zarr (projection)"
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
    p.add_argument("--run", dest="sample_run", type=non_negative, default=0, help="test run shown")
    p.add_argument("--time", type=non_negative, default=None, help="time step shown")
    p.add_argument("--out", type=Path, required=True, help="output path (.png and .svg)")
    p.set_defaults(run=_run_figure)


def _run_figure(args: argparse.Namespace) -> None:
    needs, draw, _ = figure_kinds()[args.kind]
    for option in needs:
        if not getattr(args, option):
            raise InputError(f"figure {args.kind!r} needs --{option}")
    paths = draw(args)
    print("wrote " + ", ".join(str(path) for path in paths))


def _add_check_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check-config",
        help="validate a workflow config and print it with defaults filled in",
        description="Validate a config file against the config schema (the core's "
        "workflow/schemas/config.schema.yaml with every family's part) and the cross-key "
        "checks the workflow runs before any job; --schema prints that whole schema instead.",
    )
    p.add_argument("config", type=Path, nargs="?", help="YAML config file")
    p.add_argument("--schema", action="store_true", help="print the assembled config schema")
    p.set_defaults(run=_run_check_config)


def _run_check_config(args: argparse.Namespace) -> None:
    import yaml

    from smoe.config import load_config, load_schema

    if args.schema:
        print(yaml.safe_dump(load_schema(), sort_keys=False), end="")
        return
    if args.config is None:
        raise InputError("give a config file (or --schema)")
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


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="smoe",
        description="Mixture-of-experts workflow steps. Each subcommand is one step of the "
        "Snakemake workflow and also runs by hand.",
    )
    parser.add_argument("--version", action="version", version=f"smoe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for family in families():
        family.hook("add_commands")(sub, SEEDS)
    for add in (_add_figure, _add_provenance, _add_check_config):
        add(sub)
    return parser


def paths(args: argparse.Namespace) -> tuple[list, list]:
    """The input files and the outputs (path, ``file`` or ``folder``) of a command line."""
    if args.command == "provenance":
        beside = [args.out.with_name(name) for name in ("config.yaml", "versions.json")]
        return [args.config], [(path, "file") for path in (args.out, *beside)]
    if args.command == "figure":
        from smoe.core.report.figures import figure_paths

        inputs = [*args.metrics, args.mask, *args.predictions, *args.histories, args.store]
        return inputs, [(path, "file") for path in figure_paths(args.out)]
    for family in families():
        found = family.hook("cli_paths")(args)
        if found is not None:
            return found
    return [], []


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args, sys.argv[1:] if argv is None else argv, paths)
