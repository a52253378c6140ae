"""What every family's rules share: the config loaded, validated and checked against what is
on disk before any job is planned, the results folder, the job environment, the report's
categories, and the provenance page. Each family's paths, arguments and resources come from
its own smoe.families.<name>.workflow module, used by its rule file."""

import json
import os
import re
import sys

sys.path.insert(0, workflow.basedir)  # the smoe package beside the Snakefile

from smoe.config import stale_outputs, validate_config
from smoe.core.errors import InputError
from smoe.core.integrity import check_planned_run
from smoe.core.workflow import gpu_check, planned_executor
from smoe.families import NAMES as FAMILY_NAMES, family

# A refused config ends the run here, before any job is planned, with one message per bad
# key and no traceback: exiting is what keeps Snakemake from printing one.
try:
    _executor_name = planned_executor()
    _validated = validate_config(
        config,
        gpu=gpu_check(workflow.exec_mode.name, _executor_name),
        executor=_executor_name,
        warn=lambda message: logger.warning(f"warning: {message}"),
    )
except InputError as _error:
    logger.error(str(_error))
    raise SystemExit(1) from None
config.clear()
config.update(_validated)

# Checked by the process that plans the run; a job's own Snakemake (a cluster job re-reads
# the workflow) skips it: the planner has checked, and a job must not trip over a store
# another job is rewriting.
_stale = stale_outputs(config) if workflow.exec_mode.name == "DEFAULT" else []
if _stale:
    raise WorkflowError(
        "outputs on disk no longer match how they were made:\n  " + "\n  ".join(_stale)
    )

INPUT_CHECKS = {}
"""A rule's own check of its inputs (rule name -> check), set by the family rule files; other
inputs are checked by their kind (smoe.core.integrity)."""


# Called for a real run (not -n) once the jobs are planned, before any job starts and before
# Snakemake deletes any old output: a damaged input of a job that would run ends the run here,
# with one line per file, and nothing is deleted.
onstart:
    if workflow.exec_mode.name == "DEFAULT" and not check_planned_run(
        workflow.dag,
        INPUT_CHECKS,
        warn=lambda line: logger.warning(f"warning: {line}"),
        error=logger.error,
    ):
        raise SystemExit(1)


RESULTS = str(config["results"])
SMOE_ENV = "../../envs/smoe.yaml"

# Report categories, named plainly; the report menu sorts them alphabetically, which is
# also the order a reader wants: what went in, what came out, how training went, and what
# produced it. Each experiment family is a subcategory, titled by its record.
DATA_CATEGORY = "Data"
RESULTS_CATEGORY = "Results"
DIAGNOSTICS_CATEGORY = "Training diagnostics"
PROVENANCE_CATEGORY = "Versions and configuration"

FAMILY_RULES = {}
"""Each family's rules object (paths, targets, tables), set by its rule file."""


def family_title(name):
    """The report subcategory of a family."""
    return family(name).title


def all_targets():
    """Every enabled family's outputs, and the page saying which config and software
    made them."""
    targets = [t for rules in FAMILY_RULES.values() for t in rules.targets()]
    if provenance_inputs():
        targets.append(f"{RESULTS}/report/provenance.html")
    return targets


def provenance_inputs(wildcards=None):
    """The tables of every enabled family: the provenance page is rebuilt after any of
    them changes, so it always describes the run that made them. An input function, so it
    reads the families' rule files, which come after this one."""
    return [table for rules in FAMILY_RULES.values() for table in rules.tables()]


def resolved_config_json():
    """The validated config (defaults filled in) as JSON, for the report's provenance page;
    as a rule parameter it also makes that page rebuild whenever the config changes."""
    return json.dumps(config, sort_keys=False)


def output_folder(wildcards, output):
    """The folder of a rule's first output, for commands that take an output folder."""
    return os.path.dirname(output[0])
