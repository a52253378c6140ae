import dataclasses
import inspect
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from smoe.config import load_config, validate_config
from smoe.core.errors import InputError
from smoe.families.clusters import options as cluster_options
from smoe.families.heat import baselines, names
from smoe.families.heat import options as option_schema
from smoe.families.heat.config import (
    Config,
    close_metric_name,
    computable_metrics,
    model_spec,
    region_rtol_scale_of,
    validate_spec,
)
from smoe.families.heat.metrics import MetricAccumulator, close_name
from smoe.families.heat.registry import DATA_ARGUMENTS, MODELS, build_model
from smoe.families.heat.simulation import HeatParams
from smoe.families.heat.store import simulate_split
from smoe.nn import gates, layers, routing
from smoe.nn import layer as smoe_module


@pytest.mark.parametrize("name", ["config.yaml", "paper.yaml", "test.yaml"])
def test_shipped_configs_are_valid(repo, name):
    config = load_config(repo / "config" / name)
    typed = Config.from_dict(config)
    assert typed.heat.diffusivity == (0.0025, 0.025, 0.25)
    assert set(typed.splits) == {"train", "val", "test"}


def test_paper_config_has_the_paper_sizes_and_seeds(repo):
    typed = Config.from_dict(load_config(repo / "config" / "paper.yaml"))
    assert (typed.mask.height, typed.mask.width, typed.mask.types, typed.mask.seed) == (
        64,
        64,
        3,
        42,
    )
    assert typed.heat.steps == 100
    assert {k: (s.runs, s.seed) for k, s in typed.splits.items()} == {
        "train": (1000, 42),
        "val": (20, 546981),
        "test": (20, 865124),
    }


ONE_MODEL = {"models": {"p": {"kind": "persistence"}}}


def test_a_config_with_one_model_gets_every_other_default():
    config = validate_config(ONE_MODEL)
    assert config["mask"] == {"file": None, "height": 64, "width": 64, "types": 3, "seed": 42}
    assert config["heat"]["splits"]["test"] == {"runs": 20, "seed": 865124}
    assert config["heat"]["init"] == {"kind": "uniform", "ranges": None}
    assert config["compute"] == {"scheduler": "threads", "threads": 4}
    # the "s" variant's factors follow the diffusivities: the paper's values for its diffusivities
    assert config["evaluate"]["region_rtol_scale"] == [0.01, 0.1, 1.0]
    assert config["models"]["p"] == {"kind": "persistence", "options": {}, "train": {}, "data": {}}


def test_validation_does_not_modify_its_input():
    raw = {"heat": {"steps": 5}, **ONE_MODEL}
    validate_config(raw)
    assert raw == {"heat": {"steps": 5}, **ONE_MODEL}


@pytest.mark.parametrize(
    "config, message",
    [
        ({"heat": {"stepz": 3}}, r"unknown config key 'heat.stepz' under 'heat'"),
        ({"trian": {}}, r"unknown config key 'trian'"),
        ({"heat": {"steps": "ten"}}, r"'heat.steps': 'ten' is not of type 'integer'"),
        ({"mask": {"types": 2.5}}, r"'mask.types': 2.5 is not of type 'integer'"),
        (
            {"heat": {"splits": {"train": {"runs": 0, "seed": 1}}}},
            r"'heat.splits.train.runs': 0 is less than the minimum of 1",
        ),
        (
            {"heat": {"splits": {"val": {"runs": -5, "seed": 1}}}},
            r"'heat.splits.val.runs': -5 is less than the minimum of 1",
        ),
        (
            {"heat": {"diffusivity": [0.0025, 0.025, 0.3]}},
            r"'heat.diffusivity\[2\]': 0.3 is greater than the maximum of 0.25.*unstable",
        ),
        (
            {"heat": {"diffusivity": [-0.01, 0.025, 0.25]}},
            r"'heat.diffusivity\[0\]': -0.01 is less than the minimum of 0",
        ),
        (
            {"heat": {"diffusivity": [0.0025, 0.025]}},
            r"'heat.diffusivity': 2 values for mask.types=3 region types",
        ),
        ({"heat": {"boundary": "reflect"}}, r"'heat.boundary': 'reflect' is not one of"),
        ({"heat": {"init": {"ranges": [[0, 1]]}}}, r"'heat\.init\.ranges': 1 ranges for 3"),
        ({"heat": {"clip": [1, 0]}}, r"'heat\.clip': \[1\.0, 0\.0\] needs low < high"),
        (
            {"mask": {"file": "nowhere/mask.npy"}},
            r"config key 'mask.file': mask file 'nowhere/mask.npy' does not exist",
        ),
        ({"mask": {"file": "mask.tif"}}, r"'mask.file': 'mask.tif' does not match"),
    ],
)
def test_bad_config_is_rejected_with_the_key_named(config, message):
    with pytest.raises(InputError, match=message):
        validate_config(config)


def test_all_schema_errors_are_reported_together():
    with pytest.raises(InputError) as info:
        validate_config({"heat": {"steps": 0, "stepz": 1}, "mask": {"types": 0}})
    text = str(info.value)
    assert "heat.steps" in text and "heat.stepz" in text and "mask.types" in text


def test_mask_file_values_must_fit_the_types(tmp_path, small_mask):
    bad = small_mask.copy()
    bad[3, 4] = 7
    path = tmp_path / "mask.npy"
    np.save(path, bad)
    with pytest.raises(InputError, match=r"'mask.file'.*values \[7\] outside 0..2"):
        validate_config({"mask": {"file": str(path)}})
    np.save(path, small_mask)
    assert validate_config({"mask": {"file": str(path)}, **ONE_MODEL})["mask"]["file"] == str(path)


def test_load_config_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"heat": {"steps": -1}}))
    with pytest.raises(InputError, match=r"c.yaml: invalid config"):
        load_config(path)
    with pytest.raises(InputError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("heat: [unclosed")
    with pytest.raises(InputError, match="not valid YAML"):
        load_config(path)


# --- every model option is checked at validation, as the constructors would --------------


COMMON = ("in_channels", "height", "width")
GATE_COMMON = ("in_channels", "experts", "k", "height", "width", "mask_input")


def _plain(value):
    """Defaults as a config holds them: tuples are lists."""
    return [_plain(v) for v in value] if isinstance(value, tuple | list) else value


def constructor_options(builder, common) -> dict:
    """A constructor's options and their defaults, from its signature: the parameters after
    the common ones, except what comes from the data; ``**routing`` stands for the fields
    of RoutingOptions."""
    params = list(inspect.signature(builder).parameters.values())
    assert tuple(p.name for p in params[: len(common)]) == common, builder
    options = {}
    for param in params[len(common) :]:
        if param.kind is param.VAR_KEYWORD:
            assert builder is smoe_module.SMoENet, f"{builder} takes **{param.name}"
            for field in dataclasses.fields(routing.RoutingOptions):
                options[field.name] = _plain(field.default)
        elif param.name not in (*DATA_ARGUMENTS, "mask"):
            assert param.default is not param.empty, (builder, param.name)
            options[param.name] = _plain(param.default)
    return options


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_option_schema_matches_the_constructor(kind):
    """Names and defaults of every kind's options are those of its constructor's signature:
    a new, renamed or re-defaulted option fails here until smoe/families/heat/options.py says so."""
    assert option_schema.defaults(kind) == constructor_options(MODELS[kind], COMMON)


@pytest.mark.parametrize("gate", sorted(gates.GATES))
def test_gate_option_schema_matches_the_gate(gate):
    schema = option_schema.GATE_OPTIONS[gate]
    declared = {name: sub.get("default") for name, sub in schema.items()}
    assert declared == constructor_options(gates.GATES[gate], GATE_COMMON)


def test_torch_free_name_lists_equal_the_model_code():
    assert names.GATE_NAMES == tuple(gates.GATES)
    assert names.LAYER_ACTIVATIONS == tuple(layers.ACTIVATIONS)
    assert names.ROUTING_ACTIVATIONS == routing.ACTIVATIONS
    assert names.RC_SIGNALS == routing.RC_SIGNALS
    assert names.EXPERT_INITS == smoe_module.EXPERT_INITS
    assert names.AUX_LOSSES == smoe_module.AUX_LOSSES
    assert names.BASELINE_INITS == baselines.INITS
    assert names.COORDS == baselines.COORDS


MASK = torch.as_tensor(np.arange(64).reshape(8, 8) % 3)


def build(kind, options):
    return build_model(kind, options, 1, 8, 8, mask=MASK, region_diffusivity=(0.0025, 0.025, 0.25))


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_every_default_written_out_is_valid_and_builds(kind):
    options = option_schema.defaults(kind)
    config = validate_config({"models": {"m": {"kind": kind, "options": options}}})
    build(kind, model_spec(config, "m").options)


# (kind, options, key and message): each refused by validation AND by the constructor
REFUSED_BY_BOTH = [
    ("smoe", {"quantile": 1.5}, r"'models\.m\.options\.quantile': 1\.5 is greater than"),
    ("smoe", {"damping_factor": -0.1}, r"'models\.m\.options\.damping_factor': -0\.1 is less"),
    ("smoe", {"experts": 3, "k": 4}, r"'models\.m\.options': k=4 must be between 1 and experts=3"),
    ("smoe", {"experts": "three"}, r"'models\.m\.options\.experts': 'three' is not of type"),
    ("smoe", {"gate": "bogus"}, r"'models\.m\.options\.gate': unknown gate 'bogus'"),
    (
        "smoe",
        {"gate": "conv", "gate_options": {"bais": True}},
        r"'models\.m\.options\.gate_options\.bais': unknown option of gate 'conv'",
    ),
    (
        "smoe",
        {"gate": "latent", "gate_options": {"bias": True}},
        r"'models\.m\.options\.gate_options\.bias': unknown option of gate 'latent'",
    ),
    ("smoe", {"aux": {"lod": 1.0}}, r"'models\.m\.options\.aux\.lod': unknown auxiliary loss"),
    ("smoe", {"aux": {"load": 1.0}}, r"'models\.m\.options\.aux': the load loss needs noise"),
    ("smoe", {"expert_init": "default"}, r"'models\.m\.options\.expert_init': 'default' is not"),
    ("smoe", {"filters": 2}, r"'models\.m\.options\.filters': 2 is greater than the maximum"),
    ("smoe", {"gate": "fixed", "experts": 2}, r"'models\.m\.options\.experts': gate 'fixed'"),
    (
        "smoe",
        {"hidden_layers": [{"experts": 2, "k": 3}]},
        r"'models\.m\.options\.hidden_layers\[0\]': k=3 must be between 1 and experts=2",
    ),
    (
        "smoe",
        {"hidden_layers": [{"expertz": 2}]},
        r"'models\.m\.options\.hidden_layers\[0\]\.expertz': unknown key of a hidden layer",
    ),
    ("smoe", {"colour": 1}, r"'models\.m\.options\.colour': unknown option of model kind 'smoe'"),
    ("smoe", {"mask": [[0]]}, r"'models\.m\.options\.mask': unknown option"),
    ("smoe", {"activation": "softplus"}, r"'models\.m\.options\.activation': 'softplus'"),
    ("smoe", {"hidden_activation": "softplus"}, r"'models\.m\.options\.hidden_activation'"),
    ("smoe", {"rc_signal": "loss"}, r"'models\.m\.options\.rc_signal': 'loss' is not one of"),
    ("smoe", {"error_scale": "mae"}, r"'models\.m\.options\.error_scale': 'mae' is not valid"),
    ("cnn", {"hidden": [0]}, r"'models\.m\.options\.hidden\[0\]': 0 is less than the minimum"),
    ("cnn", {"hidden": 4}, r"'models\.m\.options\.hidden': 4 is not of type 'array'"),
    ("cnn", {"hidden": [True]}, r"'models\.m\.options\.hidden\[0\]': True is not of type"),
    ("cnn", {"kernel_size": 4}, r"'models\.m\.options\.kernel_size': 4 is not odd"),
    ("cnn", {"activation": "softplus"}, r"'models\.m\.options\.activation': 'softplus'"),
    ("cnn", {"init": "xavier"}, r"'models\.m\.options\.init': 'xavier' is not one of"),
    ("coordconv", {"coords": "all"}, r"'models\.m\.options\.coords': 'all' is not one of"),
    ("condconv", {"experts": 0}, r"'models\.m\.options\.experts': 0 is less than the minimum"),
    ("convlcn", {"hidden": [3]}, r"'models\.m\.options\.hidden': \[3\] is not of type 'integer'"),
    ("convlcn", {"lcn_kernel_size": 2}, r"'models\.m\.options\.lcn_kernel_size': 2 is not odd"),
    ("lcn", {"kernel_size": 2}, r"'models\.m\.options\.kernel_size': 2 is not odd"),
    ("mlp", {"hidden": [-1]}, r"'models\.m\.options\.hidden\[0\]': -1 is less than"),
    ("mlp", {"batchnorm": True}, r"'models\.m\.options\.batchnorm': unknown option of model kind"),
    ("stencil", {"diffusivity": 0.3}, r"'models\.m\.options\.diffusivity': 0\.3 is not valid"),
    ("stencil", {"diffusivity": "worst"}, r"'models\.m\.options\.diffusivity': 'worst' is not"),
    ("persistence", {"hidden": [4]}, r"'models\.m\.options\.hidden': unknown option of model"),
    ("generator", {"x": 1}, r"'models\.m\.options\.x': unknown option of model kind 'generator'"),
]


@pytest.mark.parametrize("kind, options, message", REFUSED_BY_BOTH)
def test_bad_options_are_refused_at_validation_as_the_model_would(kind, options, message):
    with pytest.raises(InputError, match=message):
        validate_config({"models": {"m": {"kind": kind, "options": options}}})
    with pytest.raises(InputError):  # what the train job would have said, too late
        build(kind, options)


@pytest.mark.parametrize(
    "kind, options, message",
    [  # the constructors do not refuse these, but the model cannot work with them
        ("smoe", {"kernel_size": 4}, r"'models\.m\.options\.kernel_size': 4 is not odd"),
        ("smoe", {"aux": {"importance": -1}}, r"'models\.m\.options\.aux\.importance': -1 is"),
        ("smoe", {"rc_weight": -1}, r"'models\.m\.options\.rc_weight': -1 is less than"),
        ("smoe", {"error_scale": 0}, r"'models\.m\.options\.error_scale': 0 is not valid"),
        (
            "smoe",
            {"gate_options": {"init_scale": -1}},
            r"'models\.m\.options\.gate_options\.init_scale': -1 is less than the minimum",
        ),
        (
            "smoe",
            {"noise": True, "experts": 2, "k": 2, "aux": {"load_shazeer": 1}},
            r"'models\.m\.options\.aux': the load_shazeer loss needs more experts than k",
        ),
    ],
)
def test_options_the_model_cannot_use_are_refused(kind, options, message):
    with pytest.raises(InputError, match=message):
        validate_config({"models": {"m": {"kind": kind, "options": options}}})


def test_every_bad_model_is_reported_at_once():
    with pytest.raises(InputError) as info:
        validate_config(
            {
                "models": {
                    "a": {"kind": "smoe", "options": {"quantile": 2}},
                    "b": {"kind": "cnn", "options": {"kernel_size": 2}},
                    "c": {"kind": "nope"},
                }
            }
        )
    text = str(info.value)
    assert "models.a.options.quantile" in text and "models.b.options.kernel_size" in text
    assert "'models.c.kind': unknown model kind 'nope'" in text


# --- selection metrics: exactly what the evaluation computes -------------------------------


@pytest.mark.parametrize(
    "rtol, name",
    [
        (0.01, "prcntclose1.0"),
        (0.001, "prcntclose0.1"),
        (0.0012, "prcntclose0.12"),
        (1e-4, "prcntclose0.01"),
        (0.333, "prcntclose33.3"),
        (2.5, "prcntclose250.0"),
    ],
)
def test_metric_names_are_the_tolerance_in_percent(rtol, name):
    assert close_metric_name(rtol) == close_name(rtol) == name
    assert close_metric_name(rtol, scaled=True) == name + "s"


@pytest.mark.parametrize(
    "types, rtols, scale",
    [(3, (0.01,), (0.01, 0.1, 1.0)), (1, (0.01, 0.05), None), (4, (0.001, 0.001), (1,) * 4)],
)
def test_computable_metrics_are_the_computed_ones(types, rtols, scale):
    mask = torch.arange(types * 4).reshape(types, 4) % types
    accumulator = MetricAccumulator(mask, rtols, scale)
    accumulator.update(torch.rand(2, 1, types, 4), torch.rand(2, 1, types, 4))
    assert computable_metrics(types, rtols, scale is not None) == list(accumulator.compute())


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"train": {"select": {"metric": "mask5-prcntclose1.0"}}},
            r"'train\.select\.metric': 'mask5-prcntclose1\.0' names region type 5, which does "
            r"not exist: mask\.types=3",
        ),
        (
            {"train": {"select": {"metric": "prcntclose5.0"}}},
            r"'train\.select\.metric': 'prcntclose5\.0' is not computed with evaluate\.rtols",
        ),
        (
            {
                "train": {"select": {"metric": "prcntclose1.0s"}},
                "evaluate": {"region_rtol_scale": None},
            },
            r"'train\.select\.metric': 'prcntclose1\.0s' is not computed",
        ),
        (
            {"models": {"m": {"kind": "cnn", "train": {"select": {"metric": "mask3-mse"}}}}},
            r"'models\.m\.train\.select\.metric': 'mask3-mse' names region type 3",
        ),
    ],
)
def test_selection_metric_must_be_computed(change, message):
    config = {**ONE_MODEL, **change}
    with pytest.raises(InputError, match=message):
        validate_config(config)


def test_the_default_selection_metric_follows_the_first_tolerance():
    assert validate_config(ONE_MODEL)["train"]["select"]["metric"] == "prcntclose1.0"
    config = validate_config({**ONE_MODEL, "evaluate": {"rtols": [0.05, 0.01]}})
    assert model_spec(config, "p").train["select"] == {"metric": "prcntclose5.0", "mode": "max"}
    override = {"models": {"p": {"kind": "persistence", "train": {"select": {"metric": None}}}}}
    config = validate_config({**override, "train": {"select": {"metric": "mse", "mode": "min"}}})
    assert model_spec(config, "p").train["select"] == {"metric": "prcntclose1.0", "mode": "min"}


def test_computed_selection_metrics_pass():
    for metric in ("mask2-prcntclose5.0s", "prcntclose0.1", "vrmse", "mask0-mse"):
        select = {"train": {"select": {"metric": metric}}, "evaluate": {"rtols": [0.05, 0.001]}}
        validate_config({**ONE_MODEL, **select})


# --- data, map, seeds, names, results, empty configs ---------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"data": {"context": 5}, "heat": {"steps": 5}},
            r"'data\.context': 5 previous frames need runs of at least 7 frames, but "
            r"heat\.steps=5 gives 6",
        ),
        (
            {"models": {"m": {"kind": "cnn", "data": {"context": 4}}}, "heat": {"steps": 4}},
            r"'models\.m\.data\.context': 4 previous frames",
        ),
        ({"mask": {"height": 1, "width": 2}}, r"'mask': a 1 x 2 map has 2 cells, too few for"),
        (
            {"mask": {"height": 2, "width": 2, "seed": 0}},
            r"'mask\.seed': the map generated with seed 0 \(2 x 2, 3 types\): region types \[",
        ),
        ({"seeds": [0, 1, 0]}, r"'seeds': \[0, 1, 0\] has non-unique elements"),
        ({"run": ["p", "p"]}, r"'run': \['p', 'p'\] has non-unique elements"),
        ({"run": []}, r"'run': \[\] should be non-empty"),
        ({"models": {"a/b": {"kind": "cnn"}}}, r"'models\.a/b': the name 'a/b' is not safe"),
        ({"models": {".hidden": {"kind": "cnn"}}}, r"'models\.\.hidden': the name '\.hidden'"),
        ({"models": {}}, r"'models': no models are defined"),
        (
            {"evaluate": {"region_rtol_scale": [1, 1]}},
            r"'evaluate\.region_rtol_scale': 2 values for mask\.types=3",
        ),
        ({"evaluate": {"region_rtol_scale": "viscosity"}}, r"'evaluate\.region_rtol_scale'"),
    ],
)
def test_cross_key_errors_name_the_key(change, message):
    with pytest.raises(InputError, match=message):
        validate_config({**ONE_MODEL, **change})


def test_an_empty_config_is_refused():
    with pytest.raises(InputError, match=r"'models': no models are defined"):
        validate_config({})


def test_an_empty_or_comment_only_file_is_refused(tmp_path):
    for text in ("", "# nothing yet\n"):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(InputError, match=r"is empty or holds only comments"):
            load_config(path)


def test_results_must_not_be_a_file(tmp_path):
    afile = tmp_path / "taken"
    afile.write_text("mine")
    for results, message in (
        (afile, "is an existing file"),
        (afile / "sub", "lies under .*taken', which is an existing file"),
    ):
        with pytest.raises(InputError, match=rf"'results': .*{message}"):
            validate_config({**ONE_MODEL, "results": str(results)})
    assert afile.read_text() == "mine"
    validate_config({**ONE_MODEL, "results": str(tmp_path / "new" / "folder")})


# --- defaults that fit any number of region types -----------------------------------------


@pytest.mark.parametrize(
    "diffusivity", [[0.25], [0.1, 0.2], [0.001, 0.01, 0.1, 0.2], [0.0, 0.0], [0.0, 0.1, 0.05]]
)
def test_changing_only_the_types_and_diffusivities_gives_a_valid_config(diffusivity):
    """The user's edit of mask.types (and heat.diffusivity to match) needs nothing else: the
    default region_rtol_scale follows the diffusivities and the evaluation accepts it."""
    types = len(diffusivity)
    config = validate_config(
        {**ONE_MODEL, "mask": {"types": types}, "heat": {"diffusivity": diffusivity}}
    )
    scale = config["evaluate"]["region_rtol_scale"]
    assert scale == region_rtol_scale_of(diffusivity) and len(scale) == types
    assert max(scale) == 1.0
    mask = torch.arange(types * 3).reshape(types, 3) % types
    MetricAccumulator(mask, config["evaluate"]["rtols"], scale)  # what evaluation builds


def test_region_rtol_scale_can_be_given_or_skipped():
    given = validate_config({**ONE_MODEL, "evaluate": {"region_rtol_scale": [1, 0.5, 0.25]}})
    assert given["evaluate"]["region_rtol_scale"] == [1, 0.5, 0.25]
    none = validate_config({**ONE_MODEL, "evaluate": {"region_rtol_scale": None}})
    assert none["evaluate"]["region_rtol_scale"] is None


# --- train.device: cuda without a GPU -----------------------------------------------------

CUDA = {**ONE_MODEL, "train": {"device": "cuda"}}


def test_cuda_without_a_gpu_is_refused_for_a_local_run(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # hides every GPU, as for PyTorch
    monkeypatch.delenv("SMOE_GPU_CHECK", raising=False)
    with pytest.raises(InputError, match=r"'train\.device': 'cuda' \(model p\), but no GPU is "):
        validate_config(CUDA)
    with pytest.raises(InputError, match=r"CUDA_VISIBLE_DEVICES='' hides every GPU"):
        validate_config(CUDA, gpu="local")


def test_cuda_without_a_gpu_is_a_warning_for_a_cluster_run(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    warnings = []
    validate_config(CUDA, gpu="cluster", executor="slurm", warn=warnings.append)
    assert len(warnings) == 1
    assert "'train.device'" in warnings[0] and "'slurm' executor" in warnings[0]
    assert "expected on the cluster nodes" in warnings[0]
    validate_config(CUDA, gpu="skip", warn=warnings.append)  # inside a job: not checked
    monkeypatch.setenv("SMOE_GPU_CHECK", "cluster")
    validate_config(CUDA, warn=warnings.append)
    assert len(warnings) == 2
    monkeypatch.setenv("SMOE_GPU_CHECK", "sometimes")
    with pytest.raises(InputError, match="SMOE_GPU_CHECK='sometimes' is not one of"):
        validate_config(CUDA)


def test_a_model_override_names_its_own_device_key(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    config = {"models": {"p": {"kind": "persistence", "train": {"device": "cuda"}}}}
    with pytest.raises(InputError, match=r"'models\.p\.train\.device': 'cuda'"):
        validate_config(config, gpu="local")


def test_cpu_and_auto_never_look_for_a_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    for device in ("cpu", "auto"):
        validate_config({**ONE_MODEL, "train": {"device": device}}, gpu="local")


def test_validation_does_not_import_torch():
    code = (
        "import sys, smoe.config as c; "
        "c.validate_config({'models': {'s': {'kind': 'smoe', 'options': {'gate': 'conv'}}}}); "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# --- strings from `snakemake --config` ----------------------------------------------------


def test_strings_where_the_schema_wants_other_types_are_read_as_yaml():
    config = validate_config(
        {
            "models": {
                "s": {
                    "kind": "smoe",
                    "options": {"quantile": "0.5", "noise": "true", "gate_options": None},
                    "train": {"lr": "1e-3"},
                },
                "c": {"kind": "cnn", "options": {"hidden": ["2", "3"], "kernel_size": "5"}},
            },
            "train": {"lr": "0.05", "epochs": "3", "stop_at": "null", "device": "cpu"},
            "mask": {"file": "null"},
            "seeds": ["0", "1"],
            "evaluate": {"region_rtol_scale": ["0.1", "1", "1"]},
        }
    )
    assert config["train"]["lr"] == 0.05 and config["train"]["epochs"] == 3
    assert config["train"]["stop_at"] is None and config["train"]["device"] == "cpu"
    assert config["mask"]["file"] is None and config["seeds"] == [0, 1]
    assert config["models"]["s"]["options"]["quantile"] == 0.5
    assert config["models"]["s"]["options"]["noise"] is True
    assert config["models"]["s"]["train"]["lr"] == 0.001
    assert config["models"]["c"]["options"] == {"hidden": [2, 3], "kernel_size": 5}
    assert config["evaluate"]["region_rtol_scale"] == [0.1, 1, 1]
    # a string that is not a number stays one, and is named with its key
    with pytest.raises(InputError, match=r"'train\.lr': 'fast' is not of type 'number'"):
        validate_config({**ONE_MODEL, "train": {"lr": "fast"}})
    with pytest.raises(InputError, match=r"'train\.lr': -1 is less than or equal to"):
        validate_config({**ONE_MODEL, "train": {"lr": "-1"}})


# --- smoe train --spec: the same checks, on the real command line --------------------------


@pytest.fixture(scope="module")
def spec_stores(tmp_path_factory, small_mask):
    folder = tmp_path_factory.mktemp("spec")
    params = HeatParams((0.0025, 0.025, 0.25), steps=3)
    return {
        split: simulate_split(
            small_mask, params, seed, 2, folder / f"{split}.zarr", split=split, progress=False
        )
        for split, seed in (("train", 1), ("val", 2))
    }


def good_spec(kind="cnn", options=None):
    config = validate_config({"models": {"m": {"kind": kind, "options": options or {}}}})
    return model_spec(config, "m").to_dict()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"options": {"kernel_size": 2}}, r"--spec key 'options\.kernel_size': 2 is not odd"),
        ({"name": "../up"}, r"--spec key 'name': '\.\./up' is not safe"),
        ({"kind": "rnn"}, r"--spec key 'kind': unknown model kind 'rnn'"),
        ({"extra": 1}, r"--spec key 'extra': unknown key"),
        ({"train": {"lr": 0}}, r"--spec key 'train\.lr': 0 is less than or equal to"),
        ({"data": {"context": 3}}, r"--spec key 'data\.context': 3 previous frames .*steps=3"),
        (
            {"train": {"select": {"metric": "mask4-mse"}}},
            r"--spec key 'train\.select\.metric': 'mask4-mse' names region type 4",
        ),
        (
            {"kind": "smoe", "options": {"gate": "fixed", "experts": 2}},
            r"--spec key 'options\.experts': gate 'fixed' .* fewer than the map's 3",
        ),
    ],
)
def test_train_spec_is_validated_like_the_workflow(spec_stores, change, message):
    """What `smoe train --spec` runs first (tests/workflow/test_bad_config.py runs the
    command itself): the workflow's checks of a model, the store giving types and steps."""
    with pytest.raises(InputError, match=message):
        validate_spec({**good_spec(), **change}, spec_stores["train"])


def test_a_workflow_spec_passes_and_fills_nothing_new():
    spec = good_spec("smoe", {"gate": "latent", "rc_loss": True})
    assert validate_spec(spec).to_dict() == spec
    with pytest.raises(InputError, match=r"--spec must be a JSON object"):
        validate_spec([spec])


# -- the synthetic-cluster family (config section `clusters`) -----------------------------

import json  # noqa: E402

from smoe.families.clusters.config import (  # noqa: E402
    cluster_model_spec,
    cluster_models_to_run,
    cluster_setting,
    validate_cluster_spec,
)

CLUSTERS_ON = {
    "models": {"p": {"kind": "persistence"}},
    "clusters": {
        "enabled": True,
        "data": {"n_train": 100, "n_test": 100},
        "models": {
            "moe": {"kind": "cluster_moe", "options": {"experts": 4, "top_k": 2}},
            "single": {"kind": "cluster_single", "options": {"activation": "linear"}},
        },
    },
}


def clusters_with(**section) -> dict:
    config = json.loads(json.dumps(CLUSTERS_ON))
    config["clusters"].update(section)
    return config


def test_the_clusters_section_defaults_to_off_with_every_key_filled():
    clusters = validate_config(ONE_MODEL)["clusters"]
    assert clusters["enabled"] is False
    assert clusters["settings"] == ["s1"] and clusters["seeds"] == [0]
    assert clusters["data"] == {"seed": 0, "val_fraction": 0.1}  # no override of a setting
    assert clusters["train"]["epochs"] is None  # the trainer's: MoE 500, singles 800
    assert clusters["train"]["select"] == {"metric": "val_accuracy", "mode": "max"}
    assert clusters["models"] == {}


def test_shipped_configs_run_the_cluster_family_at_their_sizes(repo):
    quick = load_config(repo / "config" / "config.yaml")["clusters"]
    assert quick["enabled"] and quick["settings"] == ["s1"] and len(quick["seeds"]) == 3
    assert set(quick["models"]) == {
        "moe_nonlinear",
        "moe_linear",
        "single_nonlinear",
        "single_linear",
    }
    assert cluster_setting({"clusters": quick}, "s1").n_train == 16000
    paper = load_config(repo / "config" / "paper.yaml")["clusters"]
    assert paper["settings"] == ["s1", "s2", "s3", "s4"] and len(paper["seeds"]) == 10
    filters = sorted(
        (m["options"]["activation"], 2 * m["options"]["filters_per_class"])
        for m in paper["models"].values()
        if m["kind"] == "cluster_single"
    )
    assert filters == [(a, f) for a in ("cubic", "linear") for f in (80, 128, 512)]
    # the table (4 models x 4 settings x 10 seeds) runs; the wider singles on request
    assert cluster_models_to_run({"clusters": paper}) == [
        "moe_nonlinear",
        "moe_linear",
        "single_nonlinear_80",
        "single_linear_80",
    ]
    assert cluster_models_to_run({"clusters": quick}) == list(quick["models"])
    test = load_config(repo / "config" / "test.yaml")["clusters"]
    assert not test["enabled"]  # the heat tests and their report stay as they are
    assert cluster_setting({"clusters": test}, "s1").n_train <= 1000


def test_the_schema_names_every_setting_and_setting_field():
    from smoe.config import load_schema
    from smoe.families.clusters.data import SETTING_KEYS, SETTINGS

    section = load_schema()["properties"]["clusters"]["properties"]
    assert section["settings"]["items"]["enum"] == list(SETTINGS)
    overrides = set(section["data"]["properties"]) - {"seed", "val_fraction"}
    assert overrides == set(SETTING_KEYS) - {"setting"}


@pytest.mark.parametrize("kind", ["cluster_moe", "cluster_single"])
def test_cluster_option_schema_matches_the_builder(kind):
    """Names and defaults of the torch-free schema are the builder's (its constructors'
    signatures; a single CNN's init_scale is the builder's own default). ``classes`` is not
    an option: the data have two."""
    from smoe.families.clusters import models as cluster_models

    constructor = cluster_models.ClusterMoE if kind == "cluster_moe" else cluster_models.PatchCNN
    params = inspect.signature(constructor).parameters
    expected = {
        name: p.default
        for name, p in params.items()
        if name in cluster_models.KIND_OPTIONS[kind] and name != "classes"
    }
    if kind == "cluster_single":
        expected["init_scale"] = cluster_models.SINGLE_INIT_SCALE
    assert cluster_options.cluster_defaults(kind) == expected
    assert cluster_options.CLUSTER_MODEL_KINDS == cluster_models.CLUSTER_KINDS
    assert cluster_options.CLUSTER_ACTIVATIONS == cluster_models.ACTIVATIONS


def test_cluster_epochs_by_kind_equal_the_trainer():
    from smoe.families.clusters.task import EPOCHS

    assert cluster_options.CLUSTER_EPOCHS == EPOCHS


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"settings": ["s1", "s5"]},
            r"'clusters\.settings\[1\]': unknown setting 's5'; known settings: s1, s2, s3, s4",
        ),
        (
            {"data": {"dim": 6}},
            r"'clusters\.data\.dim': 6 dimensions cannot hold 2 x 4 orthonormal vectors .*"
            r"\(setting s1\)",
        ),
        ({"data": {"n_train": 0}}, r"'clusters\.data\.n_train': 0 is less than the minimum"),
        ({"data": {"nn": 3}}, r"unknown config key 'clusters\.data\.nn'"),
        ({"data": {"gamma": [3, 1]}}, r"'clusters\.data\.gamma': \[3, 1\] needs low <= high"),
        ({"data": {"val_fraction": 1}}, r"'clusters\.data\.val_fraction': 1 is greater than"),
        (
            {"data": {"n_train": 5}},
            r"'clusters\.data\.val_fraction': 0\.1 of 5 train samples holds out 0\.5",
        ),
        ({"settings": []}, r"'clusters\.settings': no setting is chosen"),
        ({"models": {}}, r"'clusters\.models': no models are defined"),
        (
            {"models": {"m": {"kind": "cluster_moe", "options": {"experts": 0}}}},
            r"'clusters\.models\.m\.options\.experts': 0 is less than the minimum of 1",
        ),
        (
            {"models": {"m": {"kind": "cluster_moe", "options": {"experts": 2, "top_k": 3}}}},
            r"'clusters\.models\.m\.options\.top_k': top_k=3 must be between 1 and experts=2",
        ),
        (
            {"models": {"m": {"kind": "cluster_moe", "options": {"activation": "relu"}}}},
            r"'clusters\.models\.m\.options\.activation': 'relu' is not one of",
        ),
        (
            {"models": {"m": {"kind": "cluster_single", "options": {"experts": 2}}}},
            r"'clusters\.models\.m\.options\.experts': unknown option of model kind "
            r"'cluster_single'",
        ),
        (
            {"models": {"m": {"kind": "cnn"}}},
            r"'clusters\.models\.m\.kind': unknown model kind 'cnn'; known model kinds: "
            r"cluster_moe, cluster_single",
        ),
        (
            {"models": {"m": {"kind": "cluster_moe", "train": {"lr": 0}}}},
            r"'clusters\.models\.m\.train\.lr': 0 is less than or equal to the minimum of 0",
        ),
        (
            {"models": {"m": {"kind": "cluster_single", "train": {"router_lr": 0.1}}}},
            r"'clusters\.models\.m\.train\.router_lr': a cluster_single has no router",
        ),
        (
            {"models": {"m": {"kind": "cluster_moe", "train": {"weight_decay": 0.1}}}},
            r"'clusters\.models\.m\.train\.weight_decay': a cluster_moe trains its experts",
        ),
        ({"train": {"select": {"metric": "mse"}}}, r"'clusters\.train\.select\.metric'"),
        ({"seeds": [-1]}, r"'clusters\.seeds\[0\]': -1 is less than the minimum of 0"),
        (
            {"run": ["moe", "wide"]},
            r"'clusters\.run': model 'wide' is not defined under 'clusters\.models'",
        ),
    ],
)
def test_a_bad_clusters_section_is_refused_naming_the_key(change, message):
    with pytest.raises(InputError, match=message):
        validate_config(clusters_with(**change))


def test_a_disabled_clusters_section_is_still_checked():
    config = clusters_with(enabled=False, data={"dim": 6})
    with pytest.raises(InputError, match=r"'clusters\.data\.dim'"):
        validate_config(config)
    assert validate_config(clusters_with(enabled=False, models={}))["clusters"]["models"] == {}


def test_cluster_spec_keys_each_kind_only_what_it_takes():
    config = validate_config(clusters_with(train={"router_lr": 0.2, "weight_decay": 0.01}))
    moe, single = (cluster_model_spec(config, name) for name in ("moe", "single"))
    assert (moe.train["router_lr"], moe.train["weight_decay"]) == (0.2, None)
    assert (single.train["router_lr"], single.train["weight_decay"]) == (None, 0.01)
    assert moe.data == {"val_fraction": 0.1} and moe.evaluate == {}
    assert moe.options == {"experts": 4, "top_k": 2}


def test_a_cluster_spec_passes_its_own_check_and_the_trainer_unchanged():
    from smoe.families.clusters.task import resolve_cluster_spec

    config = validate_config(CLUSTERS_ON)
    for name in ("moe", "single"):
        spec = cluster_model_spec(config, name)
        assert validate_cluster_spec(json.loads(spec.to_json())) == spec
        resolved = resolve_cluster_spec(spec)
        assert resolved.options == spec.options and resolved.data == spec.data


@pytest.mark.parametrize(
    "change, message",
    [
        ({"options": {"top_k": 9}}, r"--spec key 'options\.top_k': top_k=9 must be between"),
        ({"kind": "cnn"}, r"--spec key 'kind': unknown model kind 'cnn'"),
        ({"train": {"epochs": 0}}, r"--spec key 'train\.epochs': 0 is less than the minimum"),
        ({"data": {"val_fraction": 0}}, r"--spec key 'data\.val_fraction'"),
        ({"evaluate": {"x": 1}}, r"--spec key 'evaluate\.x'"),
        ({"extra": 1}, r"--spec key 'extra': unknown key"),
    ],
)
def test_cluster_train_spec_is_validated_like_the_workflow(change, message):
    spec = json.loads(cluster_model_spec(validate_config(CLUSTERS_ON), "moe").to_json())
    with pytest.raises(InputError, match=message):
        validate_cluster_spec({**spec, **change})


def test_nested_cluster_values_given_as_strings_are_read_as_yaml():
    """`snakemake --config 'clusters={enabled: true, ...}'` hands nested values as strings."""
    config = clusters_with(enabled="true", seeds=["1", "2"], data={"n_train": "100"})
    clusters = validate_config(config)["clusters"]
    assert clusters["enabled"] is True and clusters["seeds"] == [1, 2]
    assert clusters["data"]["n_train"] == 100
