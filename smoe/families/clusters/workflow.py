"""What the synthetic-cluster family's rules (``workflow/rules/clusters.smk``) compute from
the config: output paths and targets, each job's arguments and resources. `clusters.enabled`
puts the family into `rule all`; the named targets `clusters` and `clusters_table` build it
from its section either way."""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

from smoe.core.workflow import store_head
from smoe.families.clusters.config import (
    CLUSTER_SPLITS,
    cluster_data_overrides,
    cluster_model_spec,
    cluster_models_to_run,
    cluster_setting,
)
from smoe.families.clusters.options import CLUSTER_EPOCHS, cluster_defaults


class ClusterRules:
    """Paths, targets, job arguments and resources of the cluster family's rules, from a
    validated config."""

    def __init__(self, config: dict[str, Any], results: str) -> None:
        self.config = config
        self.RESULTS = results

        self.CLUSTERS = self.config["clusters"]

        self.CLUSTER_DIR = f"{self.RESULTS}/clusters"

        self.CLUSTER_SETTINGS = list(self.CLUSTERS["settings"])

        self.CLUSTER_MODELS = cluster_models_to_run(self.config)

        self.CLUSTER_SEEDS = [str(seed) for seed in self.CLUSTERS["seeds"]]

        self.CLUSTER_TABLES = {
            "csv": f"{self.CLUSTER_DIR}/table.csv",
            "markdown": f"{self.CLUSTER_DIR}/table.md",
            "html": f"{self.CLUSTER_DIR}/table.html",
        }

        self.CLUSTER_WILDCARDS = {
            "setting": "|".join(self.CLUSTER_SETTINGS) or "no-settings",
            "split": "|".join(CLUSTER_SPLITS),
            "model": "|".join(map(re.escape, self.CLUSTER_MODELS)) or "no-models",
        }

    def cluster_store_folder(self, setting, split):
        return f"{self.CLUSTER_DIR}/data/{setting}/{split}.zarr"

    def cluster_store(self, setting, split):
        """The file the rules declare for a store (see store_head)."""
        return store_head(self.cluster_store_folder(setting, split))

    def cluster_data_targets(self):
        return [
            self.cluster_store(setting, split)
            for setting in self.CLUSTER_SETTINGS
            for split in CLUSTER_SPLITS
        ]

    def _cluster_metrics(self, models):
        return [
            f"{self.CLUSTER_DIR}/metrics/{setting}/{model}/seed{seed}.json"
            for setting in self.CLUSTER_SETTINGS
            for model in models
            for seed in self.CLUSTER_SEEDS
        ]

    def cluster_metrics_targets(self):
        """One test-metrics JSON per setting x model x seed."""
        return self._cluster_metrics(self.CLUSTER_MODELS)

    def cluster_moe_models(self):
        return [
            m for m in self.CLUSTER_MODELS if self.CLUSTERS["models"][m]["kind"] == "cluster_moe"
        ]

    def cluster_moe_metrics_targets(self):
        """Metrics of the MoE models only: the dispatch figure needs their routing."""
        return self._cluster_metrics(self.cluster_moe_models())

    def cluster_figure_targets(self):
        """The dispatch figure (when an MoE is configured) and one projection per setting."""
        names = ["dispatch"] if self.cluster_moe_models() else []
        names += [f"projection_{setting}" for setting in self.CLUSTER_SETTINGS]
        return [
            f"{self.CLUSTER_DIR}/figures/{name}.{fmt}" for name in names for fmt in ("png", "svg")
        ]

    def cluster_targets(self):
        """Stores -> trained models -> metrics -> table and figures of the cluster family."""
        if not (self.CLUSTER_SETTINGS and self.CLUSTER_MODELS):
            return []
        return (
            self.cluster_data_targets()
            + self.cluster_metrics_targets()
            + list(self.CLUSTER_TABLES.values())
            + self.cluster_figure_targets()
        )

    def cluster_table_inputs(self):
        """The table target: nothing when the section has no setting or no model."""
        return [self.CLUSTER_TABLES["csv"]] if self.CLUSTER_SETTINGS and self.CLUSTER_MODELS else []

    def cluster_data_args(self, wildcards):
        """Options of `smoe cluster-data` for one setting: its name, the data seed and every
        override of clusters.data (each value as YAML, quoted for the shell)."""
        args = [f"--setting {wildcards.setting}", f"--seed {self.CLUSTERS['data']['seed']}"]
        for key, value in cluster_data_overrides(self.config).items():
            args.append(f"--set {shlex.quote(f'{key}={json.dumps(value)}')}")
        return " ".join(args)

    def _cluster_sizes(self, setting):
        """(samples, values per sample) of a setting's train split."""
        s = cluster_setting(self.config, setting)
        return s.n_train, s.patches * s.dim

    def cluster_data_mem_mb(self, wildcards):
        """One split generated in float64, about four copies of it, plus the framework."""
        s = cluster_setting(self.config, wildcards.setting)
        samples = s.samples(wildcards.split)
        return int(1000 + 4 * samples * s.patches * s.dim * 8 / 2**20)

    def cluster_seed_outputs(self, kind, name=None):
        """One output per seed of a (setting, model) job: ``models/.../seed<k>/<name>`` or
        ``metrics/.../seed<k>.json``."""
        base = f"{self.CLUSTER_DIR}/{kind}/{{setting}}/{{model}}"
        if kind == "metrics":
            return [f"{base}/seed{seed}.json" for seed in self.CLUSTER_SEEDS]
        return [f"{base}/seed{seed}/{name}" for seed in self.CLUSTER_SEEDS]

    def cluster_model_dir(self, wildcards):
        return f"{self.CLUSTER_DIR}/models/{wildcards.setting}/{wildcards.model}"

    def cluster_metrics_dir(self, wildcards):
        return f"{self.CLUSTER_DIR}/metrics/{wildcards.setting}/{wildcards.model}"

    def cluster_spec_json(self, wildcards):
        """The model's resolved spec: a change to it (and only to it) retrains the model."""
        return cluster_model_spec(self.config, wildcards.model).to_json()

    def cluster_train_threads(self, wildcards):
        return cluster_model_spec(self.config, wildcards.model).train["threads"]

    def cluster_train_gpus(self, wildcards):
        """A GPU only when the model's self.config sends it to CUDA."""
        device = cluster_model_spec(self.config, wildcards.model).train["device"]
        return 1 if device == "cuda" else 0

    def cluster_train_mem_mb(self, wildcards):
        """The train split (full batch) and its activations several times over, plus PyTorch."""
        samples, values = self._cluster_sizes(wildcards.setting)
        return int(2000 + 16 * samples * values * 4 / 2**20)

    def cluster_train_runtime(self, wildcards):
        """Cluster time limit in minutes, from the epochs, the split's size and the filters
        (all experts counted), at a slow core's 1e9 multiply-adds a second, times ten."""
        samples, values = self._cluster_sizes(wildcards.setting)
        spec = cluster_model_spec(self.config, wildcards.model)
        options = {**cluster_defaults(spec.kind), **spec.options}
        filters = 2 * options.get("filters_per_class", 8) * options.get("experts", 1)
        epochs = spec.train["epochs"] or CLUSTER_EPOCHS[spec.kind]
        work = 3 * epochs * samples * values * filters * len(self.CLUSTER_SEEDS)
        return max(30, int(10 * work / 1e9 / 60) + 30)

    def targets(self):
        """The family in `rule all`: only when ``clusters.enabled``."""
        return self.cluster_targets() if self.CLUSTERS["enabled"] else []

    def tables(self):
        """The tables the provenance page is rebuilt after."""
        enabled = self.CLUSTERS["enabled"] and self.CLUSTER_SETTINGS and self.CLUSTER_MODELS
        return [self.CLUSTER_TABLES["csv"]] if enabled else []
