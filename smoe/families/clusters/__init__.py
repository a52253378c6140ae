"""The synthetic-cluster family (Chen, Deng, Wu, Gu, Li, "Towards Understanding Mixture of
Experts in Deep Learning", NeurIPS 2022): cluster data, the noisy top-1 MoE of CNN experts
and the single CNNs, trained as the official code trains them, their table and figures. Its
config section is ``clusters``; its outputs go under ``<results>/clusters/``."""

from pathlib import Path

from smoe.core.family import Family

FAMILY = Family(
    name="clusters",
    title="Synthetic clusters (Chen et al. 2022)",
    section="clusters",
    schema=Path(__file__).with_name("schema.yaml"),
    hooks={
        "config_errors": "smoe.families.clusters.config:config_errors",
        "cuda_wanted": "smoe.families.clusters.config:cuda_wanted",
        "add_commands": "smoe.families.clusters.cli:add_commands",
        "cli_paths": "smoe.families.clusters.cli:paths",
        "figures": "smoe.families.clusters.cli:FIGURES",
    },
)
