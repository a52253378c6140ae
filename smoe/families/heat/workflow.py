"""What the heat family's rules (``workflow/rules/heat.smk``) compute from the config:
output paths and targets, each job's arguments, threads, GPUs, memory and time limit.
Plain Python, so tests can check it without Snakemake."""

from __future__ import annotations

from typing import Any

from smoe.core.config import spec_without_processes
from smoe.core.workflow import store_head
from smoe.families.heat.choices import chunk_runs, task_runs
from smoe.families.heat.config import SPLITS, Config, model_spec, models_to_run


class HeatRules:
    """Paths, targets, job arguments and resources of the heat family's rules, from a
    validated config: the rule files stay declarative (no lambdas, the config read here)."""

    def __init__(self, config: dict[str, Any], results: str) -> None:
        self.config = config
        self.RESULTS = results
        self.CFG = Config.from_dict(config)
        self._shape = None

        self.MODELS = models_to_run(self.config)

        self.SEEDS = [str(seed) for seed in self.config["seeds"]]

    def mask_file(self):
        return f"{self.RESULTS}/data/mask.npy"

    def store_folder(self, split):
        return f"{self.RESULTS}/data/heat/{split}.zarr"

    def store_file(self, split):
        """The file the rules declare for a store (see store_head)."""
        return store_head(self.store_folder(split))

    def netcdf_file(self, split):
        return f"{self.RESULTS}/data/heat/{split}.nc"

    def data_targets(self):
        """The mask, its picture and every split (plus netCDF copies when asked for)."""
        targets = [self.mask_file(), f"{self.RESULTS}/data/mask.png"]
        targets += [self.store_file(split) for split in SPLITS]
        if self.CFG.export_netcdf:
            targets += [self.netcdf_file(split) for split in SPLITS]
        return targets

    def metrics_targets(self):
        """One test-metrics JSON per model x seed."""
        return [
            f"{self.RESULTS}/metrics/{model}/seed{seed}.json"
            for model in self.MODELS
            for seed in self.SEEDS
        ]

    def smoe_models(self):
        return [m for m in self.MODELS if self.config["models"][m]["kind"] == "smoe"]

    def smoe_metrics_targets(self):
        """Metrics of the SMoE models only: the routing and kernel figures need their routing."""
        return [
            f"{self.RESULTS}/metrics/{model}/seed{seed}.json"
            for model in self.smoe_models()
            for seed in self.SEEDS
        ]

    def smoe_history_targets(self):
        """Training histories of the SMoE models: their routing dynamics per epoch."""
        return [
            f"{self.RESULTS}/models/{model}/seed{seed}/history.csv"
            for model in self.smoe_models()
            for seed in self.SEEDS
        ]

    def first_seed_predictions(self):
        """Every model's test predictions for the first seed: one sample, all models side
        by side."""
        return [
            f"{self.RESULTS}/predictions/{model}/seed{self.SEEDS[0]}.nc" for model in self.MODELS
        ]

    def history_targets(self):
        return [
            f"{self.RESULTS}/models/{model}/seed{seed}/history.csv"
            for model in self.MODELS
            for seed in self.SEEDS
        ]

    def kernel_models(self):
        """SMoE models whose experts are 3x3: only their kernels compare with the stencils."""
        return [
            m
            for m in self.smoe_models()
            if (self.config["models"][m].get("options") or {}).get("kernel_size", 3) == 3
        ]

    def kernel_metrics_targets(self):
        """Metrics of the SMoE models the kernels figure compares with the stencils."""
        return [
            f"{self.RESULTS}/metrics/{model}/seed{seed}.json"
            for model in self.kernel_models()
            for seed in self.SEEDS
        ]

    def report_targets(self):
        """Tables and figures; the SMoE figures only when the self.config has an SMoE model."""
        if not self.MODELS:
            return []
        figures = ["predictions", "learning_curves", "metric_bars"]
        if self.smoe_models():
            figures += ["routing", "smoe_dynamics", "expert_regions"]
            if self.kernel_models():
                figures += ["kernels"]
        targets = [f"{self.RESULTS}/tables/summary.csv", f"{self.RESULTS}/tables/summary.html"]
        for name in figures:
            targets += [f"{self.RESULTS}/figures/{name}.png", f"{self.RESULTS}/figures/{name}.svg"]
        return targets

    def model_dir(self, wildcards):
        return f"{self.RESULTS}/models/{wildcards.model}/seed{wildcards.seed}"

    def model_spec_json(self, wildcards):
        """The model's resolved spec: a change to it (and only to it) retrains the model."""
        return spec_without_processes(model_spec(self.config, wildcards.model))

    def train_processes(self, wildcards):
        """Processes of a training job (train.processes; torchrun when more than one)."""
        return model_spec(self.config, wildcards.model).train["processes"]

    def train_threads(self, wildcards):
        """Cores of a training job: the model's train.threads, else compute.threads.

        One thread per job lets two small models train side by side on a 2-core machine, which
        beats one job using both cores for models this small.
        """
        train = model_spec(self.config, wildcards.model).train
        return (train["threads"] or self.CFG.threads) * train["processes"]

    def train_gpus(self, wildcards):
        """GPUs a training or evaluation job asks for: only when its self.config sends it to CUDA,
        train.gpus for each of its processes."""
        train = model_spec(self.config, wildcards.model).train
        return train["gpus"] * train["processes"] if train["device"] == "cuda" else 0

    def evaluate_device(self, wildcards):
        """Evaluation runs where training ran (train.device: auto, cpu or cuda)."""
        return model_spec(self.config, wildcards.model).train["device"]

    def train_mem_mb(self, wildcards):
        """The train split in memory (eager loading) twice over, plus the framework."""
        height, width = self._grid_shape()
        train = self.CFG.splits["train"]
        field_mb = train.runs * (self.CFG.heat.steps + 1) * height * width * 4 / 2**20
        return int(2000 + 2 * field_mb)

    def train_runtime(self, wildcards):
        """Cluster time limit in minutes, from the epoch budget and the train split's size."""
        height, width = self._grid_shape()
        spec = model_spec(self.config, wildcards.model)
        samples = self.CFG.splits["train"].runs * self.CFG.heat.steps * height * width
        return max(30, int(spec.train["epochs"] * samples / 4e6 / 60) + 30)

    def mask_inputs(self, wildcards):
        return [self.CFG.mask.file] if self.CFG.mask.file else []

    def mask_args(self, wildcards):
        """Options of `smoe mask`: copy and check a given map, or generate one."""
        m = self.CFG.mask
        if m.file:
            return f"--from '{m.file}' --types {m.types}"
        return f"--height {m.height} --width {m.width} --types {m.types} --seed {m.seed}"

    def simulate_args(self, wildcards):
        """Options of `smoe simulate` for one split, straight from the config."""
        heat = self.CFG.heat
        split = self.CFG.splits[wildcards.split]
        args = [
            f"--split {wildcards.split}",
            f"--runs {split.runs}",
            f"--seed {split.seed}",
            f"--steps {heat.steps}",
            "--diffusivity " + " ".join(repr(a) for a in heat.diffusivity),
            f"--boundary {heat.boundary}",
            f"--init {heat.init}",
            f"--compression {self.CFG.compression}",
        ]
        if heat.init_ranges:
            args += [f"--init-range {low!r} {high!r}" for low, high in heat.init_ranges]
        if heat.negative_sources:
            args.append("--negative-sources")
        if heat.heat_rate:
            args.append(f"--heat-rate {heat.heat_rate}")
        if heat.clip:
            args.append(f"--clip {heat.clip[0]!r} {heat.clip[1]!r}")
        if self.CFG.runs_per_chunk:
            args.append(f"--runs-per-chunk {self.CFG.runs_per_chunk}")
        return " ".join(args)

    def _grid_shape(self):
        """The grid's shape; read once, since every job's resources ask for it."""
        if self._shape is None:
            if self.CFG.mask.file:
                from smoe.families.heat.mask import load_mask

                self._shape = load_mask(self.CFG.mask.file).shape
            else:
                self._shape = (self.CFG.mask.height, self.CFG.mask.width)
        return self._shape

    def simulate_mem_mb(self, wildcards, threads):
        """Memory of one simulation job: a block of frames per worker, plus headroom."""
        runs = self.CFG.splits[wildcards.split].runs
        height, width = self._grid_shape()
        run_mb = (self.CFG.heat.steps + 1) * height * width * 4 / 2**20
        per_chunk = min(
            self.CFG.runs_per_chunk or chunk_runs(self.CFG.heat.steps, height, width), runs
        )
        return int(500 + 2.5 * threads * task_runs(runs, per_chunk, threads) * run_mb)

    def simulate_runtime(self, wildcards):
        """Cluster time limit in minutes: ten times a slow core's pace of 4e8 updates a minute."""
        height, width = self._grid_shape()
        updates = self.CFG.splits[wildcards.split].runs * self.CFG.heat.steps * height * width
        return max(10, int(10 * updates / 4e8))

    def targets(self):
        """Data -> train -> evaluate -> tables and figures (``models: {}`` with another
        family enabled runs that family alone)."""
        if not self.MODELS:
            return []
        return self.data_targets() + self.metrics_targets() + self.report_targets()

    def tables(self):
        """The tables the provenance page is rebuilt after."""
        return [f"{self.RESULTS}/tables/summary.csv"] if self.MODELS else []
