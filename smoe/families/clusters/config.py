"""The synthetic-cluster family's part of the config: the ``clusters`` section, checked
before any job (:func:`config_errors`, :func:`cuda_wanted`), and the specs, settings and
models its rules and jobs read."""

from __future__ import annotations

import copy
import re
from typing import Any

from smoe.core.config import (
    MODEL_NAME,
    ModelSpec,
    coerce_strings,
    cuda_errors,
    deep_merge,
    dotted,
    gpu_check_mode,
    schema_errors,
    spec_with_its_keys,
    split_key,
    undefined_run_names,
    warn_stderr,
)
from smoe.core.errors import InputError
from smoe.families.clusters import options as cluster_options
from smoe.families.clusters.data import SETTINGS as CLUSTER_SETTINGS
from smoe.families.clusters.data import ClusterSetting, make_setting

CLUSTER_SPLITS = ("train", "test")
"""Splits of the synthetic-cluster data; validation is carved from train by the trainer."""


CLUSTER_DATA_KEYS = ("seed", "val_fraction")
"""Keys of ``clusters.data`` that are not overrides of the settings' fields."""


def cluster_data_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``clusters.data`` that override every chosen setting's fields."""
    data = config["clusters"]["data"]
    return {key: value for key, value in data.items() if key not in CLUSTER_DATA_KEYS}


def cluster_setting(config: dict[str, Any], name: str) -> ClusterSetting:
    """Setting ``name`` (s1..s4) with the config's overrides, validated; errors name
    ``clusters.data.<field>``."""
    return make_setting({**cluster_data_overrides(config), "setting": name}, key="clusters.data")


def _cluster_sections(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The schemas of a cluster model spec's train, data and evaluate sections."""
    data = schema["properties"]["clusters"]["properties"]["data"]["properties"]
    return {
        "train": {**schema["$defs"]["cluster_train"], "$defs": schema["$defs"]},
        "data": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"val_fraction": data["val_fraction"]},
        },
        "evaluate": {
            "type": "object",
            "additionalProperties": False,
            "properties": {},
            "x-what": "key (a cluster model's evaluate section takes none)",
        },
    }


def _setting_message(exc: InputError) -> str:
    """'clusters.data.dim: ...' -> "config key 'clusters.data.dim': ..."."""
    return re.sub(r"^(clusters\.data[\w.\[\]]*): ", r"config key '\1': ", str(exc))


def _val_fraction_errors(setting: ClusterSetting, fraction: float) -> str:
    """Why holding out ``fraction`` of the train split leaves a part empty ("" when not)."""
    held = setting.n_train * fraction
    if held < 1:
        return (
            f"config key 'clusters.data.val_fraction': {fraction} of {setting.n_train} train "
            f"samples holds out {held:g}, less than one validation sample; raise it or "
            "clusters.data.n_train"
        )
    if setting.n_train - held < 1:
        return (
            f"config key 'clusters.data.val_fraction': {fraction} of {setting.n_train} train "
            "samples leaves less than one sample to train on; lower it or raise "
            "clusters.data.n_train"
        )
    return ""


def cluster_model_errors(
    kind: str,
    options: dict[str, Any],
    base: tuple,
    label: str = "config key",
) -> list[str]:
    """What building a cluster-family model would refuse in its options (coerced in place);
    ``base`` is the options' key path in messages."""
    known = cluster_options.CLUSTER_MODEL_KINDS
    if kind not in known:
        return [
            f"{label} '{dotted(base[:-1] + ('kind',))}': unknown model kind {kind!r}; "
            f"known kinds: {', '.join(known)}"
        ]
    kind_schema = cluster_options.cluster_kind_schema(kind)
    coerce_strings(options, kind_schema)
    lines = schema_errors(options, kind_schema, base, label)
    if not lines:
        for where, message in cluster_options.cluster_cross_errors(kind, options):
            lines.append(f"{label} '{dotted([*base, *split_key(where)])}': {message}")
    return lines


def check_clusters(config: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """The ``clusters`` section: settings (with the data overrides, as the data job makes
    them), the validation share, every model's options and merged training settings, and
    what an enabled family needs. Checked whether or not the family is enabled."""
    clusters = config["clusters"]
    lines = []
    if clusters["enabled"] and not clusters["settings"]:
        lines.append(
            "config key 'clusters.settings': no setting is chosen, but clusters.enabled is "
            f"true; choose at least one of {', '.join(CLUSTER_SETTINGS)}"
        )
    if clusters["enabled"] and not clusters["models"]:
        lines.append(
            "config key 'clusters.models': no models are defined, but clusters.enabled is "
            "true; define at least one, e.g. models: {moe: {kind: cluster_moe}}"
        )
    lines += undefined_run_names(clusters["run"], clusters["models"], "clusters")
    problems: dict[str, list[str]] = {}
    for name in clusters["settings"]:
        try:
            setting = cluster_setting(config, name)
        except InputError as exc:
            problems.setdefault(_setting_message(exc), []).append(name)
            continue
        problem = _val_fraction_errors(setting, clusters["data"]["val_fraction"])
        if problem:
            problems.setdefault(problem, []).append(name)
    for message, names in problems.items():
        lines.append(f"{message} (setting{'s' if len(names) > 1 else ''} {', '.join(names)})")
    train_schema = _cluster_sections(schema)["train"]
    for name, model in clusters["models"].items():
        base = ("clusters", "models", name, "options")
        lines += cluster_model_errors(model["kind"], model["options"], base)
        own = model["train"]
        coerce_strings(own, train_schema)
        merged = deep_merge(clusters["train"], own)
        lines += schema_errors(
            merged, train_schema, ("clusters", "models", name, "train"), "config key"
        )
        key = f"clusters.models.{name}.train"
        if model["kind"] == "cluster_single" and own.get("router_lr") is not None:
            lines.append(
                f"config key '{key}.router_lr': a cluster_single has no router; remove it "
                "(clusters.train.router_lr applies to cluster_moe models only)"
            )
        if model["kind"] == "cluster_moe" and own.get("weight_decay"):
            lines.append(
                f"config key '{key}.weight_decay': a cluster_moe trains its experts by "
                "normalised gradient descent, which has no weight decay; remove it or set 0"
            )
    return lines


KIND_ONLY_TRAIN_KEYS = {"router_lr": "cluster_moe", "weight_decay": "cluster_single"}
"""Keys of ``clusters.train`` that reach only one kind's models when set family-wide."""


def cluster_model_spec(config: dict[str, Any], name: str) -> ModelSpec:
    """The resolved spec of cluster-family model ``name`` in a validated config: what its
    train job's params hold, so editing one model retrains only that model."""
    models = config["clusters"]["models"]
    if name not in models:
        raise InputError(
            f"model {name!r} is not defined under 'clusters.models' "
            f"(defined: {', '.join(models) or 'none'})"
        )
    model = models[name]
    family = {
        key: None if KIND_ONLY_TRAIN_KEYS.get(key, model["kind"]) != model["kind"] else value
        for key, value in config["clusters"]["train"].items()
    }
    return ModelSpec(
        name=name,
        kind=model["kind"],
        options=copy.deepcopy(model["options"]),
        train=deep_merge(family, model["train"]),
        data={"val_fraction": config["clusters"]["data"]["val_fraction"]},
        evaluate={},
    )


def validate_cluster_spec(raw: Any, *, gpu: str | None = None) -> ModelSpec:
    """A cluster model spec (``smoe cluster-train --spec``) checked as the workflow checks a
    config's cluster model; missing train and data keys get their defaults."""
    label = "--spec key"
    spec = spec_with_its_keys(raw, label)
    lines: list[str] = []
    name = spec["name"]
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        lines.append(
            f"{label} 'name': {name!r} is not safe as a folder name (letters, digits, '.', "
            "'_' and '-', starting with a letter or digit)"
        )
    if not isinstance(spec["options"], dict):
        lines.append(f"{label} 'options': {spec['options']!r} is not a mapping of options")
    elif not isinstance(spec["kind"], str):
        lines.append(f"{label} 'kind': {spec['kind']!r} is not a model kind")
    else:
        lines += cluster_model_errors(spec["kind"], spec["options"], ("options",), label)
    for section, section_schema in _cluster_sections(_load_schema()).items():
        coerce_strings(spec[section], section_schema)
        lines += schema_errors(spec[section], section_schema, (section,), label, defaults=True)
    if not lines:
        for key, kind in KIND_ONLY_TRAIN_KEYS.items():
            if spec["kind"] != kind and spec["train"][key]:
                lines.append(
                    f"{label} 'train.{key}': {spec['train'][key]!r} applies to {kind} models "
                    f"only, not to a {spec['kind']}; give null"
                )
    if not lines and spec["train"]["device"] == "cuda":
        mode = gpu_check_mode() if gpu is None else gpu
        lines += cuda_errors({"train.device": [name]}, mode, None, warn_stderr, label)
    if lines:
        raise InputError("invalid model spec:\n  " + "\n  ".join(lines))
    return ModelSpec.from_dict(spec)


def cluster_models_to_run(config: dict[str, Any]) -> list[str]:
    """The cluster family's models to run: ``clusters.run``, or every defined model."""
    clusters = config["clusters"]
    return list(clusters["run"] if clusters["run"] is not None else clusters["models"])


def _load_schema() -> dict[str, Any]:
    from smoe.config import load_schema

    return load_schema()


def config_errors(config: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """The ``clusters`` section's cross-key checks."""
    return check_clusters(config, schema)


def cuda_wanted(config: dict[str, Any], valid: bool) -> dict[str, list[str]]:
    """Config keys that send an enabled cluster model to CUDA, with the models (only once
    every check has passed: the specs are resolved from the section)."""
    wanted: dict[str, list[str]] = {}
    if not valid or not config["clusters"]["enabled"]:
        return wanted
    for name, model in config["clusters"]["models"].items():
        if cluster_model_spec(config, name).train["device"] == "cuda":
            own = "device" in model["train"]
            key = f"clusters.models.{name}.train.device" if own else "clusters.train.device"
            wanted.setdefault(key, []).append(name)
    return wanted
