"""The README's two set-up commands are what CI runs and what the project provides; the
docs' library example runs as written."""

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
    """.ci/run runs the README's test command, then the Slurm step (tests/slurm/) on its own."""
    _, tests = setup_commands(repo)
    ci = [
        line
        for line in (repo / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert tests in ci
    assert ci.index(tests) < len(ci) - 1
    assert ci[-1].endswith("&& bash .ci/slurm/run-test.sh")


def test_dev_install_pins_the_cpu_torch_but_the_package_does_not(repo):
    text = (repo / ".ci" / "constraints.txt").read_text()
    pins = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert pins[0] == "torch==2.13.0"
    # the rest pin the `slurm` extra that the Slurm step verified
    assert all(pin.startswith("snakemake-executor-plugin-slurm") for pin in pins[1:])
    pyproject = (repo / "pyproject.toml").read_text()
    assert re.search(r'"torch>=[\d.]+"', pyproject) and "torch==" not in pyproject


def test_the_docs_smoe_layer_example_trains_outside_the_workflow(repo, capsys):
    """The docs' example of the public layer (docs/core.md), run as written: the SMoE learns
    both stencils and routes every point to the right one inside a plain PyTorch loop."""
    import torch

    text = (repo / "docs" / "core.md").read_text()
    section = re.search(r"## The SMoE layer in your own network(.*?)\n## ", text, re.S).group(1)
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is the fastest
    try:
        exec(compile(code, "docs/core.md", "exec"), {"__name__": "readme_example"})
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    mse, agreement = re.search(r"mse (\S+), routing agreement (\S+) %", printed).groups()
    assert float(mse) < 1e-10 and float(agreement) == 100.0
