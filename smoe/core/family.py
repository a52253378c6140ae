"""What an experiment family gives the rest of the package: its name, its report title, its
config section and a few hooks, each named as ``"module:attribute"`` and imported only when
used (so ``smoe --help`` and Snakemake's planning do not import PyTorch for a family they do
not touch).

Hooks a family may define (all optional):

* ``config_errors(config, schema) -> list[str]``: its cross-key checks of a schema-valid
  config with defaults (lines ``config key '...': ...``);
* ``cuda_wanted(config, valid) -> dict[str, list[str]]``: the config keys that send one of its
  models to CUDA, with the models (``valid``: no check has failed so far);
* ``stale_outputs(config) -> list[str]``: outputs on disk that no longer match how they were
  made, checked while planning;
* ``add_commands(sub, seeds) -> None``: its ``smoe`` subcommands (``seeds``: the train and
  data seed argument types);
* ``cli_paths(args) -> (inputs, outputs) | None``: the paths of one of its command lines,
  for the CLI's checks before any work;
* ``figures -> dict[str, str]``: its ``smoe figure KIND`` kinds, each a ``"module:function"``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Family:
    """One experiment family: ``name`` is its folder under ``smoe/families/`` and under the
    results; ``title`` its report subcategory; ``section`` its config section (None: the
    config's top-level keys); ``schema`` its part of the config schema (a YAML file beside
    its package); ``hooks`` name -> ``"module:attribute"``."""

    name: str
    title: str
    section: str | None
    schema: Path
    hooks: Mapping[str, str] = field(default_factory=dict)

    def hook(self, name: str) -> Any:
        """The hook ``name`` (imported now), or None when the family has none."""
        target = self.hooks.get(name)
        if target is None:
            return None
        module, attribute = target.split(":")
        return getattr(importlib.import_module(module), attribute)
