"""The recipe of README "Adding an experiment family", followed to the letter: a minimal toy
family (one folder, one registration line, one rule file) in a copy of the package, and the
`smoe` command, the config schema, the config checks and `snakemake -n` pick it up."""

import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

TOY_FILES = {
    "smoe/families/toy/__init__.py": '''
        """A toy family: one text file of n lines."""

        from pathlib import Path

        from smoe.core.family import Family

        FAMILY = Family(
            name="toy",
            title="Toy family",
            section="toy",
            schema=Path(__file__).with_name("schema.yaml"),
            hooks={
                "config_errors": "smoe.families.toy.config:config_errors",
                "add_commands": "smoe.families.toy.cli:add_commands",
                "cli_paths": "smoe.families.toy.cli:paths",
            },
        )
    ''',
    "smoe/families/toy/schema.yaml": """
        properties:
          toy:
            description: the toy family
            type: object
            additionalProperties: false
            default: {}
            properties:
              enabled: {type: boolean, default: false}
              lines: {type: integer, minimum: 1, default: 3}
    """,
    "smoe/families/toy/config.py": """
        def config_errors(config, schema):
            if config["toy"]["enabled"] and config["toy"]["lines"] > 100:
                return ["config key 'toy.lines': at most 100 lines"]
            return []
    """,
    "smoe/families/toy/cli.py": """
        from pathlib import Path


        def add_commands(sub, seeds):
            p = sub.add_parser("toy-data", help="write the toy family's file")
            p.add_argument("--lines", type=int, required=True)
            p.add_argument("--out", type=Path, required=True)
            p.set_defaults(run=_run)


        def _run(args):
            args.out.write_text("".join(f"{i}\\n" for i in range(args.lines)))


        def paths(args):
            return ([], [(args.out, "file")]) if args.command == "toy-data" else None
    """,
    "smoe/families/toy/workflow.py": """
        class ToyRules:
            def __init__(self, config, results):
                self.config, self.results = config, results

            def targets(self):
                return [f"{self.results}/toy/data.txt"] if self.config["toy"]["enabled"] else []

            def tables(self):
                return []
    """,
    "workflow/rules/toy.smk": """
        from smoe.families.toy.workflow import ToyRules

        toy = ToyRules(config, RESULTS)
        FAMILY_RULES["toy"] = toy


        rule toy_data:
            output:
                f"{RESULTS}/toy/data.txt",
            log:
                f"{RESULTS}/logs/toy/data.log",
            conda:
                SMOE_ENV
            threads: 1
            params:
                lines=config["toy"]["lines"],
            shell:
                "smoe toy-data --lines {params.lines} --out {output} > {log} 2>&1"
    """,
}


@pytest.fixture(scope="module")
def toy_repo(repo, tmp_path_factory):
    """A copy of the package and workflow with the toy family added by the recipe."""
    root = tmp_path_factory.mktemp("toy_repo")
    for name in ("smoe", "workflow", "config", "envs"):
        shutil.copytree(repo / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(repo / "Snakefile", root / "Snakefile")
    for relative, text in TOY_FILES.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    registry = root / "smoe" / "families" / "__init__.py"
    text = registry.read_text()
    names = re.search(r"^NAMES = \((.*?)\)$", text, re.M)
    assert names, "the family list is one line: NAMES = (...)"
    registry.write_text(text.replace(names.group(0), f'NAMES = ({names.group(1)}, "toy")'))
    return root


def run(root, *command, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd or root, env=env)


def test_the_smoe_command_lists_the_new_family(toy_repo):
    result = run(toy_repo, sys.executable, "-m", "smoe", "--help")
    assert result.returncode == 0, result.stderr
    assert "toy-data" in result.stdout


def test_the_config_schema_and_checks_include_it(toy_repo):
    config = toy_repo / "toy.yaml"
    config.write_text("models: {}\ntoy: {enabled: true, lines: 5}\n")
    result = run(toy_repo, sys.executable, "-m", "smoe", "check-config", str(config))
    assert result.returncode == 0, result.stderr
    assert "toy:\n  enabled: true\n  lines: 5" in result.stdout
    config.write_text("models: {}\ntoy: {enabled: true, lines: 500}\n")
    result = run(toy_repo, sys.executable, "-m", "smoe", "check-config", str(config))
    assert result.returncode == 2 and "config key 'toy.lines': at most 100 lines" in result.stderr
    config.write_text("models: {}\ntoy: {enabled: true, colour: red}\n")
    result = run(toy_repo, sys.executable, "-m", "smoe", "check-config", str(config))
    assert result.returncode == 2 and "'toy.colour'" in result.stderr


def test_snakemake_plans_the_new_familys_rule(toy_repo, tmp_path):
    config = tmp_path / "toy.yaml"
    config.write_text(f"results: {tmp_path / 'results'}\nmodels: {{}}\ntoy: {{enabled: true}}\n")
    result = run(
        toy_repo,
        sys.executable,
        "-m",
        "snakemake",
        "-n",
        "--snakefile",
        str(toy_repo / "Snakefile"),
        "--directory",
        str(tmp_path),
        "--cores",
        "1",
        "--configfile",
        str(config),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    planned = result.stdout + result.stderr
    assert re.search(r"toy_data\s+1", planned) and re.search(r"provenance\s+1", planned) is None
