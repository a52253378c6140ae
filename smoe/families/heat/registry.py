"""One registry of model kinds by name, so config, CLI, rules and reports agree on names.

A config names a model kind (``smoe``, ``cnn``, ...) and its options; :func:`build_model`
turns that into a module, and every unknown kind or option fails here with the known ones
listed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from smoe.core.errors import InputError
from smoe.families.heat.analytic import GeneratorPredictor, StencilPredictor
from smoe.families.heat.baselines import BASELINES
from smoe.nn.layer import SMoENet

MODELS: dict[str, Callable[..., nn.Module]] = {
    **BASELINES,
    "smoe": SMoENet,
    "stencil": StencilPredictor,
    "generator": GeneratorPredictor,
}
"""Model kinds: constructors taking (in_channels, height, width, **options)."""

DATA_ARGUMENTS = ("mask", "region_diffusivity", "boundary")
"""What a constructor may take from the data rather than the config, by parameter name."""


def model_kinds() -> list[str]:
    return sorted(MODELS)


def _data_arguments(builder: Callable[..., nn.Module], data: dict[str, Any]) -> dict[str, Any]:
    """The data facts (region map, diffusivities, boundary) this constructor asks for."""
    wanted = inspect.signature(builder).parameters
    return {name: data[name] for name in DATA_ARGUMENTS if name in wanted and name in data}


def build_model(
    kind: str,
    options: dict[str, Any],
    in_channels: int,
    height: int,
    width: int,
    mask: torch.Tensor | None = None,
    name: str | None = None,
    region_diffusivity: tuple[float, ...] = (),
    boundary: str = "zero",
) -> nn.Module:
    """Construct a model by kind; the data's region map, diffusivities and boundary reach the
    kinds that take them (the oracle gate, the analytic predictors)."""
    label = f"model {name!r} (kind {kind!r})" if name else f"model kind {kind!r}"
    if kind not in MODELS:
        raise InputError(f"unknown model kind {kind!r}; known kinds: {', '.join(model_kinds())}")
    builder = MODELS[kind]
    data = {"mask": mask, "region_diffusivity": tuple(region_diffusivity), "boundary": boundary}
    extra = _data_arguments(builder, data)
    try:
        return builder(in_channels, height, width, **extra, **options)
    except InputError as exc:
        raise InputError(f"{label}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise InputError(f"{label}: bad option ({exc})") from exc
