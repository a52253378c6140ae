"""The workflow config: schema validation with defaults, cross-key checks, a typed view.

The Snakefile and the ``smoe`` command both go through :func:`validate_config`, so a bad
config fails the same way everywhere: before any job runs, with the key named. Whatever a
job would refuse is refused here (model options per kind, selection metrics the evaluation
does not compute, data windows longer than a run, a map without room for its region types,
``train.device: cuda`` without a GPU), because Snakemake deletes a job's old outputs when
the job starts. Only standard-library, numpy, yaml and jsonschema imports happen here, so
Snakemake can load this module at parse time cheaply; PyTorch is imported only to confirm a
GPU that the driver shows, when a model asks for CUDA.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, ValidationError, validators

from smoe.core.errors import InputError
from smoe.core.family import Family

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"
SPEC_KEYS = ("name", "kind", "options", "train", "data", "evaluate")
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""Model names become folder and file names: letters, digits, '.', '_' and '-'."""

GPU_CHECKS = ("local", "cluster", "skip")
"""How ``train.device: cuda`` without a visible GPU is treated: an error (the jobs run on
this machine), a warning (they run on cluster nodes), or not checked (inside a job)."""
GPU_CHECK_ENV = "SMOE_GPU_CHECK"


UNSET = object()


def _odd(validator, odd, instance, schema):
    """The schema keyword ``odd: true`` (kernel sizes)."""
    if odd and validator.is_type(instance, "integer") and instance % 2 == 0:
        yield ValidationError(f"{instance} is not odd")


_Validator = validators.extend(Draft202012Validator, {"odd": _odd})


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


_DefaultingValidator = _with_defaults(_Validator)


def load_schema(path: Path = SCHEMA_PATH) -> dict[str, Any]:
    with open(path) as handle:
        return yaml.safe_load(handle)


def dotted(path) -> str:
    key = ""
    for part in path:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key or "<top level>"


_HINTED = {
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "enum",
    "const",
    "type",
    "pattern",
    "odd",
    "anyOf",
    "uniqueItems",
    "minItems",
    "maxItems",
}


def describe_error(error: ValidationError, label: str = "config key", base: tuple = ()) -> str:
    """One line naming the key (``base`` + the error's path) and the bad value."""
    path = [*base, *error.absolute_path]
    key = dotted(path)
    schema = error.schema if isinstance(error.schema, dict) else {}
    if "propertyNames" in error.schema_path:
        return (
            f"{label} '{dotted([*path, error.instance])}': the name {error.instance!r} is not "
            "safe as a folder name (letters, digits, '.', '_' and '-', starting with a letter "
            "or digit)"
        )
    if error.validator == "additionalProperties":
        known = sorted(schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(known))
        names = ", ".join(f"'{dotted([*path, u])}'" for u in unknown)
        what = schema.get("x-what")
        if what:
            return f"{label} {names}: unknown {what}; known: {', '.join(known) or 'none'}"
        where = f" under '{key}'" if path else ""
        return f"unknown {label} {names}{where}; known keys: {', '.join(known)}"
    if error.validator == "enum" and schema.get("x-unknown"):
        what = schema["x-unknown"]
        known = ", ".join(str(value) for value in schema["enum"])
        return f"{label} '{key}': unknown {what} {error.instance!r}; known {what}s: {known}"
    text = f"{label} '{key}': {error.message}"
    hint = schema.get("description")
    if hint and error.validator in _HINTED:
        text += f" ({hint.strip()})"
    return text


def schema_errors(
    instance: Any, schema: dict[str, Any], base: tuple, label: str, defaults: bool = False
) -> list[str]:
    validator = (_DefaultingValidator if defaults else _Validator)(schema)
    errors = sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.path])
    return [describe_error(error, label, base) for error in errors]


# -- values given as strings (snakemake --config) ---------------------------------------

_YAML_NULLS = ("null", "Null", "NULL", "~")


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with a local ``$ref`` (#/$defs/...) merged in."""
    ref = schema.get("$ref")
    if not ref or not ref.startswith("#/"):
        return schema
    target: Any = root
    for part in ref[2:].split("/"):
        target = target[part]
    rest = {key: value for key, value in schema.items() if key != "$ref"}
    return {**_resolve(target, root), **rest}


def _parse_scalar(text: str) -> Any:
    """A string as YAML reads it; '1e-3' (a string to YAML 1.1) as a number."""
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(parsed, str):
        try:
            return float(text)
        except ValueError:
            return text
    return parsed


def coerce_strings(value: Any, schema: dict[str, Any], root: dict[str, Any] | None = None) -> Any:
    """``value`` with strings read as YAML where the schema does not take the string itself.

    ``snakemake --config 'train={lr: 0.05}'`` hands nested values over as strings ('0.05');
    a string that is valid where it stands (a path, a name, 'cuda') stays a string, any other
    is read as YAML ('0.05' -> 0.05, 'true' -> True, 'null' -> None). Mappings are changed in
    place; the coerced value is returned.
    """
    root = schema if root is None else root
    schema = _resolve(schema, root)
    if isinstance(value, dict | list):
        wanted = "object" if isinstance(value, dict) else "array"
        for branch in schema.get("anyOf", []) + schema.get("oneOf", []):
            types = branch.get("type")
            if wanted == types or (isinstance(types, list) and wanted in types):
                schema = _resolve(branch, root)
                break
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = properties.get(key, extra)
            if isinstance(sub, dict):
                value[key] = coerce_strings(item, sub, root)
        return value
    if isinstance(value, list):
        items = schema.get("items")
        if isinstance(items, dict):
            return [coerce_strings(item, items, root) for item in value]
        return value
    if not isinstance(value, str) or not schema:
        return value
    if _Validator(schema).is_valid(value):
        return value
    parsed = None if value in _YAML_NULLS else _parse_scalar(value)
    if isinstance(parsed, dict | list):
        return coerce_strings(parsed, schema, root)
    return parsed


# -- metrics ------------------------------------------------------------------------------


# -- GPUs ---------------------------------------------------------------------------------


def _driver_gpus() -> tuple[bool, str]:
    """Whether the driver shows a GPU here, without PyTorch, and how that was checked."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "NoDevFiles"):
        return False, f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir() and any(gpus.iterdir()):
        return True, f"{gpus} lists {len(list(gpus.iterdir()))} GPU(s)"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            return False, f"nvidia-smi -L failed ({exc})"
        count = sum(line.startswith("GPU ") for line in listed.stdout.splitlines())
        if count:
            return True, f"nvidia-smi -L lists {count} GPU(s)"
        return False, "nvidia-smi -L lists no GPU"
    if Path("/dev/kfd").exists():
        return True, "the ROCm device /dev/kfd exists"
    return False, f"no NVIDIA driver: {gpus} is absent and nvidia-smi is not on PATH"


def cuda_status(confirm_with_torch: bool = True) -> tuple[bool, str]:
    """Whether CUDA is usable here and how that was checked.

    The driver is asked first (/proc/driver/nvidia, nvidia-smi); only when it shows a GPU,
    and ``confirm_with_torch``, is PyTorch imported to ask ``torch.cuda.is_available()``, as
    the train job does (a CPU-only PyTorch build cannot use a present GPU).
    """
    found, how = _driver_gpus()
    if not found or not confirm_with_torch:
        return found, how
    import torch

    if torch.cuda.is_available():
        return True, f"{how}; torch.cuda.is_available() is True"
    built = torch.version.cuda or getattr(torch.version, "hip", None)
    build = f"CUDA {built}" if built else "built without CUDA"
    return (
        False,
        f"{how}, but torch.cuda.is_available() is False (torch {torch.__version__}, {build})",
    )


def gpu_check_mode(default: str = "local") -> str:
    """``SMOE_GPU_CHECK`` (local, cluster or skip) when set, else ``default``."""
    mode = os.environ.get(GPU_CHECK_ENV) or default
    if mode not in GPU_CHECKS:
        raise InputError(
            f"environment variable {GPU_CHECK_ENV}={mode!r} is not one of {', '.join(GPU_CHECKS)}"
        )
    return mode


def warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def cuda_errors(
    wanted: dict[str, list[str]],
    mode: str,
    executor: str | None,
    warn: Callable[[str], None],
    label: str = "config key",
) -> list[str]:
    """``wanted``: key -> models whose ``train.device`` is 'cuda' through that key."""
    if not wanted or mode == "skip":
        return []
    usable, how = cuda_status(confirm_with_torch=mode == "local")
    if usable:
        return []
    lines = []
    for key, models in wanted.items():
        which = f"'cuda' (model{'s' if len(models) > 1 else ''} {', '.join(models)})"
        if mode == "cluster":
            if executor and executor not in ("local", "dryrun", "touch"):
                target = f"the run targets the {executor!r} executor"
            else:
                target = f"{GPU_CHECK_ENV}=cluster says the jobs run elsewhere"
            warn(
                f"{label} '{key}': {which}, and no GPU is visible on this machine ({how}); "
                f"{target}, so the GPU is expected on the cluster nodes"
            )
        else:
            lines.append(
                f"{label} '{key}': {which}, but no GPU is usable on this machine ({how}); "
                "use 'auto' or 'cpu', or send the jobs to GPU nodes with a cluster executor "
                f"(e.g. --profile profiles/slurm); {GPU_CHECK_ENV}=cluster makes this a warning"
            )
    return lines


# -- validation ---------------------------------------------------------------------------


def validate_config(
    config: dict[str, Any],
    schema: dict[str, Any],
    families: Sequence[Family],
    *,
    gpu: str | None = None,
    executor: str | None = None,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Return a copy of ``config`` with defaults filled in, or raise :class:`InputError`.

    Strings where the schema wants another type are read as YAML first (``snakemake
    --config`` gives nested values as strings). Schema errors (unknown keys, wrong types,
    out-of-range values) are all reported at once; then the checks that span keys run, each
    family's (:func:`check_config`), and are also reported together.
    """
    filled = coerce_strings(copy.deepcopy(dict(config)), schema)
    lines = schema_errors(filled, schema, (), "config key", defaults=True)
    if lines:
        raise InputError("invalid config:\n  " + "\n  ".join(lines))
    check_config(filled, schema, families, gpu=gpu, executor=executor, warn=warn)
    return filled


def check_config(
    config: dict[str, Any],
    schema: dict[str, Any],
    families: Sequence[Family],
    *,
    gpu: str | None = None,
    executor: str | None = None,
    warn: Callable[[str], None] | None = None,
) -> None:
    """Checks across keys that a JSON schema cannot express, on a schema-valid config with
    its defaults: the results folder, then each family's ``config_errors`` (which may
    resolve values in place), then ``train.device: cuda`` without a GPU here, for the keys
    each family's ``cuda_wanted`` names. ``gpu`` says how that is treated
    (:data:`GPU_CHECKS`; default ``SMOE_GPU_CHECK`` or 'local'); ``executor`` names the
    cluster executor in that warning, which goes to ``warn`` (default stderr)."""
    mode = gpu_check_mode() if gpu is None else gpu
    if mode not in GPU_CHECKS:
        raise InputError(f"gpu check {mode!r} is not one of {', '.join(GPU_CHECKS)}")
    lines = results_errors(config["results"])
    for family in families:
        check = family.hook("config_errors")
        if check is not None:
            lines += check(config, schema)
    wanted: dict[str, list[str]] = {}
    for family in families:
        cuda = family.hook("cuda_wanted")
        for key, names in (cuda(config, not lines) if cuda is not None else {}).items():
            wanted.setdefault(key, []).extend(names)
    lines += cuda_errors(wanted, mode, executor, warn or warn_stderr)
    lines = list(dict.fromkeys(lines))  # a key shared by several models is named once
    if lines:
        raise InputError("invalid config:\n  " + "\n  ".join(lines))


def results_errors(results: str) -> list[str]:
    """The results folder must be a folder (or not exist yet), not a file."""
    path = Path(results)
    for candidate in (path, *path.parents):
        if candidate.is_dir():
            return []
        if candidate.exists() or candidate.is_symlink():
            where = "is" if candidate == path else f"lies under {str(candidate)!r}, which is"
            return [
                f"config key 'results': {results!r} {where} an existing file, not a folder "
                "(every output is written under it)"
            ]
    return []


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override``'s keys replacing or (for mappings) merging into it."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def split_key(where: str) -> list[Any]:
    """'hidden_layers[0].experts' -> ['hidden_layers', 0, 'experts']."""
    parts: list[Any] = []
    for piece in filter(None, where.split(".")):
        name, *indices = piece.split("[")
        if name:
            parts.append(name)
        parts += [int(index.rstrip("]")) for index in indices]
    return parts


def undefined_run_names(
    run: list[str] | None, models: dict[str, Any], section: str = ""
) -> list[str]:
    """A message for every name in a section's ``run`` that is not one of its ``models``
    (``section``: "" for the heat family's top level, else e.g. "clusters")."""
    prefix = f"{section}." if section else ""
    return [
        f"config key '{prefix}run': model {name!r} is not defined under '{prefix}models' "
        f"(defined: {', '.join(models) or 'none'})"
        for name in run or []
        if name not in models
    ]


# -- the synthetic-cluster family ---------------------------------------------------------


def spec_with_its_keys(raw: Any, label: str) -> dict[str, Any]:
    """A copy of ``raw`` once it is a JSON object with exactly the keys of a model spec
    (heat or cluster family); otherwise one InputError listing every key problem."""
    if not isinstance(raw, dict):
        raise InputError(f"--spec must be a JSON object with the keys {', '.join(SPEC_KEYS)}")
    lines = [
        f"{label} '{k}': unknown key; known: {', '.join(SPEC_KEYS)}"
        for k in raw
        if k not in SPEC_KEYS
    ]
    lines += [f"{label} '{k}' is missing" for k in SPEC_KEYS if k not in raw]
    if lines:
        raise InputError("invalid model spec:\n  " + "\n  ".join(lines))
    return copy.deepcopy(raw)


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


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping (not yet validated), or an InputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {str(path)!r} does not exist")
    with open(path) as handle:
        try:
            raw = yaml.safe_load(handle)
        except yaml.YAMLError as exc:
            raise InputError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    if raw is None:
        raise InputError(
            f"config file {str(path)!r} is empty or holds only comments; a config needs at "
            "least its models (e.g. models: {persistence: {kind: persistence}})"
        )
    if not isinstance(raw, dict):
        raise InputError(f"config file {str(path)!r} must hold a mapping of keys")
    return raw


def spec_without_processes(spec: ModelSpec) -> str:
    """A spec's JSON without train.processes, as a training job's params: the number of
    processes changes no result (tests/train/test_multiprocess_training.py), so changing it
    retrains nothing; it reaches the job as a resource (``--processes``)."""
    data = spec.to_dict()
    data["train"] = {k: v for k, v in data["train"].items() if k != "processes"}
    return json.dumps(data, sort_keys=True, separators=(",", ":"))
