"""Every class of config error stops a real `snakemake -n` before any job, naming the key.

Snakemake deletes a job's old outputs when the job starts, so a value refused inside a job
has already cost the user their results. Each case below edits config/test.yaml (or passes
`--config` as a user would) and runs Snakemake on a workdir whose results were built
before: the run must fail with one message naming the key and the value, print no
traceback, and leave every file and folder of the results byte for byte and mtime for
mtime as it was.
"""

import importlib.util
import json
import re
import subprocess
import sys

import pytest
import yaml
from snakemake_runs import run_snakemake, snapshot

pytestmark = pytest.mark.slow

TARGET = "results/test/data/mask.npy"  # the cheapest output: one mask job


def snakemake(repo, workdir, *args, configfile=None, env=None):
    return run_snakemake(repo, workdir, *args, configfile=configfile, cores=1, env=env)


@pytest.fixture(scope="module")
def built(repo, tmp_path_factory):
    """A workdir whose results hold the tiny config's region map (and its picture)."""
    workdir = tmp_path_factory.mktemp("bad_config")
    result = snakemake(repo, workdir, TARGET)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (workdir / TARGET).is_file()
    return workdir


def edit(**sections):
    """A change to config/test.yaml: each section's keys replace or join the file's."""

    def apply(config):
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            else:
                config[key] = value
        return config

    return apply


def smoe_options(**options):
    def apply(config):
        config["models"]["smoe"]["options"].update(options)
        return config

    return apply


CUDA_HIDDEN = {"CUDA_VISIBLE_DEVICES": ""}  # no GPU visible, on any machine

# (id, change of the config or None, --config arguments, env, the message naming the key)
CASES = [
    # 1. model options, per kind
    (
        "smoe-quantile",
        smoe_options(quantile=1.5),
        [],
        None,
        "config key 'models.smoe.options.quantile': 1.5 is greater than the maximum of 1",
    ),
    (
        "cnn-kernel-size",
        edit(models={"cnn": {"kind": "cnn", "options": {"kernel_size": 4}}}),
        [],
        None,
        "config key 'models.cnn.options.kernel_size': 4 is not odd",
    ),
    (
        "unknown-gate-option",
        smoe_options(gate="conv", gate_options={"bais": True}),
        [],
        None,
        "config key 'models.smoe.options.gate_options.bais': unknown option of gate 'conv'",
    ),
    # 2. cuda where no GPU is visible, on a local run
    (
        "cuda-without-gpu",
        edit(train={"device": "cuda"}),
        [],
        CUDA_HIDDEN,
        "config key 'train.device': 'cuda' (models persistence, stencil, generator, cnn, smoe), "
        "but no GPU is usable on this machine (CUDA_VISIBLE_DEVICES='' hides every GPU)",
    ),
    # 3. a selection metric the evaluation does not compute
    (
        "metric-region",
        edit(train={"select": {"metric": "mask5-prcntclose1.0"}}),
        [],
        None,
        "config key 'train.select.metric': 'mask5-prcntclose1.0' names region type 5",
    ),
    (
        "metric-rtol",
        edit(train={"select": {"metric": "prcntclose5.0"}}),
        [],
        None,
        "config key 'train.select.metric': 'prcntclose5.0' is not computed",
    ),
    # 4. data windows, maps, seeds, empty configs, names, the results folder
    (
        "context-window",
        edit(data={"context": 10}),
        [],
        None,
        "config key 'data.context': 10 previous frames need runs of at least 12 frames",
    ),
    (
        "map-too-small",
        edit(mask={"height": 1, "width": 2}),
        [],
        None,
        "config key 'mask': a 1 x 2 map has 2 cells, too few for mask.types=3",
    ),
    (
        "map-missing-type",
        edit(mask={"height": 2, "width": 2, "seed": 0}),
        [],
        None,
        "config key 'mask.seed': the map generated with seed 0 (2 x 2, 3 types)",
    ),
    ("duplicate-seeds", edit(seeds=[0, 0]), [], None, "config key 'seeds': [0, 0] has non-unique"),
    ("no-models", lambda config: {}, [], None, "config key 'models': no models are defined"),
    (
        "unsafe-name",
        edit(models={"a/b": {"kind": "cnn"}}),
        [],
        None,
        "config key 'models.a/b': the name 'a/b' is not safe as a folder name",
    ),
    (
        "results-is-a-file",
        edit(results=TARGET),
        [],
        None,
        f"config key 'results': '{TARGET}' is an existing file, not a folder",
    ),
    # 5. region_rtol_scale: a list must fit mask.types (the default fits any)
    (
        "rtol-scale-count",
        edit(evaluate={"region_rtol_scale": [1.0, 1.0]}),
        [],
        None,
        "config key 'evaluate.region_rtol_scale': 2 values for mask.types=3",
    ),
    # 7. nested --config values arrive as strings and are read as the user means them
    (
        "config-string-number",
        None,
        ["--config", "train={lr: -1}"],
        None,
        "config key 'train.lr': -1 is less than or equal to the minimum of 0",
    ),
    (
        "config-string-option",
        None,
        ["--config", "models={smoe: {kind: smoe, options: {k: 5}}}"],
        None,
        "config key 'models.smoe.options': k=5 must be between 1 and experts=3",
    ),
]


@pytest.mark.parametrize(
    "change, args, env, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_config_is_refused_before_any_job(repo, built, change, args, env, message):
    configfile = repo / "config" / "test.yaml"
    if change is not None:
        config = change(yaml.safe_load(configfile.read_text()))
        configfile = built.parent / f"{built.name}-bad.yaml"
        configfile.write_text(yaml.safe_dump(config, sort_keys=False))
    before = snapshot(built / "results")
    result = snakemake(repo, built, "-n", *args, configfile=configfile, env=env)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-2000:]
    assert message in out, out[-2000:]
    assert "invalid config:" in out
    assert "Traceback" not in out and 'File "' not in out, out[-2000:]
    assert "Building DAG" not in out and "Job stats" not in out
    assert snapshot(built / "results") == before


def test_a_comment_only_config_file_is_refused_by_snakemake(repo, built):
    configfile = built.parent / f"{built.name}-comments.yaml"
    configfile.write_text("# nothing here yet\n")
    before = snapshot(built / "results")
    result = snakemake(repo, built, "-n", configfile=configfile)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Config file must be given as JSON or YAML with keys at top level" in out
    assert snapshot(built / "results") == before


def test_nested_config_values_given_on_the_command_line_are_used(repo, built):
    result = snakemake(
        repo,
        built,
        "-n",
        "-p",
        "--config",
        "train={lr: 0.05, select: {metric: mse, mode: min}}",
        "seeds=[3]",
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-2000:]
    specs = [json.loads(s) for s in re.findall(r"--spec '(\{.*?\})'", out)]
    assert specs and all(spec["train"]["lr"] == 0.05 for spec in specs)
    assert all(spec["train"]["select"] == {"metric": "mse", "mode": "min"} for spec in specs)
    assert "seed3" in out and "seed0" not in out


def test_cuda_on_a_cluster_run_is_a_warning(repo, built):
    """SMOE_GPU_CHECK=cluster stands for a cluster executor (--profile profiles/slurm), which
    needs a plugin the tests do not install: a warning, and the run is planned."""
    config = yaml.safe_load((repo / "config" / "test.yaml").read_text())
    config["train"]["device"] = "cuda"
    configfile = built.parent / f"{built.name}-cuda.yaml"
    configfile.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**CUDA_HIDDEN, "SMOE_GPU_CHECK": "cluster"}
    result = snakemake(repo, built, "-n", configfile=configfile, env=env)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-2000:]
    assert "warning: config key 'train.device': 'cuda'" in out
    assert "the GPU is expected on the cluster nodes" in out


def test_only_types_and_diffusivities_changed_plans_a_run(repo, tmp_path):
    """The defaults fit any number of region types: nothing else needs editing."""
    config = yaml.safe_load((repo / "config" / "test.yaml").read_text())
    config["mask"]["types"] = 4
    config["heat"]["diffusivity"] = [0.001, 0.01, 0.1, 0.2]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    result = snakemake(repo, tmp_path, "-n", "-p", configfile=tmp_path / "c.yaml")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-2000:]
    specs = [json.loads(s) for s in re.findall(r"--spec '(\{.*?\})'", out)]
    assert specs and all(
        spec["evaluate"]["region_rtol_scale"] == pytest.approx([0.005, 0.05, 0.5, 1.0])
        for spec in specs
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"options": {"hidden": [0]}}, "--spec key 'options.hidden[0]': 0 is less than"),
        ({"data": {"context": 10}}, "--spec key 'data.context': 10 previous frames"),
    ],
)
def test_smoe_train_refuses_a_bad_spec_naming_the_key(repo, built, tmp_path, change, message):
    """`smoe train --spec` (what the train rule runs) checks its spec as the workflow does,
    the store giving the data's steps; nothing is written."""
    config = yaml.safe_load((repo / "config" / "test.yaml").read_text())
    from smoe.config import validate_config
    from smoe.families.heat.config import model_spec

    spec = model_spec(validate_config(config, gpu="skip"), "cnn").to_dict()
    spec.update(change)
    store = built / "store.zarr"
    if not store.exists():
        from smoe.families.heat.mask import load_mask
        from smoe.families.heat.simulation import HeatParams
        from smoe.families.heat.store import simulate_split

        simulate_split(
            load_mask(built / TARGET),
            HeatParams((0.0025, 0.025, 0.25), steps=10),
            1,
            2,
            store,
            progress=False,
        )
    out = tmp_path / "out"
    command = [sys.executable, "-m", "smoe", "train", "--spec", json.dumps(spec)]
    command += ["--train-store", str(store), "--val-store", str(store), "--seed", "0"]
    result = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.skipif(
    importlib.util.find_spec("snakemake_executor_plugin_slurm") is None,
    reason="needs the slurm extra: pip install -e '.[slurm]'",
)
def test_a_cluster_profile_makes_cuda_a_warning(repo, built):
    """The executor is read from the command line Snakemake parsed (here a profile's
    `executor: slurm`)."""
    config = yaml.safe_load((repo / "config" / "test.yaml").read_text())
    config["train"]["device"] = "cuda"
    configfile = built.parent / f"{built.name}-slurm.yaml"
    configfile.write_text(yaml.safe_dump(config, sort_keys=False))
    profile = str(repo / "profiles" / "slurm")
    result = snakemake(
        repo, built, "-n", "--profile", profile, configfile=configfile, env=CUDA_HIDDEN
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-2000:]
    assert "the run targets the 'slurm' executor, so the GPU is expected on the cluster" in out
