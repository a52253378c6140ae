"""The docs: the MkDocs site builds without a warning (a broken link, an anchor that does not
exist or a page missing from the nav fails), and every command the README and the docs show
still runs as written: each `smoe` line parses with the real parser, each `snakemake` line
names rules, configs and profiles that exist, each benchmark takes the options shown."""

import re
import shlex
import subprocess
import sys

import pytest

from smoe.cli import build_parser

EXTERNAL = ("pip", "dask", "git", "ruff", "snakefmt", "mkdocs", "bash", "apt-get", "torchrun")
"""Commands of other tools the docs show (install, cluster daemons, lint): not ours to run."""


def shell_lines(repo):
    """(file, command) for every command line of a ```bash block in the README and docs,
    with continuations joined and comments dropped."""
    found = []
    for path in [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
            block = re.sub(r"\\\n\s*", " ", block)
            for line in block.splitlines():
                line = line.split("  #")[0].split(" # ")[0].strip().rstrip("&").strip()
                if line and not line.startswith("#"):
                    for part in line.split(" && "):
                        found.append((path.name, part.strip()))
    return found


def words(command):
    """The command's words without leading environment assignments and `time` wrappers."""
    parts = shlex.split(command)
    while parts and (re.match(r"^\w+=", parts[0]) or parts[0] in ("/usr/bin/time", "-v")):
        parts.pop(0)
    if parts[:3] == ["python", "-m", "smoe"]:
        parts = ["smoe", *parts[3:]]
    if parts and parts[0] == "torchrun":  # torchrun ... -m smoe ARGS
        parts = ["smoe", *parts[parts.index("-m") + 2 :]]
    return parts


@pytest.fixture(scope="module")
def commands(repo):
    return [(name, words(line)) for name, line in shell_lines(repo)]


def test_the_site_builds_strictly(repo, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "gated" / "index.html").is_file()


def test_a_broken_link_fails_the_build(repo, tmp_path):
    """The strictness the previous test relies on: a link to a missing page is an error."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# x\n\n[gone](missing.md)\n")
    (tmp_path / "mkdocs.yml").write_text(
        (repo / "mkdocs.yml").read_text().split("nav:")[0] + "nav:\n  - Home: index.md\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "s")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "missing.md" in result.stderr


def test_every_smoe_command_parses(commands):
    parser = build_parser()
    shown = [(name, parts) for name, parts in commands if parts and parts[0] == "smoe"]
    assert len(shown) >= 20
    for name, parts in shown:
        try:
            parser.parse_args(parts[1:])
        except SystemExit:
            pytest.fail(f"{name}: `{shlex.join(parts)}` does not parse")


def test_every_snakemake_command_names_what_exists(repo, commands):
    rules = subprocess.run(
        [sys.executable, "-m", "snakemake", "--list-rules"],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    assert rules.returncode == 0, rules.stderr[-2000:]
    known = set(rules.stdout.split())
    shown = [(name, parts) for name, parts in commands if parts and parts[0] == "snakemake"]
    assert len(shown) >= 10
    takes_value = {"--cores", "--configfile", "--profile", "--config", "--report", "-j"}
    for name, parts in shown:
        rest = parts[1:]
        index = 0
        while index < len(rest):
            word = rest[index]
            if word in ("--configfile", "--profile"):
                assert (repo / rest[index + 1]).exists(), f"{name}: {rest[index + 1]} missing"
            if word in takes_value:
                index += 2
                continue
            if not word.startswith("-") and "/" not in word and "=" not in word:
                assert word in known, f"{name}: target {word!r} is not a rule"
            index += 1


def test_every_benchmark_shown_takes_its_options(repo, commands):
    shown = [parts for _, parts in commands if parts[:1] == ["python"] and len(parts) > 1]
    scripts = {parts[1]: set() for parts in shown if parts[1].startswith("benchmarks/")}
    for parts in shown:
        if parts[1] in scripts:
            flags = (word.strip("[]") for word in parts[2:])
            scripts[parts[1]] |= {flag for flag in flags if flag.startswith("--")}
    assert scripts
    for script, options in scripts.items():
        assert (repo / script).is_file(), script
        result = subprocess.run(
            [sys.executable, script, "--help"], cwd=repo, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr[-1000:]
        missing = {option for option in options if option not in result.stdout}
        assert not missing, f"{script}: {missing}"


def test_every_command_is_ours_or_named_external(commands):
    ours = ("smoe", "snakemake", "python")
    strangers = {parts[0] for _, parts in commands if parts and parts[0] not in ours}
    assert strangers <= set(EXTERNAL), strangers
