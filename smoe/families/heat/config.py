"""The heat family's part of the config: its keys are the config's top-level ones (``mask``,
``heat``, ``compute``, ``models``, ``run``, ``seeds``, ``data``, ``train``, ``evaluate``).

:func:`config_errors` is what the config checks of a schema-valid config with defaults
(model options per kind, selection metrics the evaluation does not compute, data windows
longer than a run, a map without room for its region types, processes a model cannot
share); :func:`cuda_wanted` names the keys that send a model to CUDA. :func:`model_spec`,
:func:`models_to_run` and :class:`Config` (a typed view) are what the rules and jobs read.
Only standard-library, numpy, yaml and jsonschema imports happen here.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smoe.core.config import (
    MODEL_NAME,
    UNSET,
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
from smoe.families.heat import options as heat_options
from smoe.families.heat.names import GATE_NAMES, MODEL_KINDS
from smoe.families.heat.simulation import HeatParams

SPLITS = ("train", "val", "test")


MASK_CHECK_BUDGET = 4_000_000
"""Generated maps are drawn and checked at validation when height * width * types^2 is at
most this (about 0.1 s); larger ones only need height * width >= types here."""


METRIC_BASES = ("mse", "mae", "rmse", "nrmse", "vrmse")
"""The error metrics of :class:`smoe.families.heat.metrics.MetricAccumulator`, besides
prcntclose."""


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
    kind_schema = heat_options.kind_schema(kind)
    coerce_strings(options, kind_schema)
    option_lines = schema_errors(options, kind_schema, base, label)
    if not option_lines and kind == "smoe":
        gate = options.get("gate", "latent")
        gate_options = options.get("gate_options") or {}
        if gate in GATE_NAMES:
            gate_schema = heat_options.gate_schema(gate)
            coerce_strings(gate_options, gate_schema)
            option_lines += schema_errors(gate_options, gate_schema, (*base, "gate_options"), label)
    if not option_lines:
        for where, message in heat_options.cross_errors(kind, options, types):
            option_lines.append(f"{label} '{dotted([*base, *split_key(where)])}': {message}")
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


def check_models(config: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Every model's kind, options, train/data overrides (once merged), data window and
    selection metric, and the names in ``run``: a list of messages."""
    models = config["models"]
    sections = _sections(schema)
    types, steps = config["mask"]["types"], config["heat"]["steps"]
    lines = []
    other_family = any(  # another family's section, switched on
        isinstance(section, dict) and section.get("enabled") is True for section in config.values()
    )
    if not models and not other_family:
        lines.append(
            "config key 'models': no models are defined; a config needs at least one (an "
            "empty or comment-only config is refused rather than planning the default "
            "paper-size simulation with nothing to train), e.g. models: {persistence: "
            "{kind: persistence}}; with another family enabled (e.g. clusters.enabled: "
            "true), models: {} runs that family alone"
        )
    for name, model in models.items():

        def key(section: str, dotted: str, name=name, model=model) -> str:
            if not section:
                return f"models.{name}.{dotted}"
            if section == "options":
                return f"models.{name}.options" + (f".{dotted}" if dotted else "")
            own: Any = model.get(section, {})
            for part in dotted.split("."):
                own = own.get(part, UNSET) if isinstance(own, dict) else UNSET
            inherited = own is UNSET
            return f"{section}.{dotted}" if inherited else f"models.{name}.{section}.{dotted}"

        merged = {}
        for section in ("train", "data"):
            coerce_strings(model[section], sections[section])
            merged[section] = deep_merge(config[section], model[section])
            section_lines = schema_errors(
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
        options = {**heat_options.defaults("smoe"), **model["options"]}
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


def validate_spec(
    raw: Any, train_store: str | Path | None = None, *, gpu: str | None = None
) -> ModelSpec:
    """A model spec (``smoe train --spec``) checked as the workflow checks a config's model.

    The train, data and evaluate sections are validated against the config schema (missing
    keys get their defaults), the options against the kind's schema, and, when
    ``train_store`` is readable, the region types and time steps of its data.
    """
    label = "--spec key"
    spec = spec_with_its_keys(raw, label)
    lines: list[str] = []
    from smoe.config import load_schema

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
        lines += schema_errors(spec[section], section_schema, (section,), label, defaults=True)
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
        lines += cuda_errors({"train.device": [name]}, mode, None, warn_stderr, label)
    if lines:
        raise InputError("invalid model spec:\n  " + "\n  ".join(lines))
    return ModelSpec.from_dict(spec)


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


def config_errors(config: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """The heat family's cross-key checks (``evaluate.region_rtol_scale: diffusivity`` and
    the selection metrics are resolved in place)."""
    typed = Config.from_dict(config)
    types = typed.mask.types
    lines = []
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
    if not lines:
        lines += _process_errors(config)
    return lines


def cuda_wanted(config: dict[str, Any], valid: bool) -> dict[str, list[str]]:
    """Config keys (``train.device`` or ``models.<name>.train.device``) that send a heat
    model to CUDA, with the models."""
    wanted: dict[str, list[str]] = {}
    for name, model in config["models"].items():
        if deep_merge(config["train"], model["train"]).get("device") == "cuda":
            key = f"models.{name}.train.device" if "device" in model["train"] else "train.device"
            wanted.setdefault(key, []).append(name)
    return wanted
