"""The workflow config: schema validation with defaults, cross-key checks, a typed view.

The Snakefile and the ``smoe`` command both go through :func:`validate_config`, so a bad
config fails the same way everywhere: before any job runs, with the key named. Only
standard-library, numpy, yaml and jsonschema imports happen here, so Snakemake can load this
module at parse time cheaply.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, validators

from smoe.data.heat import HeatParams
from smoe.errors import InputError
from smoe.models.names import GATE_NAMES, MODEL_KINDS

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"
SPLITS = ("train", "val", "test")


def _with_defaults(validator_class):
    """A validator that fills ``default:`` values in as it walks the config."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(validator_class, {"properties": set_defaults})


_DefaultingValidator = _with_defaults(Draft202012Validator)


def load_schema(path: Path = SCHEMA_PATH) -> dict[str, Any]:
    with open(path) as handle:
        return yaml.safe_load(handle)


def _dotted(path) -> str:
    key = ""
    for part in path:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key or "<top level>"


def _describe(error, schema: dict[str, Any]) -> str:
    key = _dotted(error.absolute_path)
    if error.validator == "additionalProperties":
        known = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(known))
        where = f" under '{key}'" if error.absolute_path else ""
        names = ", ".join(f"'{_dotted([*error.absolute_path, u])}'" for u in unknown)
        return f"unknown config key {names}{where}; known keys: {', '.join(known)}"
    hint = error.schema.get("description")
    text = f"config key '{key}': {error.message}"
    if hint and error.validator in ("minimum", "maximum", "enum", "type", "pattern"):
        text += f" ({hint.strip()})"
    return text


def validate_config(config: dict[str, Any], schema_path: Path = SCHEMA_PATH) -> dict[str, Any]:
    """Return a copy of ``config`` with defaults filled in, or raise :class:`InputError`.

    Schema errors (unknown keys, wrong types, out-of-range values) are all reported at once;
    then the checks that span keys (one diffusivity per region type, a readable mask file
    whose values fit the number of types) run.
    """
    schema = load_schema(schema_path)
    filled = copy.deepcopy(dict(config))
    errors = sorted(
        _DefaultingValidator(schema).iter_errors(filled),
        key=lambda e: [str(p) for p in e.absolute_path],
    )
    if errors:
        lines = [_describe(error, schema) for error in errors]
        raise InputError("invalid config:\n  " + "\n  ".join(lines))
    check_config(filled, schema)
    return filled


def check_config(config: dict[str, Any], schema: dict[str, Any] | None = None) -> None:
    """Checks across keys that a JSON schema cannot express."""
    check_models(config, schema or load_schema())
    typed = Config.from_dict(config)
    types = typed.mask.types
    if len(typed.heat.diffusivity) != types:
        raise InputError(
            f"config key 'heat.diffusivity': {len(typed.heat.diffusivity)} values for "
            f"mask.types={types} region types (give one diffusivity per type)"
        )
    typed.heat.validate("heat")
    if typed.mask.file is not None:
        from smoe.data.mask import check_mask, load_mask

        source = f"config key 'mask.file' ({typed.mask.file})"
        try:
            mask = load_mask(typed.mask.file)
        except InputError as exc:
            raise InputError(f"config key 'mask.file': {exc}") from exc
        check_mask(mask, types, source)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override``'s keys replacing or (for mappings) merging into it."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _validate_section(value: dict[str, Any], schema: dict[str, Any], key: str) -> None:
    errors = sorted(Draft202012Validator(schema).iter_errors(value), key=lambda e: e.path)
    if errors:
        lines = []
        for error in errors:
            error.path.extendleft(reversed(key.split(".")))
            lines.append(_describe(error, schema))
        raise InputError("invalid config:\n  " + "\n  ".join(lines))


def check_models(config: dict[str, Any], schema: dict[str, Any]) -> None:
    """Model kinds, gates and K <= E, and each model's train/data overrides once merged."""
    models = config["models"]
    train_schema = {**schema["$defs"]["train"], "$defs": schema["$defs"]}
    data_schema = schema["properties"]["data"]
    for name, model in models.items():
        key = f"models.{name}"
        if model["kind"] not in MODEL_KINDS:
            raise InputError(
                f"config key '{key}.kind': unknown model kind {model['kind']!r}; "
                f"known kinds: {', '.join(MODEL_KINDS)}"
            )
        options = model["options"]
        if model["kind"] == "smoe":
            gate = options.get("gate", "latent")
            if gate not in GATE_NAMES:
                raise InputError(
                    f"config key '{key}.options.gate': unknown gate {gate!r}; "
                    f"known gates: {', '.join(GATE_NAMES)}"
                )
            experts, k = options.get("experts", 3), options.get("k", 1)
            if not (isinstance(k, int) and isinstance(experts, int) and 1 <= k <= experts):
                raise InputError(
                    f"config key '{key}.options': k={k} must be between 1 and "
                    f"experts={experts} (K <= E)"
                )
        _validate_section(deep_merge(config["train"], model["train"]), train_schema, f"{key}.train")
        data = deep_merge(config["data"], model["data"])
        _validate_section(data, data_schema, f"{key}.data")
        if model["kind"] in ("stencil", "generator") and data["normalization"] != "none":
            raise InputError(
                f"config key '{key}.data.normalization': the analytic {model['kind']} predictor "
                f"works on the field itself; it needs normalization 'none', not "
                f"{data['normalization']!r}"
            )
    for name in config["run"] or []:
        if name not in models:
            raise InputError(
                f"config key 'run': model {name!r} is not defined under 'models' "
                f"(defined: {', '.join(models) or 'none'})"
            )
    scale = config["evaluate"]["region_rtol_scale"]
    if scale is not None and len(scale) != config["mask"]["types"]:
        raise InputError(
            f"config key 'evaluate.region_rtol_scale': {len(scale)} values for "
            f"mask.types={config['mask']['types']} region types"
        )


@dataclass(frozen=True)
class ModelSpec:
    """Everything that defines one model's training: what a train job's params hold.

    Snakemake reruns a job when its params change, so a model's spec is exactly its own
    options plus the train, data and evaluate settings it uses: editing one model retrains
    only that model.
    """

    name: str
    kind: str
    options: dict[str, Any]
    train: dict[str, Any]
    data: dict[str, Any]
    evaluate: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "options": self.options,
            "train": self.train,
            "data": self.data,
            "evaluate": self.evaluate,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(
            **{key: data[key] for key in ("name", "kind", "options", "train", "data", "evaluate")}
        )


def model_spec(config: dict[str, Any], name: str) -> ModelSpec:
    """The resolved spec of model ``name`` in a validated config."""
    if name not in config["models"]:
        raise InputError(
            f"model {name!r} is not defined under 'models' "
            f"(defined: {', '.join(config['models']) or 'none'})"
        )
    model = config["models"][name]
    return ModelSpec(
        name=name,
        kind=model["kind"],
        options=copy.deepcopy(model["options"]),
        train=deep_merge(config["train"], model["train"]),
        data=deep_merge(config["data"], model["data"]),
        evaluate=copy.deepcopy(config["evaluate"]),
    )


def models_to_run(config: dict[str, Any]) -> list[str]:
    return list(config["run"] if config["run"] is not None else config["models"])


@dataclass(frozen=True)
class MaskConfig:
    file: str | None
    height: int
    width: int
    types: int
    seed: int


@dataclass(frozen=True)
class SplitConfig:
    runs: int
    seed: int


@dataclass(frozen=True)
class Config:
    """Typed view of a validated config (the dict stays the source of truth)."""

    results: Path
    mask: MaskConfig
    heat: HeatParams
    splits: dict[str, SplitConfig]
    runs_per_chunk: int | None
    compression: str
    export_netcdf: bool
    scheduler: str
    threads: int

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> Config:
        heat = config["heat"]
        ranges = heat["init"]["ranges"]
        clip = heat["clip"]
        params = HeatParams(
            diffusivity=tuple(float(a) for a in heat["diffusivity"]),
            steps=heat["steps"],
            boundary=heat["boundary"],
            init=heat["init"]["kind"],
            init_ranges=tuple((float(lo), float(hi)) for lo, hi in ranges) if ranges else None,
            negative_sources=heat["sources"]["negative"],
            heat_rate=heat["sources"]["heat_rate"],
            clip=(float(clip[0]), float(clip[1])) if clip else None,
        )
        return cls(
            results=Path(config["results"]),
            mask=MaskConfig(**config["mask"]),
            heat=params,
            splits={name: SplitConfig(**heat["splits"][name]) for name in SPLITS},
            runs_per_chunk=heat["runs_per_chunk"],
            compression=heat["compression"],
            export_netcdf=heat["export_netcdf"],
            scheduler=config["compute"]["scheduler"],
            threads=config["compute"]["threads"],
        )


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file and validate it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {str(path)!r} does not exist")
    with open(path) as handle:
        try:
            raw = yaml.safe_load(handle) or {}
        except yaml.YAMLError as exc:
            raise InputError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise InputError(f"config file {str(path)!r} must hold a mapping of keys")
    try:
        return validate_config(raw)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from exc
