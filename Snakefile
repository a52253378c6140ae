"""smoe workflow: region map -> heat-diffusion splits (zarr) -> trained models -> test metrics ->
tables, figures and an HTML report (`snakemake --report report.html`); with
`clusters.enabled: true` also the synthetic-cluster family (Chen et al. 2022) under
results/clusters/ (named targets: `clusters`, `clusters_table`); with `gated.enabled: true`
the gated modular MoE family (Krishnamurthy et al. 2023) under results/gated/ (named
targets: `gated`, `gated_table`).

Run from the repository root: `snakemake --cores 2` builds everything for
config/config.yaml; `--configfile config/paper.yaml` gives the paper's sizes. The config
is validated (schema with defaults, then cross-key checks) before any job is planned.
"""

from snakemake.utils import min_version

min_version("9.0")


# The embedded default; a --configfile on the command line replaces it instead of being
# merged into it, so config/paper.yaml never inherits the quick config's models.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


# One rule file per experiment family, in the order of the family list
# (smoe/families/__init__.py): workflow/rules/<name>.smk.
for _family_name in FAMILY_NAMES:

    include: f"workflow/rules/{_family_name}.smk"


include: "workflow/rules/provenance.smk"


rule all:
    default_target: True
    input:
        all_targets(),
