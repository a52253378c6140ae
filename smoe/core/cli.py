"""What every family's ``smoe`` commands share: one-line errors, argument types, the
checks of a command line's paths before any work, the ``--processes`` relaunch under
torchrun, model specs from ``--config``/``--model`` or ``--spec``, the table command, and the
run loop that turns every refusal into ``smoe COMMAND: error: ...`` and exit status 2.

The CLI only parses options and calls one package function. Anything a user can get wrong
(an option, an input file, an output path, a damaged store) ends in one line on stderr and
exit status 2, never a traceback; outputs are checked before any work, and nothing that
existed is changed. An unexpected failure (a bug) ends in one line asking for a report and
exit status 1; ``SMOE_DEBUG=1`` shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smoe.core.errors import InputError, describe_os_error, one_line
from smoe.core.zarr_store import store_argument

MAX_TRAIN_SEED = 2**32 - 1  # numpy's legacy seeding (np.random.seed) takes 32 bits


MAX_DATA_SEED = 2**63 - 1  # stores record the seed as int64


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other error of ``smoe``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def integer(text: str, what: str, low: int, high: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise argparse.ArgumentTypeError(f"{what} must be {bound}, got {value}")
    return value


def seed_type(high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        return integer(text, "a seed", 0, high)

    parse.__name__ = "seed"
    return parse


def non_negative(text: str) -> int:
    return integer(text, "the value", 0)


def positive(text: str) -> int:
    return integer(text, "the value", 1)


def add_processes_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--processes",
        type=positive,
        default=1,
        help="train on N processes: the command starts itself under torchrun "
        "(DistributedDataParallel on shares of each global minibatch; same results as 1)",
    )


def relaunch_under_torchrun(args: argparse.Namespace, argv: Sequence[str]) -> int | None:
    """With ``--processes N`` > 1 outside torchrun, run this very command line on N
    processes (``torchrun --standalone``) and return its exit status; None to go on here.
    Under torchrun, ``--processes`` must be the number torchrun started."""
    processes = getattr(args, "processes", 1)
    if processes == 1 and "WORLD_SIZE" not in os.environ:
        return None  # before importing PyTorch: most commands never need it
    from smoe.core.train.distributed import launched, smoe_command

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


def add_table_command(
    sub: argparse._SubParsersAction, name: str, help: str, description: str, writer: str
) -> None:
    """A command that aggregates metrics JSON files into tables in ``--out-dir``;
    ``writer`` is "module:function" (imported when the command runs), called as
    ``function(metrics, out_dir)`` and returning the paths it wrote."""
    p = sub.add_parser(name, help=help, description=description)
    p.add_argument("metrics", type=Path, nargs="+", help="metrics JSON files")
    p.add_argument("--out-dir", type=Path, required=True, help="folder for the tables")
    p.set_defaults(run=run_table_command, writer=writer)


def run_table_command(args: argparse.Namespace) -> None:
    import importlib

    module, function = args.writer.split(":")
    outputs = getattr(importlib.import_module(module), function)(args.metrics, args.out_dir)
    print("wrote " + ", ".join(str(path) for path in outputs.values()))


def one_line_message(exc: InputError) -> str:
    """A message listing several problems (one per line) as one line, joined by '; '."""
    first, *rest = str(exc).splitlines() or [""]
    rest = [line.strip() for line in rest if line.strip()]
    return " ".join([first.rstrip(), "; ".join(rest)]) if rest else first


@dataclass(frozen=True)
class Seeds:
    """The argument types of a training seed (32 bits: numpy's legacy seeding) and of a data
    seed (63 bits: stores record it as int64), handed to every family's commands."""

    train: Callable[[str], int]
    data: Callable[[str], int]


SEEDS = Seeds(seed_type(MAX_TRAIN_SEED), seed_type(MAX_DATA_SEED))


def add_spec_arguments(p: argparse.ArgumentParser, section: str) -> None:
    """``--config FILE --model NAME`` or ``--spec JSON``: the model a command works on;
    ``section`` names where NAME lives in the config (e.g. ``gated.models``)."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="workflow config file (with --model)")
    source.add_argument("--spec", help="model spec as JSON (as the workflow passes it)")
    p.add_argument("--model", help=f"model name under '{section}' in --config")


def spec_from_arguments(
    args: argparse.Namespace,
    section: str,
    from_config: Callable[[dict[str, Any], str], Any],
    from_json: Callable[[Any], Any],
    load: Callable[[Path], dict[str, Any]],
) -> Any:
    """The model spec of ``--config``/``--model`` (``from_config(config, name)`` on the
    config ``load`` reads and validates) or of ``--spec`` (``from_json(parsed JSON)``, which
    checks it)."""
    if args.config is not None:
        if not args.model:
            raise InputError(f"--config needs --model NAME (a name under '{section}')")
        return from_config(load(args.config), args.model)
    if args.model:
        raise InputError("--model goes with --config, not with --spec")
    try:
        raw = json.loads(args.spec)
    except json.JSONDecodeError as exc:
        raise InputError(f"--spec is not JSON: {exc}") from None
    return from_json(raw)


def add_stores(p: argparse.ArgumentParser, *splits: str) -> None:
    """``--<split>-store PATH`` for each split a command reads (a zarr store)."""
    for split in splits:
        p.add_argument(
            f"--{split}-store", type=store_argument, required=True, help=f"{split} split (.zarr)"
        )


def add_store_output(p: argparse.ArgumentParser) -> None:
    """``--out``: the store a data command writes (its folder, or the folder's zarr.json)."""
    p.add_argument(
        "--out", type=store_argument, required=True, help="output store (name ends in .zarr)"
    )


def add_training_arguments(p: argparse.ArgumentParser, seed: Callable[[str], int]) -> None:
    """What every one-model, one-seed training command takes besides its model and stores:
    ``--seed``, ``--out`` (the run's folder) and ``--no-progress``."""
    p.add_argument("--seed", type=seed, required=True, help="training seed (0 to 2**32-1)")
    p.add_argument(
        "--out", type=Path, required=True, help="folder for best.pt, last.pt, history.csv, ..."
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def add_evaluation_arguments(p: argparse.ArgumentParser, trained_by: str) -> None:
    """What every evaluation command takes: ``--checkpoint`` (a ``best.pt`` of
    ``trained_by``), ``--store`` (the test split) and ``--out`` (the metrics JSON)."""
    p.add_argument("--checkpoint", type=Path, required=True, help=f"best.pt of {trained_by}")
    p.add_argument("--store", type=store_argument, required=True, help="test split (.zarr)")
    p.add_argument("--out", type=Path, required=True, help="metrics JSON to write")


def add_model_command(
    sub: argparse._SubParsersAction,
    name: str,
    help: str,
    description: str,
    section: str,
    stores: Sequence[str],
    run: Callable[[argparse.Namespace], None],
    seed: Callable[[str], int],
    seeds: bool = False,
    processes: bool = False,
) -> argparse.ArgumentParser:
    """A command that trains one model (``--config``/``--model`` under ``section``, or
    ``--spec``) on ``stores``: for one seed into ``--out``, or with ``seeds`` for several
    (and evaluates each); ``processes`` adds ``--processes``. The parser, for the family's own
    options."""
    p = sub.add_parser(name, help=help, description=description)
    add_spec_arguments(p, section)
    add_stores(p, *stores)
    if seeds:
        add_seed_runs_arguments(p, seed)
    else:
        add_training_arguments(p, seed)
    if processes:
        add_processes_option(p)
    p.set_defaults(run=run)
    return p


def training_summary(name: str, seed: int, summary: dict[str, Any]) -> str:
    """One line saying how a training ended, from its ``train.json`` summary."""
    return (
        f"trained {name} (seed {seed}): {summary['epochs']} epochs, kept epoch "
        f"{summary['best_epoch']}, {summary['select_metric']} = {summary['best_value']:.6g} "
        f"({summary['stop_reason']})"
    )


def store_written(out: Path, replacing: bool, what: str) -> str:
    """One line saying a store was written (or replaced) and what it holds."""
    return f"{'replaced existing store' if replacing else 'wrote'} {out}: {what}"


def add_seed_runs_arguments(p: argparse.ArgumentParser, seed: Callable[[str], int]) -> None:
    """The options of a command that trains and evaluates one model for several seeds in one
    process (a workflow job per model): ``--seeds``, ``--models-dir``, ``--metrics-dir`` and
    ``--no-progress``."""
    p.add_argument("--seeds", type=seed, nargs="+", required=True, help="training seeds")
    p.add_argument("--models-dir", type=Path, required=True, help="folder of the seed folders")
    p.add_argument("--metrics-dir", type=Path, required=True, help="folder of seed<k>.json")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def check_seeds(seeds: Sequence[int]) -> None:
    """Refuse a seed listed twice (two trainings would write one folder)."""
    if len(set(seeds)) != len(seeds):
        raise InputError(f"--seeds lists a seed twice: {list(seeds)}")


def seed_runs_outputs(args: argparse.Namespace) -> list[tuple[Path, str]]:
    """The outputs of such a command, for :func:`check_paths`."""
    outputs = [(args.models_dir, "folder"), (args.metrics_dir, "folder")]
    seeds = dict.fromkeys(args.seeds)  # a repeated seed is refused by the command itself
    return outputs + [(args.metrics_dir / f"seed{seed}.json", "file") for seed in seeds]


def table_outputs(args: argparse.Namespace, names: Sequence[str]) -> tuple[list, list]:
    """Inputs and outputs of a table command writing ``names`` into ``--out-dir``."""
    tables = [args.out_dir / name for name in names]
    return list(args.metrics), [(args.out_dir, "folder"), *((t, "file") for t in tables)]


def check_paths(inputs: Sequence[Any], outputs: Sequence[tuple[Any, str]]) -> None:
    """Refuse, before any work, outputs that cannot be written or that would overwrite an
    input or each other (``outputs``: (path, ``file`` or ``folder``); None entries skipped)."""
    from smoe.core.atomic import check_output

    checked = [(Path(path), kind) for path, kind in outputs if path is not None]
    seen: dict[Path, Path] = {}
    read = {Path(p).resolve(): Path(p) for p in inputs if p is not None}
    for path, kind in checked:
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


def run_command(
    args: argparse.Namespace,
    argv: Sequence[str],
    paths: Callable[[argparse.Namespace], tuple[list, list]],
) -> int:
    """Run a parsed command line: its paths checked, relaunched under torchrun when it asks
    for several processes, every refusal one line and exit status 2."""
    prefix = f"smoe {args.command}: error:"
    try:
        check_paths(*paths(args))
        status = relaunch_under_torchrun(args, argv)
        if status is not None:
            return status
        args.run(args)
    except InputError as exc:
        print(f"{prefix} {one_line_message(exc)}", file=sys.stderr)
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
