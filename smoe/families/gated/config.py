"""The ``gated`` section of a workflow config: what the gated modular MoE family
(Krishnamurthy et al. 2023) runs, checked before any job starts.

A distilled model reuses the experts of another configured model (``options.teacher``) and
the sample-similarity loss may measure distances with a trained single network
(``options.similarity.features``): both name a model under ``gated.models``, which the
workflow trains first, per seed. The model's spec (what its job's params hold) keeps the
names; the job turns them into that seed's ``best.pt``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from smoe.core.config import (
    ModelSpec,
    coerce_strings,
    deep_merge,
    dotted,
    schema_errors,
    split_key,
    undefined_run_names,
)
from smoe.core.errors import InputError
from smoe.families.gated import options as gated_options
from smoe.families.gated.images import EMBEDDED, check_source

__all__ = [
    "check_gated",
    "config_errors",
    "cuda_wanted",
    "gated_dependencies",
    "gated_model_spec",
    "gated_models_to_run",
    "gated_source_files",
]

SECTION = "gated"


def gated_models_to_run(config: dict[str, Any]) -> list[str]:
    """The gated models to tabulate: ``gated.run`` or every model."""
    gated = config[SECTION]
    return list(gated["run"] if gated["run"] is not None else gated["models"])


def gated_dependencies(config: dict[str, Any], name: str) -> dict[str, str]:
    """The models a gated model needs trained first: ``{"teacher": name}`` for a distilled
    model, ``{"features": name}`` for a similarity loss on a trained network's features."""
    options = config[SECTION]["models"][name]["options"]
    needs = {}
    if options.get("teacher"):
        needs["teacher"] = options["teacher"]
    similarity = options.get("similarity") or {}
    if similarity.get("features"):
        needs["features"] = similarity["features"]
    return needs


def gated_model_spec(config: dict[str, Any], name: str) -> ModelSpec:
    """The spec of gated model ``name`` in a validated config: its options, the family's
    train settings with its own overrides, and the data it is trained on."""
    models = config[SECTION]["models"]
    if name not in models:
        raise InputError(
            f"model {name!r} is not defined under 'gated.models' "
            f"(defined: {', '.join(models) or 'none'})"
        )
    model = models[name]
    return ModelSpec(
        name=name,
        kind=model["kind"],
        options=copy.deepcopy(model["options"]),
        train=deep_merge(config[SECTION]["train"], model["train"]),
        data={},
        evaluate={},
    )


def gated_source_files(config: dict[str, Any]) -> list[Path]:
    """The data set's files (none for digits), checked: a conversion job's inputs."""
    data = config[SECTION]["data"]
    return check_source(data["dataset"], data["folder"])


def _option_errors(kind: str, options: dict[str, Any], base: tuple) -> list[str]:
    schema = gated_options.gated_kind_schema(kind)
    coerce_strings(options, schema)
    return schema_errors(options, schema, base, "config key")


def _dependency_errors(config: dict[str, Any], name: str, base: tuple) -> list[str]:
    """The teacher of a distilled model and the feature network of a similarity loss must
    name models of the right kind; a distilled model's routing must fit its teacher."""
    models = config[SECTION]["models"]
    model = models[name]
    options = model["options"]
    lines = []
    wanted = {"teacher": ("gated_moe", ("teacher",)), "features": ("gated_single", None)}
    for role, other in gated_dependencies(config, name).items():
        kind, path = wanted[role]
        key = dotted([*base, *(path or ("similarity", "features"))])
        if other == name:
            lines.append(f"config key '{key}': model {name!r} cannot depend on itself")
        elif other not in models:
            lines.append(
                f"config key '{key}': {other!r} is not a model under 'gated.models' "
                f"(defined: {', '.join(models)})"
            )
        elif models[other]["kind"] != kind:
            lines.append(
                f"config key '{key}': {other!r} is a {models[other]['kind']}; the {role} "
                f"must be a {kind} model"
            )
    if model["kind"] == "gated_distilled" and not options.get("teacher"):
        moes = [n for n, m in models.items() if m["kind"] == "gated_moe"]
        lines.append(
            f"config key '{dotted([*base, 'teacher'])}': a gated_distilled model needs "
            "the name of the trained gated_moe whose experts it reuses"
            + (f" (e.g. one of: {', '.join(moes)})" if moes else " (none is defined)")
        )
    if lines:
        return lines
    for where, message in gated_options.gated_cross_errors(model["kind"], options):
        lines.append(f"config key '{dotted([*base, *split_key(where)])}': {message}")
    return lines


def check_gated(config: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """The ``gated`` section: the data set's files (present, of the right kind and size),
    every model's options, dependencies and merged training settings, and what an enabled
    family needs. Checked whether or not the family is enabled, except the files, which are
    checked when it is (or when the folder is given)."""
    gated = config[SECTION]
    lines = []
    if gated["enabled"] and not gated["models"]:
        lines.append(
            "config key 'gated.models': no models are defined, but gated.enabled is true; "
            "define at least one, e.g. models: {expectation: {kind: gated_moe}}"
        )
    lines += undefined_run_names(gated["run"], gated["models"], SECTION)
    data = gated["data"]
    if data["dataset"] in EMBEDDED and data["folder"] is not None:
        lines.append(
            f"config key 'gated.data.folder': {data['dataset']} comes with an installed "
            "package and reads no files; give null, or choose gated.data.dataset mnist, "
            "fashion-mnist or cifar10"
        )
    elif data["dataset"] not in EMBEDDED and data["folder"] is None:
        lines.append(
            f"config key 'gated.data.folder': dataset {data['dataset']} is read from its "
            "files; give the folder holding them"
        )
    elif gated["enabled"] or data["folder"] is not None:
        key = "dataset" if data["dataset"] in EMBEDDED else "folder"
        try:
            check_source(data["dataset"], data["folder"])
        except InputError as exc:
            lines.append(f"config key 'gated.data.{key}': {exc}")
    train_schema = {**schema["$defs"]["gated_train"], "$defs": schema["$defs"]}
    for name, model in gated["models"].items():
        base = (SECTION, "models", name, "options")
        if model["kind"] not in gated_options.GATED_MODEL_KINDS:
            continue  # the schema's enum has named it
        errors = _option_errors(model["kind"], model["options"], base)
        lines += errors or _dependency_errors(config, name, base)
        own = model["train"]
        coerce_strings(own, train_schema)
        merged = deep_merge(gated["train"], own)
        processes, batch = merged.get("processes", 1), merged.get("batch_size", 1)
        if isinstance(processes, int) and isinstance(batch, int) and batch < processes:
            own_key = f"gated.models.{name}.train.processes"
            key = own_key if "processes" in own else "gated.train.processes"
            lines.append(
                f"config key '{key}': "
                f"{processes} processes for model {name!r}, but its batch_size {batch} leaves "
                "a process without samples; raise the batch size or use fewer processes"
            )
        lines += schema_errors(
            merged,
            train_schema,
            (SECTION, "models", name, "train"),
            "config key",
        )
        mode = (merged.get("select") or {}).get("mode", "last")
        if mode == "last" and merged.get("early_stop") is not None:
            key = "early_stop" if "early_stop" in own else None
            where = f"gated.models.{name}.train.{key}" if key else "gated.train.early_stop"
            lines.append(
                f"config key '{where}': early stopping needs a best epoch to compare with, but "
                f"model {name!r} keeps the last epoch (select.mode last, the official code's); "
                "set select.mode to max or min, or early_stop to null"
            )
    return lines


def config_errors(config: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """The ``gated`` section's cross-key checks."""
    return check_gated(config, schema)


def cuda_wanted(config: dict[str, Any], valid: bool) -> dict[str, list[str]]:
    """Config keys that send an enabled gated model to CUDA, with the models (only once
    every check has passed)."""
    wanted: dict[str, list[str]] = {}
    gated = config[SECTION]
    if not valid or not gated["enabled"]:
        return wanted
    for name, model in gated["models"].items():
        if deep_merge(gated["train"], model["train"]).get("device") == "cuda":
            own = "device" in model["train"]
            key = f"gated.models.{name}.train.device" if own else "gated.train.device"
            wanted.setdefault(key, []).append(name)
    return wanted
