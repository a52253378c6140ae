"""Paths, targets and job parameters computed from the validated config.

Rules stay declarative: every value they need comes from a function here, so rules hold no
lambdas and the config is read in one place.
"""

import functools
import json
import os
import re
import shlex
import sys

sys.path.insert(0, workflow.basedir)  # the smoe package beside the Snakefile

from smoe.config import validate_config
from smoe.core.config import gpu_check_mode
from smoe.core.errors import InputError
from smoe.families.clusters.config import (
    CLUSTER_SPLITS,
    cluster_data_overrides,
    cluster_models_to_run,
    cluster_model_spec,
    cluster_setting,
)
from smoe.families.clusters.options import CLUSTER_EPOCHS, cluster_defaults
from smoe.families.gated.config import (
    gated_dependencies,
    gated_model_spec,
    gated_models_to_run,
    gated_source_files,
)
from smoe.families.heat.choices import chunk_runs, task_runs
from smoe.families.heat.config import SPLITS, Config, model_spec, models_to_run
from smoe.families.heat.stale import stale_outputs


def _executor():
    """The executor this run targets: --executor, or a profile's `executor:` (None when
    Snakemake runs through its Python API).

    Snakemake 9 sets workflow.executor_plugin only after the Snakefile is parsed (and to
    the dry-run executor under -n), so the command line Snakemake parsed, profiles
    included, is read from the frame of snakemake.cli.args_to_api, which parses this file.
    """
    frame = sys._getframe()
    while frame is not None:
        code = frame.f_code
        if code.co_name == "args_to_api" and code.co_filename.endswith(
            os.path.join("snakemake", "cli.py")
        ):
            return getattr(frame.f_locals.get("args"), "executor", None)
        frame = frame.f_back
    return None


def _gpu_check(executor):
    """train.device: cuda without a GPU here is an error for a local run, a warning when
    the executor sends jobs elsewhere, and not checked again inside a job (the main
    process checked). SMOE_GPU_CHECK=local|cluster|skip overrides."""
    if workflow.exec_mode.name != "DEFAULT":
        return "skip"
    if executor in (None, "local", "dryrun", "touch"):
        return gpu_check_mode("local")
    try:
        from snakemake_interface_executor_plugins.registry import ExecutorPluginRegistry

        plugin = ExecutorPluginRegistry().get_plugin(executor)
        local = not plugin.common_settings.non_local_exec
    except Exception:  # an unknown plugin: Snakemake itself refuses it after parsing
        local = False
    return gpu_check_mode("local" if local else "cluster")


# A refused config ends the run here, before any job is planned, with one message per bad
# key and no traceback: exiting is what keeps Snakemake from printing one.
try:
    _executor_name = _executor()
    _validated = validate_config(
        config,
        gpu=_gpu_check(_executor_name),
        executor=_executor_name,
        warn=lambda message: logger.warning(f"warning: {message}"),
    )
except InputError as _error:
    logger.error(str(_error))
    raise SystemExit(1) from None
config.clear()
config.update(_validated)
CFG = Config.from_dict(config)

# Checked by the process that plans the run; a job's own Snakemake (a cluster job re-reads
# the workflow) skips it: the planner has checked, and a job must not trip over a store
# another job is rewriting.
_stale = stale_outputs(config) if workflow.exec_mode.name == "DEFAULT" else []
if _stale:
    raise WorkflowError(
        "outputs on disk no longer match how they were made:\n  " + "\n  ".join(_stale)
    )
RESULTS = str(CFG.results)
SMOE_ENV = "../../envs/smoe.yaml"

# Report categories, named plainly; the report menu sorts them alphabetically, which is
# also the order a reader wants: what went in, what came out, how training went, and what
# produced it. Each experiment family is a subcategory.
DATA_CATEGORY = "Data"
RESULTS_CATEGORY = "Results"
DIAGNOSTICS_CATEGORY = "Training diagnostics"
PROVENANCE_CATEGORY = "Versions and configuration"
FAMILY = "Heat diffusion (SMoE)"
CLUSTERS_FAMILY = "Synthetic clusters (Chen et al. 2022)"
GATED_FAMILY = "Gated modular MoE (Krishnamurthy et al. 2023)"


MODELS = models_to_run(config)
SEEDS = [str(seed) for seed in config["seeds"]]


wildcard_constraints:
    split="|".join(SPLITS),
    model="|".join(map(re.escape, config["models"])) or "no-models",
    seed=r"\d+",


def mask_file():
    return f"{RESULTS}/data/mask.npy"


def store_file(split):
    return f"{RESULTS}/data/heat/{split}.zarr"


def netcdf_file(split):
    return f"{RESULTS}/data/heat/{split}.nc"


def data_targets():
    """The mask, its picture and every split (plus netCDF copies when asked for)."""
    targets = [mask_file(), f"{RESULTS}/data/mask.png"]
    targets += [store_file(split) for split in SPLITS]
    if CFG.export_netcdf:
        targets += [netcdf_file(split) for split in SPLITS]
    return targets


def metrics_targets():
    """One test-metrics JSON per model x seed."""
    return [
        f"{RESULTS}/metrics/{model}/seed{seed}.json"
        for model in MODELS
        for seed in SEEDS
    ]


def smoe_models():
    return [m for m in MODELS if config["models"][m]["kind"] == "smoe"]


def smoe_metrics_targets():
    """Metrics of the SMoE models only: the routing and kernel figures need their routing."""
    return [
        f"{RESULTS}/metrics/{model}/seed{seed}.json"
        for model in smoe_models()
        for seed in SEEDS
    ]


def smoe_history_targets():
    """Training histories of the SMoE models: their routing dynamics per epoch."""
    return [
        f"{RESULTS}/models/{model}/seed{seed}/history.csv"
        for model in smoe_models()
        for seed in SEEDS
    ]


def first_seed_predictions():
    """Every model's test predictions for the first seed: one sample, all models side by side."""
    return [f"{RESULTS}/predictions/{model}/seed{SEEDS[0]}.nc" for model in MODELS]


def history_targets():
    return [
        f"{RESULTS}/models/{model}/seed{seed}/history.csv"
        for model in MODELS
        for seed in SEEDS
    ]


def kernel_models():
    """SMoE models whose experts are 3x3: only their kernels compare with the stencils."""
    return [
        m
        for m in smoe_models()
        if (config["models"][m].get("options") or {}).get("kernel_size", 3) == 3
    ]


def kernel_metrics_targets():
    """Metrics of the SMoE models the kernels figure compares with the stencils."""
    return [
        f"{RESULTS}/metrics/{model}/seed{seed}.json"
        for model in kernel_models()
        for seed in SEEDS
    ]


def report_targets():
    """Tables and figures; the SMoE figures only when the config has an SMoE model."""
    if not MODELS:
        return []
    figures = ["predictions", "learning_curves", "metric_bars"]
    if smoe_models():
        figures += ["routing", "smoe_dynamics", "expert_regions"]
        if kernel_models():
            figures += ["kernels"]
    targets = [f"{RESULTS}/tables/summary.csv", f"{RESULTS}/tables/summary.html"]
    for name in figures:
        targets += [f"{RESULTS}/figures/{name}.png", f"{RESULTS}/figures/{name}.svg"]
    return targets


def provenance_inputs():
    """The tables of every enabled family: the provenance page is rebuilt after any of
    them changes, so it always describes the run that made them."""
    tables = [f"{RESULTS}/tables/summary.csv"] if MODELS else []
    if config["clusters"]["enabled"] and CLUSTER_SETTINGS and CLUSTER_MODELS:
        tables.append(CLUSTER_TABLES["csv"])
    if config["gated"]["enabled"] and GATED_MODELS:
        tables.append(GATED_TABLES["csv"])
    return tables


def all_targets():
    """Data -> train -> evaluate -> aggregate -> figures, for every enabled family, and
    the page saying which config and software made them."""
    targets = []
    if MODELS:  # `models: {}` with another family enabled runs that family alone
        targets += data_targets() + metrics_targets() + report_targets()
    if config["clusters"]["enabled"]:
        targets += cluster_targets()
    if config["gated"]["enabled"]:
        targets += gated_targets()
    if provenance_inputs():
        targets.append(f"{RESULTS}/report/provenance.html")
    return targets


def resolved_config_json():
    """The validated config (defaults filled in) as JSON, for the report's provenance page;
    as a rule parameter it also makes that page rebuild whenever the config changes."""
    return json.dumps(config, sort_keys=False)


def output_folder(wildcards, output):
    """The folder of a rule's first output, for commands that take an output folder."""
    return os.path.dirname(output[0])


def model_dir(wildcards):
    return f"{RESULTS}/models/{wildcards.model}/seed{wildcards.seed}"


def spec_without_processes(spec):
    """A spec's JSON without train.processes: the number of processes changes no result
    (tests/train/test_multiprocess_training.py), so changing it retrains nothing; it reaches
    the job as a resource (`--processes`)."""
    data = spec.to_dict()
    data["train"] = {k: v for k, v in data["train"].items() if k != "processes"}
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def model_spec_json(wildcards):
    """The model's resolved spec: a change to it (and only to it) retrains the model."""
    return spec_without_processes(model_spec(config, wildcards.model))


def train_processes(wildcards):
    """Processes of a training job (train.processes; torchrun when more than one)."""
    return model_spec(config, wildcards.model).train["processes"]


def train_threads(wildcards):
    """Cores of a training job: the model's train.threads, else compute.threads.

    One thread per job lets two small models train side by side on a 2-core machine, which
    beats one job using both cores for models this small.
    """
    train = model_spec(config, wildcards.model).train
    return (train["threads"] or CFG.threads) * train["processes"]


def train_gpus(wildcards):
    """GPUs a training or evaluation job asks for: only when its config sends it to CUDA,
    train.gpus for each of its processes."""
    train = model_spec(config, wildcards.model).train
    return train["gpus"] * train["processes"] if train["device"] == "cuda" else 0


def evaluate_device(wildcards):
    """Evaluation runs where training ran (train.device: auto, cpu or cuda)."""
    return model_spec(config, wildcards.model).train["device"]


def train_mem_mb(wildcards):
    """The train split in memory (eager loading) twice over, plus the framework."""
    height, width = _grid_shape()
    train = CFG.splits["train"]
    field_mb = train.runs * (CFG.heat.steps + 1) * height * width * 4 / 2**20
    return int(2000 + 2 * field_mb)


def train_runtime(wildcards):
    """Cluster time limit in minutes, from the epoch budget and the train split's size."""
    height, width = _grid_shape()
    spec = model_spec(config, wildcards.model)
    samples = CFG.splits["train"].runs * CFG.heat.steps * height * width
    return max(30, int(spec.train["epochs"] * samples / 4e6 / 60) + 30)


def mask_inputs(wildcards):
    return [CFG.mask.file] if CFG.mask.file else []


def mask_args(wildcards):
    """Options of `smoe mask`: copy and check a given map, or generate one."""
    m = CFG.mask
    if m.file:
        return f"--from '{m.file}' --types {m.types}"
    return f"--height {m.height} --width {m.width} --types {m.types} --seed {m.seed}"


def simulate_args(wildcards):
    """Options of `smoe simulate` for one split, straight from the config."""
    heat = CFG.heat
    split = CFG.splits[wildcards.split]
    args = [
        f"--split {wildcards.split}",
        f"--runs {split.runs}",
        f"--seed {split.seed}",
        f"--steps {heat.steps}",
        "--diffusivity " + " ".join(repr(a) for a in heat.diffusivity),
        f"--boundary {heat.boundary}",
        f"--init {heat.init}",
        f"--compression {CFG.compression}",
    ]
    if heat.init_ranges:
        args += [f"--init-range {low!r} {high!r}" for low, high in heat.init_ranges]
    if heat.negative_sources:
        args.append("--negative-sources")
    if heat.heat_rate:
        args.append(f"--heat-rate {heat.heat_rate}")
    if heat.clip:
        args.append(f"--clip {heat.clip[0]!r} {heat.clip[1]!r}")
    if CFG.runs_per_chunk:
        args.append(f"--runs-per-chunk {CFG.runs_per_chunk}")
    return " ".join(args)


@functools.cache
def _grid_shape():
    """The grid's shape; read once, since every job's resources ask for it."""
    if CFG.mask.file:
        from smoe.families.heat.mask import load_mask

        return load_mask(CFG.mask.file).shape
    return (CFG.mask.height, CFG.mask.width)


def simulate_mem_mb(wildcards, threads):
    """Memory of one simulation job: a block of frames per worker, plus headroom."""
    runs = CFG.splits[wildcards.split].runs
    height, width = _grid_shape()
    run_mb = (CFG.heat.steps + 1) * height * width * 4 / 2**20
    per_chunk = min(
        CFG.runs_per_chunk or chunk_runs(CFG.heat.steps, height, width), runs
    )
    return int(500 + 2.5 * threads * task_runs(runs, per_chunk, threads) * run_mb)


def simulate_runtime(wildcards):
    """Cluster time limit in minutes: ten times a slow core's pace of 4e8 updates a minute."""
    height, width = _grid_shape()
    updates = CFG.splits[wildcards.split].runs * CFG.heat.steps * height * width
    return max(10, int(10 * updates / 4e8))


# -- the synthetic-cluster family (Chen et al. 2022): results/clusters/ ---------------------
# `clusters.enabled` puts the family into `rule all`; the named targets `clusters` and
# `clusters_table` build it from its section either way.

CLUSTERS = config["clusters"]
CLUSTER_DIR = f"{RESULTS}/clusters"
CLUSTER_SETTINGS = list(CLUSTERS["settings"])
CLUSTER_MODELS = cluster_models_to_run(config)
CLUSTER_SEEDS = [str(seed) for seed in CLUSTERS["seeds"]]
CLUSTER_TABLES = {
    "csv": f"{CLUSTER_DIR}/table.csv",
    "markdown": f"{CLUSTER_DIR}/table.md",
    "html": f"{CLUSTER_DIR}/table.html",
}
CLUSTER_WILDCARDS = {
    "setting": "|".join(CLUSTER_SETTINGS) or "no-settings",
    "split": "|".join(CLUSTER_SPLITS),
    "model": "|".join(map(re.escape, CLUSTER_MODELS)) or "no-models",
}


def cluster_store(setting, split):
    return f"{CLUSTER_DIR}/data/{setting}/{split}.zarr"


def cluster_data_targets():
    return [
        cluster_store(setting, split)
        for setting in CLUSTER_SETTINGS
        for split in CLUSTER_SPLITS
    ]


def _cluster_metrics(models):
    return [
        f"{CLUSTER_DIR}/metrics/{setting}/{model}/seed{seed}.json"
        for setting in CLUSTER_SETTINGS
        for model in models
        for seed in CLUSTER_SEEDS
    ]


def cluster_metrics_targets():
    """One test-metrics JSON per setting x model x seed."""
    return _cluster_metrics(CLUSTER_MODELS)


def cluster_moe_models():
    return [m for m in CLUSTER_MODELS if CLUSTERS["models"][m]["kind"] == "cluster_moe"]


def cluster_moe_metrics_targets():
    """Metrics of the MoE models only: the dispatch figure needs their routing."""
    return _cluster_metrics(cluster_moe_models())


def cluster_figure_targets():
    """The dispatch figure (when an MoE is configured) and one projection per setting."""
    names = ["dispatch"] if cluster_moe_models() else []
    names += [f"projection_{setting}" for setting in CLUSTER_SETTINGS]
    return [
        f"{CLUSTER_DIR}/figures/{name}.{fmt}"
        for name in names
        for fmt in ("png", "svg")
    ]


def cluster_targets():
    """Stores -> trained models -> metrics -> table and figures of the cluster family."""
    if not (CLUSTER_SETTINGS and CLUSTER_MODELS):
        return []
    return (
        cluster_data_targets()
        + cluster_metrics_targets()
        + list(CLUSTER_TABLES.values())
        + cluster_figure_targets()
    )


def cluster_table_inputs():
    """The table target: nothing when the section has no setting or no model."""
    return [CLUSTER_TABLES["csv"]] if CLUSTER_SETTINGS and CLUSTER_MODELS else []


def cluster_data_args(wildcards):
    """Options of `smoe cluster-data` for one setting: its name, the data seed and every
    override of clusters.data (each value as YAML, quoted for the shell)."""
    args = [f"--setting {wildcards.setting}", f"--seed {CLUSTERS['data']['seed']}"]
    for key, value in cluster_data_overrides(config).items():
        args.append(f"--set {shlex.quote(f'{key}={json.dumps(value)}')}")
    return " ".join(args)


def _cluster_sizes(setting):
    """(samples, values per sample) of a setting's train split."""
    s = cluster_setting(config, setting)
    return s.n_train, s.patches * s.dim


def cluster_data_mem_mb(wildcards):
    """One split generated in float64, about four copies of it, plus the framework."""
    s = cluster_setting(config, wildcards.setting)
    samples = s.samples(wildcards.split)
    return int(1000 + 4 * samples * s.patches * s.dim * 8 / 2**20)


def cluster_seed_outputs(kind, name=None):
    """One output per seed of a (setting, model) job: ``models/.../seed<k>/<name>`` or
    ``metrics/.../seed<k>.json``."""
    base = f"{CLUSTER_DIR}/{kind}/{{setting}}/{{model}}"
    if kind == "metrics":
        return [f"{base}/seed{seed}.json" for seed in CLUSTER_SEEDS]
    return [f"{base}/seed{seed}/{name}" for seed in CLUSTER_SEEDS]


def cluster_model_dir(wildcards):
    return f"{CLUSTER_DIR}/models/{wildcards.setting}/{wildcards.model}"


def cluster_metrics_dir(wildcards):
    return f"{CLUSTER_DIR}/metrics/{wildcards.setting}/{wildcards.model}"


def cluster_spec_json(wildcards):
    """The model's resolved spec: a change to it (and only to it) retrains the model."""
    return cluster_model_spec(config, wildcards.model).to_json()


def cluster_train_threads(wildcards):
    return cluster_model_spec(config, wildcards.model).train["threads"]


def cluster_train_gpus(wildcards):
    """A GPU only when the model's config sends it to CUDA."""
    device = cluster_model_spec(config, wildcards.model).train["device"]
    return 1 if device == "cuda" else 0


def cluster_train_mem_mb(wildcards):
    """The train split (full batch) and its activations several times over, plus PyTorch."""
    samples, values = _cluster_sizes(wildcards.setting)
    return int(2000 + 16 * samples * values * 4 / 2**20)


def cluster_train_runtime(wildcards):
    """Cluster time limit in minutes, from the epochs, the split's size and the filters
    (all experts counted), at a slow core's 1e9 multiply-adds a second, times ten."""
    samples, values = _cluster_sizes(wildcards.setting)
    spec = cluster_model_spec(config, wildcards.model)
    options = {**cluster_defaults(spec.kind), **spec.options}
    filters = 2 * options.get("filters_per_class", 8) * options.get("experts", 1)
    epochs = spec.train["epochs"] or CLUSTER_EPOCHS[spec.kind]
    work = 3 * epochs * samples * values * filters * len(CLUSTER_SEEDS)
    return max(30, int(10 * work / 1e9 / 60) + 30)


# -- the gated modular MoE family (Krishnamurthy et al. 2023): results/gated/ ---------------
# `gated.enabled` puts the family into `rule all`; the named targets `gated` and
# `gated_table` build it from its section either way.

GATED = config["gated"]
GATED_DIR = f"{RESULTS}/gated"
GATED_MODELS = gated_models_to_run(config)
GATED_SEEDS = [str(seed) for seed in GATED["seeds"]]
GATED_TABLES = {
    "csv": f"{GATED_DIR}/table.csv",
    "markdown": f"{GATED_DIR}/table.md",
    "html": f"{GATED_DIR}/table.html",
}
GATED_WILDCARDS = {
    "split": "train|val|test",
    "model": "|".join(map(re.escape, GATED["models"])) or "no-models",
}


def gated_store(split):
    return f"{GATED_DIR}/data/{split}.zarr"


def _gated_metrics(models):
    return [
        f"{GATED_DIR}/metrics/{model}/seed{seed}.json"
        for model in models
        for seed in GATED_SEEDS
    ]


def gated_metrics_targets():
    """One test-metrics JSON per model x seed."""
    return _gated_metrics(GATED_MODELS)


def gated_moe_metrics_targets():
    """Metrics of the mixtures only (gated_moe, gated_distilled): the routing figure."""
    kinds = ("gated_moe", "gated_distilled")
    return _gated_metrics(
        [m for m in GATED_MODELS if GATED["models"][m]["kind"] in kinds]
    )


def gated_figure_targets():
    names = ["accuracy_usage"] + (["routing"] if gated_moe_metrics_targets() else [])
    return [
        f"{GATED_DIR}/figures/{name}.{fmt}" for name in names for fmt in ("png", "svg")
    ]


def gated_targets():
    """Stores -> trained models -> metrics -> table and figures of the gated family."""
    if not GATED_MODELS:
        return []
    return (
        [gated_store(split) for split in ("train", "val", "test")]
        + gated_metrics_targets()
        + list(GATED_TABLES.values())
        + gated_figure_targets()
    )


def gated_table_inputs():
    """The table target: nothing when the section has no model."""
    return [GATED_TABLES["csv"]] if GATED_MODELS else []


def gated_source_inputs(wildcards):
    """The data set's files (MNIST IDX, CIFAR batches): editing them rebuilds the stores."""
    return [str(path) for path in gated_source_files(config)]


def gated_data_args(wildcards):
    data = GATED["data"]
    args = [f"--dataset {data['dataset']}", f"--seed {data['seed']}"]
    if data["val_fraction"] is not None:  # else the data set's own default
        args.append(f"--val-fraction {data['val_fraction']}")
    if data["folder"] is not None:
        args.append(f"--folder {shlex.quote(str(data['folder']))}")
    return " ".join(args)


def gated_seed_outputs(kind, name=None):
    """One output per seed of a model's job: ``models/<model>/seed<k>/<name>`` or
    ``metrics/<model>/seed<k>.json``."""
    base = f"{GATED_DIR}/{kind}/{{model}}"
    if kind == "metrics":
        return [f"{base}/seed{seed}.json" for seed in GATED_SEEDS]
    return [f"{base}/seed{seed}/{name}" for seed in GATED_SEEDS]


def gated_dependency_inputs(wildcards):
    """Every seed's best.pt of the models this one builds on (teacher, feature network)."""
    return [
        f"{GATED_DIR}/models/{other}/seed{seed}/best.pt"
        for other in gated_dependencies(config, wildcards.model).values()
        for seed in GATED_SEEDS
    ]


def gated_dependency_args(wildcards):
    needs = gated_dependencies(config, wildcards.model)
    return " ".join(
        f"--{role}-dir {GATED_DIR}/models/{other}" for role, other in needs.items()
    )


def gated_model_dir(wildcards):
    return f"{GATED_DIR}/models/{wildcards.model}"


def gated_metrics_dir(wildcards):
    return f"{GATED_DIR}/metrics/{wildcards.model}"


def gated_spec_json(wildcards):
    """The model's spec: a change to it (and only to it) retrains the model."""
    return spec_without_processes(gated_model_spec(config, wildcards.model))


def gated_train_processes(wildcards):
    return gated_model_spec(config, wildcards.model).train["processes"]


def gated_train_threads(wildcards):
    train = gated_model_spec(config, wildcards.model).train
    return train["threads"] * train["processes"]


def gated_train_gpus(wildcards):
    """A GPU per process only when the model's config sends it to CUDA."""
    train = gated_model_spec(config, wildcards.model).train
    return train["processes"] if train["device"] == "cuda" else 0


def _gated_train_images():
    """Train images and values per image of the configured data set."""
    sizes = {
        "mnist5k": (4000, 784),
        "digits": (1438, 64),
        "mnist": (60000, 784),
        "fashion-mnist": (60000, 784),
        "cifar10": (50000, 3072),
    }
    return sizes[GATED["data"]["dataset"]]


def gated_train_mem_mb(wildcards):
    """The train split as float32 a few times over, plus PyTorch."""
    images, values = _gated_train_images()
    return int(2000 + 4 * images * values * 4 / 2**20)


def gated_train_runtime(wildcards):
    """Cluster time limit in minutes: per seed, epochs x images at a slow core's 2,000
    images a second for a 10-expert MoE on MNIST-sized inputs, times three, plus 30."""
    images, values = _gated_train_images()
    spec = gated_model_spec(config, wildcards.model)
    seconds = spec.train["epochs"] * images * values / 784 / 2000 * len(GATED_SEEDS)
    return max(30, int(3 * seconds / 60) + 30)
