"""Building blocks of the model-option schemas every family writes (no PyTorch).

A model's ``options`` reach its constructor as keyword arguments. Refusing a bad option there
would happen inside the train job, after Snakemake has deleted the job's old outputs; so each
family describes every option of its kinds as a JSON schema with its type, range and default
(``smoe/families/<name>/options.py``), built from these helpers, and checks a config's options
against them when the config is validated.
"""

from __future__ import annotations

from typing import Any


def flag(default: bool, description: str) -> dict[str, Any]:
    return {"type": "boolean", "default": default, "description": description}


def integer(default: int | None, description: str, minimum: int = 1) -> dict[str, Any]:
    kind: Any = "integer" if default is not None else ["integer", "null"]
    return {"type": kind, "minimum": minimum, "default": default, "description": description}


def odd_integer(default: int, description: str) -> dict[str, Any]:
    """A kernel size: "same" padding k // 2 keeps the grid's size only for odd k."""
    return {
        "type": "integer",
        "minimum": 1,
        "odd": True,
        "default": default,
        "description": f"{description}: a positive odd integer ('same' padding keeps the grid)",
    }


def choice(choices: tuple[str, ...], default: str | None, description: str) -> dict[str, Any]:
    allowed: list[Any] = list(choices) + ([None] if default is None else [])
    return {"enum": allowed, "default": default, "description": description}


def widths(default: list[int], description: str) -> dict[str, Any]:
    return {
        "type": "array",
        "items": {"type": "integer", "minimum": 1},
        "default": default,
        "description": f"{description} (a list of positive integers)",
    }


def fraction(default: float, description: str) -> dict[str, Any]:
    return {
        "type": "number",
        "minimum": 0,
        "maximum": 1,
        "default": default,
        "description": f"{description}, in [0, 1]",
    }


def object_schema(properties: dict[str, Any], what: str) -> dict[str, Any]:
    """The options of one kind (or gate): only the named ones, each with its schema."""
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
        "x-what": what,
    }
