"""The README's two set-up commands are what CI runs and what the project provides."""

import re


def setup_commands(repo):
    text = (repo / "README.md").read_text()
    block = re.search(r"## Set-up: two commands.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_has_exactly_two_setup_commands(repo):
    main_job, tests = setup_commands(repo)
    assert main_job.endswith("snakemake --cores 2")
    assert tests.endswith("python -m pytest")


def test_ci_runs_the_readme_test_command(repo):
    _, tests = setup_commands(repo)
    ci = [
        line
        for line in (repo / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert ci[-1] == tests


def test_dev_install_pins_the_cpu_torch_but_the_package_does_not(repo):
    assert (repo / ".ci" / "constraints.txt").read_text().split() == ["torch==2.13.0"]
    pyproject = (repo / "pyproject.toml").read_text()
    assert re.search(r'"torch>=[\d.]+"', pyproject) and "torch==" not in pyproject
