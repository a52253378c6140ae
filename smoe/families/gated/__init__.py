"""The gated modular MoE family (Krishnamurthy, Watkins, Gaertner, "Improving Expert
Specialization in Mixture of Experts", 2023), as the authors' released code runs it: image
stores, the MoE variants and the single expert, their training, specialisation metrics,
table and figures. Its config section is ``gated``; its outputs go under
``<results>/gated/``."""

from pathlib import Path

from smoe.core.family import Family

FAMILY = Family(
    name="gated",
    title="Gated modular MoE (Krishnamurthy et al. 2023)",
    section="gated",
    schema=Path(__file__).with_name("schema.yaml"),
    hooks={
        "config_errors": "smoe.families.gated.config:config_errors",
        "cuda_wanted": "smoe.families.gated.config:cuda_wanted",
        "add_commands": "smoe.families.gated.cli:add_commands",
        "cli_paths": "smoe.families.gated.cli:paths",
        "figures": "smoe.families.gated.cli:FIGURES",
    },
)
