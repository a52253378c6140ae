"""The heat-diffusion family (Dryden & Hoefler, "Spatial Mixture-of-Experts", NeurIPS 2022):
region maps, location-dependent heat diffusion simulated into zarr stores, the SMoE and its
baselines, their training, evaluation, tables and figures. Its config keys are the config's
top-level ones; its outputs go under ``<results>/``."""

from pathlib import Path

from smoe.core.family import Family

FAMILY = Family(
    name="heat",
    title="Heat diffusion (SMoE)",
    section=None,
    schema=Path(__file__).with_name("schema.yaml"),
    hooks={
        "config_errors": "smoe.families.heat.config:config_errors",
        "cuda_wanted": "smoe.families.heat.config:cuda_wanted",
        "add_commands": "smoe.families.heat.cli:add_commands",
        "cli_paths": "smoe.families.heat.cli:paths",
        "figures": "smoe.families.heat.cli:FIGURES",
        "stale_outputs": "smoe.families.heat.stale:stale_outputs",
    },
)
