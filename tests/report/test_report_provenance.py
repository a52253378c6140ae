"""The report's provenance page: resolved config and software versions."""

import json
import subprocess
import sys

import yaml

from smoe.core.report.provenance import provenance_page, software_versions, write_provenance


def test_versions_name_the_packages_a_number_depends_on():
    versions = software_versions()
    import numpy
    import torch

    assert versions["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert versions["packages"]["numpy"] == numpy.__version__
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    assert versions["cuda_available"] in (True, False)


def test_page_and_files_hold_the_config_as_given(tmp_path):
    config = {"results": "results/x", "models": {"m": {"kind": "cnn", "note": "<b>&"}}}
    paths = write_provenance(config, tmp_path / "report" / "provenance.html")
    assert yaml.safe_load(paths["config"].read_text()) == config
    assert json.loads(paths["versions"].read_text())["packages"]["smoe"]
    page = paths["html"].read_text()
    assert "note: &lt;b&gt;&amp;" in page  # escaped, shown as text
    assert "<script" not in page


def test_command_line_resolves_a_config_file_with_its_defaults(repo, tmp_path):
    out = tmp_path / "p.html"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "smoe",
            "provenance",
            "--config",
            str(repo / "config" / "test.yaml"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert resolved["results"] == "results/test" and "evaluate" in resolved  # a default section
    bad = subprocess.run(
        [sys.executable, "-m", "smoe", "provenance", "--config-json", "[1]", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "--config-json is not a JSON object" in bad.stderr
    assert provenance_page({}, {}).count("<table>") == 1
