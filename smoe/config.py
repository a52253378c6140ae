"""The workflow config as a whole: the core's schema and checks with every registered family's
part (:data:`smoe.families.NAMES`).

The Snakefile and the ``smoe`` command both go through :func:`validate_config`, so a bad
config fails the same way everywhere: before any job runs, with the key named.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from smoe.core import config as core
from smoe.core.errors import InputError
from smoe.families import families

SCHEMA_PATH = core.SCHEMA_PATH


@functools.lru_cache(maxsize=4)
def _merged_schema(core_path: Path) -> str:
    schema = core.load_schema(core_path)
    schema.setdefault("$defs", {})
    for family in families():
        part = yaml.safe_load(family.schema.read_text()) or {}
        for key in ("properties", "$defs"):
            for name, value in (part.get(key) or {}).items():
                if name in schema[key]:
                    raise InputError(
                        f"config schema: family {family.name!r} defines {key} {name!r} "
                        f"again ({family.schema})"
                    )
                schema[key][name] = value
    return yaml.safe_dump(schema, sort_keys=False)


def load_schema(path: str | Path = SCHEMA_PATH) -> dict[str, Any]:
    """The whole config schema: ``path`` (the keys every family shares) with each family's
    ``properties`` and ``$defs`` added in the order of the family list."""
    return yaml.safe_load(_merged_schema(Path(path)))


def validate_config(
    config: dict[str, Any],
    schema_path: str | Path = SCHEMA_PATH,
    *,
    gpu: str | None = None,
    executor: str | None = None,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``config`` with defaults filled in and every check passed, or an InputError listing
    every problem with its key (:func:`smoe.core.config.validate_config` with the families'
    schema parts and checks)."""
    return core.validate_config(
        config,
        load_schema(schema_path),
        families(),
        gpu=gpu,
        executor=executor,
        warn=warn,
    )


def check_config(
    config: dict[str, Any],
    schema: dict[str, Any] | None = None,
    *,
    gpu: str | None = None,
    executor: str | None = None,
    warn: Callable[[str], None] | None = None,
) -> None:
    """The cross-key checks of every family on a schema-valid config with its defaults."""
    core.check_config(
        config, schema or load_schema(), families(), gpu=gpu, executor=executor, warn=warn
    )


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file and validate it."""
    raw = core.read_config_file(path)
    try:
        return validate_config(raw)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from exc


def stale_outputs(config: dict[str, Any]) -> list[str]:
    """Every family's outputs on disk that no longer match how they were made (one line
    each, naming the file and how to regenerate it), checked while planning."""
    problems: list[str] = []
    for family in families():
        check = family.hook("stale_outputs")
        if check is not None:
            problems += check(config)
    return problems
