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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, ValidationError, validators

from smoe.core import options as option_schema
from smoe.core.errors import InputError
from smoe.families.clusters.data import SETTINGS as CLUSTER_SETTINGS
from smoe.families.clusters.data import ClusterSetting, make_setting
from smoe.families.heat.names import GATE_NAMES, MODEL_KINDS
from smoe.families.heat.simulation import HeatParams

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"
SPLITS = ("train", "val", "test")
CLUSTER_SPLITS = ("train", "test")
"""Splits of the synthetic-cluster data; validation is carved from train by the trainer."""
CLUSTER_DATA_KEYS = ("seed", "val_fraction")
"""Keys of ``clusters.data`` that are not overrides of the settings' fields."""
SPEC_KEYS = ("name", "kind", "options", "train", "data", "evaluate")
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""Model names become folder and file names: letters, digits, '.', '_' and '-'."""

GPU_CHECKS = ("local", "cluster", "skip")
"""How ``train.device: cuda`` without a visible GPU is treated: an error (the jobs run on
this machine), a warning (they run on cluster nodes), or not checked (inside a job)."""
GPU_CHECK_ENV = "SMOE_GPU_CHECK"

MASK_CHECK_BUDGET = 4_000_000
"""Generated maps are drawn and checked at validation when height * width * types^2 is at
most this (about 0.1 s); larger ones only need height * width >= types here."""

_UNSET = object()

METRIC_BASES = ("mse", "mae", "rmse", "nrmse", "vrmse")
"""The error metrics of :class:`smoe.families.heat.metrics.MetricAccumulator`, besides prcntclose."""


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


def _dotted(path) -> str:
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


def _describe(error: ValidationError, label: str = "config key", base: tuple = ()) -> str:
    """One line naming the key (``base`` + the error's path) and the bad value."""
    path = [*base, *error.absolute_path]
    key = _dotted(path)
    schema = error.schema if isinstance(error.schema, dict) else {}
    if "propertyNames" in error.schema_path:
        return (
            f"{label} '{_dotted([*path, error.instance])}': the name {error.instance!r} is not "
            "safe as a folder name (letters, digits, '.', '_' and '-', starting with a letter "
            "or digit)"
        )
    if error.validator == "additionalProperties":
        known = sorted(schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(known))
        names = ", ".join(f"'{_dotted([*path, u])}'" for u in unknown)
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


def _schema_errors(
    instance: Any, schema: dict[str, Any], base: tuple, label: str, defaults: bool = False
) -> list[str]:
    validator = (_DefaultingValidator if defaults else _Validator)(schema)
    errors = sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.path])
    return [_describe(error, label, base) for error in errors]


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


def close_metric_name(rtol: float, scaled: bool = False) -> str:
    """The name of prcntclose at ``rtol`` (0.01 -> 'prcntclose1.0'): one decimal as the paper
    writes it, more when the tolerance needs them, so distinct tolerances never share a name
    (0.001 -> 0.1, 0.0012 -> 0.12). Metrics and validation both use this one rule."""
    percent = rtol * 100
    text = f"{percent:.1f}"
    if float(text) != round(percent, 12):
        text = f"{percent:.12g}"
    return f"prcntclose{text}" + ("s" if scaled else "")


def computable_metrics(types: int, rtols, scaled: bool) -> list[str]:
    """Every metric name the evaluation computes for a map of ``types`` region types, the
    tolerances ``rtols`` and (``scaled``) a region_rtol_scale: the names of
    :meth:`smoe.families.heat.metrics.MetricAccumulator.compute`, in its order."""
    unique = tuple(dict.fromkeys(float(r) for r in rtols))
    names = list(METRIC_BASES) + [close_metric_name(r) for r in unique]
    if scaled:
        names += [close_metric_name(r, scaled=True) for r in unique]
    return names + [f"mask{t}-{name}" for t in range(types) for name in names]


def _metric_problem(metric: str, types: int | None, evaluate: dict[str, Any]) -> str:
    """Why ``metric`` is not computed, as a predicate ("" when it is computed); ``types``
    None: any region prefix is taken."""
    scaled = evaluate["region_rtol_scale"] is not None
    names = computable_metrics(types or 0, evaluate["rtols"], scaled)
    overall = [name for name in names if not name.startswith("mask")]
    prefix = re.match(r"mask(\d+)-", metric)
    unprefixed = metric[prefix.end() :] if prefix else metric
    if metric in names or (types is None and prefix and unprefixed in overall):
        return ""
    if prefix and unprefixed in overall:
        return (
            f"names region type {prefix.group(1)}, which does not exist: mask.types={types} "
            f"gives the prefixes mask0- .. mask{types - 1}-"
        )
    return (
        f"is not computed with evaluate.rtols={list(evaluate['rtols'])} and evaluate."
        f"region_rtol_scale={'set' if scaled else 'null'}; computable: {', '.join(overall)}, "
        "each also per region type (prefix mask<t>-)"
    )


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


def _warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _cuda_errors(
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
    schema_path: Path = SCHEMA_PATH,
    *,
    gpu: str | None = None,
    executor: str | None = None,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Return a copy of ``config`` with defaults filled in, or raise :class:`InputError`.

    Strings where the schema wants another type are read as YAML first (``snakemake
    --config`` gives nested values as strings). Schema errors (unknown keys, wrong types,
    out-of-range values) are all reported at once; then the checks that span keys run and
    are also reported together. ``gpu`` says how ``train.device: cuda`` without a GPU here
    is treated (:data:`GPU_CHECKS`; default ``SMOE_GPU_CHECK`` or 'local'); ``executor``
    names the cluster executor in that warning, which goes to ``warn`` (default stderr).
    """
    schema = load_schema(schema_path)
    filled = coerce_strings(copy.deepcopy(dict(config)), schema)
    lines = _schema_errors(filled, schema, (), "config key", defaults=True)
    if lines:
        raise InputError("invalid config:\n  " + "\n  ".join(lines))
    check_config(filled, schema, gpu=gpu, executor=executor, warn=warn)
    return filled


def check_config(
    config: dict[str, Any],
    schema: dict[str, Any] | None = None,
    *,
    gpu: str | None = None,
    executor: str | None = None,
    warn: Callable[[str], None] | None = None,
) -> None:
    """Checks across keys that a JSON schema cannot express, on a schema-valid config with
    its defaults; ``evaluate.region_rtol_scale: diffusivity`` is resolved in place."""
    schema = schema or load_schema()
    mode = gpu_check_mode() if gpu is None else gpu
    if mode not in GPU_CHECKS:
        raise InputError(f"gpu check {mode!r} is not one of {', '.join(GPU_CHECKS)}")
    typed = Config.from_dict(config)
    types = typed.mask.types
    lines = _results_errors(config["results"])
    if len(typed.heat.diffusivity) != types:
        lines.append(
            f"config key 'heat.diffusivity': {len(typed.heat.diffusivity)} values for "
            f"mask.types={types} region types (give one diffusivity per type)"
        )
    try:
        typed.heat.validate("heat")
    except InputError as exc:  # "heat.clip: ..." -> "config key 'heat.clip': ..."
        lines.append(re.sub(r"^(heat[\w.\[\]]*): ", r"config key '\1': ", str(exc)))
    lines += _mask_errors(typed.mask)
    lines += _rtol_scale_errors(config)
    _resolve_select_metrics(config)
    lines += check_models(config, schema)
    lines += check_clusters(config, schema)
    if not lines:
        lines += _process_errors(config)
    from smoe.families.gated.config import check_gated, gated_cuda_wanted

    lines += check_gated(config, schema)
    wanted: dict[str, list[str]] = {}
    for name, model in config["models"].items():
        if deep_merge(config["train"], model["train"]).get("device") == "cuda":
            key = f"models.{name}.train.device" if "device" in model["train"] else "train.device"
            wanted.setdefault(key, []).append(name)
    if config["clusters"]["enabled"] and not lines:
        for name, model in config["clusters"]["models"].items():
            if cluster_model_spec(config, name).train["device"] == "cuda":
                own = "device" in model["train"]
                key = f"clusters.models.{name}.train.device" if own else "clusters.train.device"
                wanted.setdefault(key, []).append(name)
    if not lines:
        for key, names in gated_cuda_wanted(config).items():
            wanted.setdefault(key, []).extend(names)
    lines += _cuda_errors(wanted, mode, executor, warn or _warn_stderr)
    lines = list(dict.fromkeys(lines))  # a key shared by several models is named once
    if lines:
        raise InputError("invalid config:\n  " + "\n  ".join(lines))


def _results_errors(results: str) -> list[str]:
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


def _mask_errors(mask: MaskConfig) -> list[str]:
    """The map the mask job would refuse: an unreadable file or one whose values do not fit
    the types; a generated map with too few cells or a region type left out."""
    from smoe.families.heat.mask import check_mask, generate_mask, load_mask

    types = mask.types
    if mask.file is not None:
        try:
            check_mask(load_mask(mask.file), types, f"config key 'mask.file' ({mask.file})")
        except InputError as exc:
            text = str(exc)
            return [text if text.startswith("config key") else f"config key 'mask.file': {text}"]
        return []
    cells = mask.height * mask.width
    if cells < types:
        return [
            f"config key 'mask': a {mask.height} x {mask.width} map has {cells} cells, too few "
            f"for mask.types={types} region types (every type needs a cell)"
        ]
    if cells * types * types <= MASK_CHECK_BUDGET:
        source = (
            f"config key 'mask.seed': the map generated with seed {mask.seed} "
            f"({mask.height} x {mask.width}, {types} types)"
        )
        try:
            check_mask(generate_mask(mask.height, mask.width, types, mask.seed), types, source)
        except InputError as exc:
            return [f"{exc} (choose another mask.seed or a larger map)"]
    return []


def _rtol_scale_errors(config: dict[str, Any]) -> list[str]:
    """Resolve ``region_rtol_scale: diffusivity``; a list needs one factor per region type."""
    evaluate = config["evaluate"]
    types = config["mask"]["types"]
    scale = evaluate["region_rtol_scale"]
    if scale == "diffusivity":
        evaluate["region_rtol_scale"] = region_rtol_scale_of(config["heat"]["diffusivity"])
    elif scale is not None and len(scale) != types:
        return [
            f"config key 'evaluate.region_rtol_scale': {len(scale)} values for "
            f"mask.types={types} region types (one factor per type, 'diffusivity' or null)"
        ]
    return []


def default_select_metric(evaluate: dict[str, Any]) -> str:
    """``train.select.metric: null``: prcntclose at the first of ``evaluate.rtols``."""
    return close_metric_name(float(evaluate["rtols"][0]))


def _resolve_select_metrics(config: dict[str, Any]) -> None:
    """Write the default selection metric where ``train.select.metric`` is null, in the train
    section and in every model override that sets it to null."""
    metric = default_select_metric(config["evaluate"])
    sections = [config["train"], *(model["train"] for model in config["models"].values())]
    for train in sections:
        select = train.get("select")
        if isinstance(select, dict) and "metric" in select and select["metric"] is None:
            select["metric"] = metric


def region_rtol_scale_of(diffusivity) -> list[float]:
    """Each region type's diffusivity over the largest: the paper's (0.01, 0.1, 1) for
    (0.0025, 0.025, 0.25); all 1 when every diffusivity is 0."""
    largest = max((float(a) for a in diffusivity), default=0.0)
    if largest <= 0:
        return [1.0 for _ in diffusivity]
    return [float(a) / largest for a in diffusivity]


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override``'s keys replacing or (for mappings) merging into it."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _sections(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The schemas of a model's train, data and evaluate sections."""
    return {
        "train": {**schema["$defs"]["train"], "$defs": schema["$defs"]},
        "data": schema["properties"]["data"],
        "evaluate": schema["properties"]["evaluate"],
    }


def model_errors(
    kind: str,
    options: dict[str, Any],
    train: dict[str, Any],
    data: dict[str, Any],
    evaluate: dict[str, Any],
    key: Callable[[str, str], str],
    label: str = "config key",
    types: int | None = None,
    steps: int | None = None,
) -> list[str]:
    """What the train job would refuse in one model: options (coerced in place), the data
    window, the selection metric. ``key(section, dotted)`` names a key in messages; the
    train, data and evaluate sections must already be schema-valid; ``types`` (region
    types) and ``steps`` (time steps per run) are None when unknown."""
    if kind not in MODEL_KINDS:
        return [
            f"{label} '{key('', 'kind')}': unknown model kind {kind!r}; "
            f"known kinds: {', '.join(MODEL_KINDS)}"
        ]
    lines = []
    base = tuple(key("options", "").split("."))
    kind_schema = option_schema.kind_schema(kind)
    coerce_strings(options, kind_schema)
    option_lines = _schema_errors(options, kind_schema, base, label)
    if not option_lines and kind == "smoe":
        gate = options.get("gate", "latent")
        gate_options = options.get("gate_options") or {}
        if gate in GATE_NAMES:
            gate_schema = option_schema.gate_schema(gate)
            coerce_strings(gate_options, gate_schema)
            option_lines += _schema_errors(
                gate_options, gate_schema, (*base, "gate_options"), label
            )
    if not option_lines:
        for where, message in option_schema.cross_errors(kind, options, types):
            option_lines.append(f"{label} '{_dotted([*base, *_split_key(where)])}': {message}")
    lines += option_lines
    if kind in ("stencil", "generator") and data["normalization"] != "none":
        lines.append(
            f"{label} '{key('data', 'normalization')}': the analytic {kind} predictor "
            f"works on the field itself; it needs normalization 'none', not "
            f"{data['normalization']!r}"
        )
    if steps is not None and data["context"] + 2 > steps + 1:
        lines.append(
            f"{label} '{key('data', 'context')}': {data['context']} previous frames need runs of "
            f"at least {data['context'] + 2} frames, but heat.steps={steps} gives {steps + 1}"
        )
    metric = train["select"]["metric"]
    problem = _metric_problem(metric, types, evaluate)
    if problem:
        lines.append(f"{label} '{key('train', 'select.metric')}': {metric!r} {problem}")
    return lines


def _split_key(where: str) -> list[Any]:
    """'hidden_layers[0].experts' -> ['hidden_layers', 0, 'experts']."""
    parts: list[Any] = []
    for piece in filter(None, where.split(".")):
        name, *indices = piece.split("[")
        if name:
            parts.append(name)
        parts += [int(index.rstrip("]")) for index in indices]
    return parts


def check_models(config: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Every model's kind, options, train/data overrides (once merged), data window and
    selection metric, and the names in ``run``: a list of messages."""
    models = config["models"]
    sections = _sections(schema)
    types, steps = config["mask"]["types"], config["heat"]["steps"]
    lines = []
    other_family = any(config[family]["enabled"] for family in ("clusters", "gated"))
    if not models and not other_family:
        lines.append(
            "config key 'models': no models are defined; a config needs at least one (an "
            "empty or comment-only config is refused rather than planning the default "
            "paper-size simulation with nothing to train), e.g. models: {persistence: "
            "{kind: persistence}}; with clusters.enabled or gated.enabled, models: {} runs "
            "that family alone"
        )
    for name, model in models.items():

        def key(section: str, dotted: str, name=name, model=model) -> str:
            if not section:
                return f"models.{name}.{dotted}"
            if section == "options":
                return f"models.{name}.options" + (f".{dotted}" if dotted else "")
            own: Any = model.get(section, {})
            for part in dotted.split("."):
                own = own.get(part, _UNSET) if isinstance(own, dict) else _UNSET
            inherited = own is _UNSET
            return f"{section}.{dotted}" if inherited else f"models.{name}.{section}.{dotted}"

        merged = {}
        for section in ("train", "data"):
            coerce_strings(model[section], sections[section])
            merged[section] = deep_merge(config[section], model[section])
            section_lines = _schema_errors(
                merged[section], sections[section], ("models", name, section), "config key"
            )
            lines += section_lines
            if section_lines:
                merged[section] = None
        if merged["train"] is None or merged["data"] is None:
            continue
        lines += model_errors(
            model["kind"],
            model["options"],
            merged["train"],
            merged["data"],
            config["evaluate"],
            key,
            types=types,
            steps=steps,
        )
    lines += undefined_run_names(config["run"], models)
    return lines


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


BATCH_WIDE_AUX = ("importance", "load", "load_shazeer", "spatial")
"""SMoE auxiliary losses computed over the whole minibatch (``smoe.families.heat.task.HeatTask``
refuses them on several processes; a test keeps the two equal)."""


def _process_errors(config: dict[str, Any]) -> list[str]:
    """What a heat model cannot train on ``train.processes`` > 1, found before any job:
    Snakemake has deleted a job's old outputs by the time the job could refuse it."""
    lines = []
    for name, model in config["models"].items():
        train = deep_merge(config["train"], model["train"])
        processes = train.get("processes", 1)
        if processes == 1:
            continue
        key = (
            f"models.{name}.train.processes"
            if "processes" in model["train"]
            else ("train.processes")
        )
        where = f"config key '{key}': {processes} processes for model {name!r}"
        if train["batch_size"] < processes:
            lines.append(
                f"{where}, but its batch_size {train['batch_size']} leaves a process without "
                "samples; raise train.batch_size or use fewer processes"
            )
        if model["kind"] != "smoe":
            continue
        options = {**option_schema.defaults("smoe"), **model["options"]}
        layers = [options, *(options.get("hidden_layers") or [])]
        wide = sorted(
            {
                a
                for layer in layers
                for a, c in (layer.get("aux") or options["aux"] or {}).items()
                if c and a in BATCH_WIDE_AUX
            }
        )
        if wide:
            lines.append(
                f"{where}: its aux losses {', '.join(wide)} are computed over the whole "
                "minibatch, which the processes do not share; train it on 1 process or drop "
                f"models.{name}.options.aux {', '.join(wide)}"
            )
        if any(layer.get("noise", options["noise"]) for layer in layers):
            lines.append(
                f"{where}: models.{name}.options.noise draws routing noise sample by sample, "
                "which several processes would not draw as one does; train it on 1 process"
            )
    return lines


def _spec_with_its_keys(raw: Any, label: str) -> dict[str, Any]:
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


def validate_spec(
    raw: Any, train_store: str | Path | None = None, *, gpu: str | None = None
) -> ModelSpec:
    """A model spec (``smoe train --spec``) checked as the workflow checks a config's model.

    The train, data and evaluate sections are validated against the config schema (missing
    keys get their defaults), the options against the kind's schema, and, when
    ``train_store`` is readable, the region types and time steps of its data.
    """
    label = "--spec key"
    spec = _spec_with_its_keys(raw, label)
    lines: list[str] = []
    schema = load_schema()
    name = spec["name"]
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        lines.append(
            f"{label} 'name': {name!r} is not safe as a folder name (letters, digits, '.', "
            "'_' and '-', starting with a letter or digit)"
        )
    if not isinstance(spec["kind"], str):
        lines.append(f"{label} 'kind': {spec['kind']!r} is not a model kind")
    if not isinstance(spec["options"], dict):
        lines.append(f"{label} 'options': {spec['options']!r} is not a mapping of options")
    for section, section_schema in _sections(schema).items():
        coerce_strings(spec[section], section_schema)
        lines += _schema_errors(spec[section], section_schema, (section,), label, defaults=True)
    if lines:
        raise InputError("invalid model spec:\n  " + "\n  ".join(lines))
    types = steps = diffusivity = None
    if train_store is not None and Path(train_store).exists():
        from smoe.families.heat.store import open_store

        attrs = open_store(train_store).attrs
        diffusivity = list(attrs.get("diffusivity", [])) or None
        types = len(diffusivity) if diffusivity else None
        steps = attrs.get("steps")
    evaluate = spec["evaluate"]
    if spec["train"]["select"]["metric"] is None:
        spec["train"]["select"]["metric"] = default_select_metric(evaluate)
    if evaluate["region_rtol_scale"] == "diffusivity":
        if diffusivity is None:
            lines.append(
                f"{label} 'evaluate.region_rtol_scale': 'diffusivity' needs the train store's "
                "diffusivities; give the factors"
            )
            evaluate["region_rtol_scale"] = None
        else:
            evaluate["region_rtol_scale"] = region_rtol_scale_of(diffusivity)
    elif types is not None and evaluate["region_rtol_scale"] is not None:
        if len(evaluate["region_rtol_scale"]) != types:
            lines.append(
                f"{label} 'evaluate.region_rtol_scale': {len(evaluate['region_rtol_scale'])} "
                f"values for the store's {types} region types"
            )

    def key(section: str, dotted: str) -> str:
        return ".".join(part for part in (section, dotted) if part)

    lines += model_errors(
        spec["kind"],
        spec["options"],
        spec["train"],
        spec["data"],
        evaluate,
        key,
        label,
        types,
        steps,
    )
    if spec["train"]["device"] == "cuda":
        mode = gpu_check_mode() if gpu is None else gpu
        lines += _cuda_errors({"train.device": [name]}, mode, None, _warn_stderr, label)
    if lines:
        raise InputError("invalid model spec:\n  " + "\n  ".join(lines))
    return ModelSpec.from_dict(spec)


# -- the synthetic-cluster family ---------------------------------------------------------


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
    known = option_schema.CLUSTER_MODEL_KINDS
    if kind not in known:
        return [
            f"{label} '{_dotted(base[:-1] + ('kind',))}': unknown model kind {kind!r}; "
            f"known kinds: {', '.join(known)}"
        ]
    kind_schema = option_schema.cluster_kind_schema(kind)
    coerce_strings(options, kind_schema)
    lines = _schema_errors(options, kind_schema, base, label)
    if not lines:
        for where, message in option_schema.cluster_cross_errors(kind, options):
            lines.append(f"{label} '{_dotted([*base, *_split_key(where)])}': {message}")
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
        lines += _schema_errors(
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
    spec = _spec_with_its_keys(raw, label)
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
    for section, section_schema in _cluster_sections(load_schema()).items():
        coerce_strings(spec[section], section_schema)
        lines += _schema_errors(spec[section], section_schema, (section,), label, defaults=True)
    if not lines:
        for key, kind in KIND_ONLY_TRAIN_KEYS.items():
            if spec["kind"] != kind and spec["train"][key]:
                lines.append(
                    f"{label} 'train.{key}': {spec['train'][key]!r} applies to {kind} models "
                    f"only, not to a {spec['kind']}; give null"
                )
    if not lines and spec["train"]["device"] == "cuda":
        mode = gpu_check_mode() if gpu is None else gpu
        lines += _cuda_errors({"train.device": [name]}, mode, None, _warn_stderr, label)
    if lines:
        raise InputError("invalid model spec:\n  " + "\n  ".join(lines))
    return ModelSpec.from_dict(spec)


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


def cluster_models_to_run(config: dict[str, Any]) -> list[str]:
    """The cluster family's models to run: ``clusters.run``, or every defined model."""
    clusters = config["clusters"]
    return list(clusters["run"] if clusters["run"] is not None else clusters["models"])


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
    try:
        return validate_config(raw)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from exc
