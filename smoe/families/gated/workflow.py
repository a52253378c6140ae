"""What the gated family's rules (``workflow/rules/gated.smk``) compute from the config:
output paths and targets, each job's arguments and resources. `gated.enabled` puts the
family into `rule all`; the named targets `gated` and `gated_table` build it from its
section either way."""

from __future__ import annotations

import re
import shlex
from typing import Any

from smoe.core.config import spec_without_processes
from smoe.core.workflow import store_head
from smoe.families.gated.config import (
    gated_dependencies,
    gated_model_spec,
    gated_models_to_run,
    gated_source_files,
)
from smoe.families.gated.source_check import source_problem


class GatedRules:
    """Paths, targets, job arguments and resources of the gated family's rules, from a
    validated config."""

    def __init__(self, config: dict[str, Any], results: str) -> None:
        self.config = config
        self.RESULTS = results

        self.GATED = self.config["gated"]

        self.GATED_DIR = f"{self.RESULTS}/gated"

        self.GATED_MODELS = gated_models_to_run(self.config)

        self.GATED_SEEDS = [str(seed) for seed in self.GATED["seeds"]]

        self.GATED_TABLES = {
            "csv": f"{self.GATED_DIR}/table.csv",
            "markdown": f"{self.GATED_DIR}/table.md",
            "html": f"{self.GATED_DIR}/table.html",
        }

        self.GATED_WILDCARDS = {
            "split": "train|val|test",
            "model": "|".join(map(re.escape, self.GATED["models"])) or "no-models",
        }

    def gated_store_folder(self, split):
        return f"{self.GATED_DIR}/data/{split}.zarr"

    def gated_store(self, split):
        """The file the rules declare for a store (see store_head)."""
        return store_head(self.gated_store_folder(split))

    def _gated_metrics(self, models):
        return [
            f"{self.GATED_DIR}/metrics/{model}/seed{seed}.json"
            for model in models
            for seed in self.GATED_SEEDS
        ]

    def gated_metrics_targets(self):
        """One test-metrics JSON per model x seed."""
        return self._gated_metrics(self.GATED_MODELS)

    def gated_moe_metrics_targets(self):
        """Metrics of the mixtures only (gated_moe, gated_distilled): the routing figure."""
        kinds = ("gated_moe", "gated_distilled")
        return self._gated_metrics(
            [m for m in self.GATED_MODELS if self.GATED["models"][m]["kind"] in kinds]
        )

    def gated_figure_targets(self):
        names = ["accuracy_usage"] + (["routing"] if self.gated_moe_metrics_targets() else [])
        return [
            f"{self.GATED_DIR}/figures/{name}.{fmt}" for name in names for fmt in ("png", "svg")
        ]

    def gated_targets(self):
        """Stores -> trained models -> metrics -> table and figures of the gated family."""
        if not self.GATED_MODELS:
            return []
        return (
            [self.gated_store(split) for split in ("train", "val", "test")]
            + self.gated_metrics_targets()
            + list(self.GATED_TABLES.values())
            + self.gated_figure_targets()
        )

    def gated_table_inputs(self):
        """The table target: nothing when the section has no model."""
        return [self.GATED_TABLES["csv"]] if self.GATED_MODELS else []

    def gated_source_inputs(self, wildcards):
        """The data set's files (MNIST IDX, CIFAR batches): editing them rebuilds the stores."""
        return [str(path) for path in gated_source_files(self.config)]

    def input_checks(self):
        """The conversion's source files are read whole before the job starts (rule name ->
        check, for smoe.core.integrity): a damaged one is refused before the store it would
        rebuild is deleted."""
        return {"gated_data": source_problem}

    def gated_data_args(self, wildcards):
        data = self.GATED["data"]
        args = [f"--dataset {data['dataset']}", f"--seed {data['seed']}"]
        if data["val_fraction"] is not None:  # else the data set's own default
            args.append(f"--val-fraction {data['val_fraction']}")
        if data["folder"] is not None:
            args.append(f"--folder {shlex.quote(str(data['folder']))}")
        return " ".join(args)

    def gated_seed_outputs(self, kind, name=None):
        """One output per seed of a model's job: ``models/<model>/seed<k>/<name>`` or
        ``metrics/<model>/seed<k>.json``."""
        base = f"{self.GATED_DIR}/{kind}/{{model}}"
        if kind == "metrics":
            return [f"{base}/seed{seed}.json" for seed in self.GATED_SEEDS]
        return [f"{base}/seed{seed}/{name}" for seed in self.GATED_SEEDS]

    def gated_dependency_inputs(self, wildcards):
        """Every seed's best.pt of the models this one builds on (teacher, feature network)."""
        return [
            f"{self.GATED_DIR}/models/{other}/seed{seed}/best.pt"
            for other in gated_dependencies(self.config, wildcards.model).values()
            for seed in self.GATED_SEEDS
        ]

    def gated_dependency_args(self, wildcards):
        needs = gated_dependencies(self.config, wildcards.model)
        return " ".join(
            f"--{role}-dir {self.GATED_DIR}/models/{other}" for role, other in needs.items()
        )

    def gated_model_dir(self, wildcards):
        return f"{self.GATED_DIR}/models/{wildcards.model}"

    def gated_metrics_dir(self, wildcards):
        return f"{self.GATED_DIR}/metrics/{wildcards.model}"

    def gated_spec_json(self, wildcards):
        """The model's spec: a change to it (and only to it) retrains the model."""
        return spec_without_processes(gated_model_spec(self.config, wildcards.model))

    def gated_train_processes(self, wildcards):
        return gated_model_spec(self.config, wildcards.model).train["processes"]

    def gated_train_threads(self, wildcards):
        train = gated_model_spec(self.config, wildcards.model).train
        return train["threads"] * train["processes"]

    def gated_train_priority(self, wildcards):
        """Snakemake priority of a gated training: the family's trainings start after the
        other families' (the longest jobs first, so both cores stay busy), and among them a
        single expert, which trains in a quarter of a mixture's time, last: it fills the
        gap the last mixture leaves instead of leaving one core idle while that runs."""
        spec = gated_model_spec(self.config, wildcards.model)
        one_expert = spec.kind == "gated_single" and spec.options.get("params_budget") is None
        return 9 if one_expert else 10

    def gated_train_gpus(self, wildcards):
        """A GPU per process only when the model's self.config sends it to CUDA."""
        train = gated_model_spec(self.config, wildcards.model).train
        return train["processes"] if train["device"] == "cuda" else 0

    def _gated_train_images(self):
        """Train images and values per image of the configured data set."""
        sizes = {
            "mnist5k": (4000, 784),
            "digits": (1438, 64),
            "mnist": (60000, 784),
            "fashion-mnist": (60000, 784),
            "cifar10": (50000, 3072),
        }
        return sizes[self.GATED["data"]["dataset"]]

    def gated_train_mem_mb(self, wildcards):
        """The train split as float32 a few times over, plus PyTorch."""
        images, values = self._gated_train_images()
        return int(2000 + 4 * images * values * 4 / 2**20)

    def gated_train_runtime(self, wildcards):
        """Cluster time limit in minutes: per seed, epochs x images at a slow core's 2,000
        images a second for a 10-expert MoE on MNIST-sized inputs, times three, plus 30."""
        images, values = self._gated_train_images()
        spec = gated_model_spec(self.config, wildcards.model)
        seconds = spec.train["epochs"] * images * values / 784 / 2000 * len(self.GATED_SEEDS)
        return max(30, int(3 * seconds / 60) + 30)

    def targets(self):
        """The family in `rule all`: only when ``gated.enabled``."""
        return self.gated_targets() if self.GATED["enabled"] else []

    def tables(self):
        """The tables the provenance page is rebuilt after."""
        enabled = self.GATED["enabled"] and self.GATED_MODELS
        return [self.GATED_TABLES["csv"]] if enabled else []
