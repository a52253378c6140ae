"""The `snakemake --report` a researcher reads, built from the tiny config's real outputs.

The report is a single HTML file whose data (results, categories, captions) sit in script
variables as JSON; the tests read them the way the report's own viewer does, and decode the
embedded files. They fail on a docutils warning in any caption, on a registered result that
is missing, on a table that is not HTML, on a figure that does not fit the viewer, and on
categories out of their deliberate order.
"""

import base64
import json
import re
import struct

import pytest
import yaml
from snakemake_runs import run_snakemake, script_variable

from smoe.core.report.figures import fits_viewer

pytestmark = pytest.mark.slow

# Everything the tiny config registers for the report (it has an SMoE with 3x3 kernels).
EXPECTED = {
    "data/mask.png": ("Data", "image/png"),
    "tables/summary.html": ("Results", "text/html"),
    "figures/metric_bars.png": ("Results", "image/png"),
    "figures/predictions.png": ("Results", "image/png"),
    "figures/routing.png": ("Results", "image/png"),
    "figures/kernels.png": ("Results", "image/png"),
    "figures/learning_curves.png": ("Training diagnostics", "image/png"),
    "figures/smoe_dynamics.png": ("Training diagnostics", "image/png"),
    "figures/expert_regions.png": ("Training diagnostics", "image/png"),
    "report/provenance.html": ("Versions and configuration", "text/html"),
}
CATEGORY_ORDER = ["Data", "Results", "Training diagnostics", "Versions and configuration"]


def decoded(uri: str) -> bytes:
    header, _, data = uri.partition(",")
    assert header.endswith(";base64"), header[:80]
    return base64.b64decode(data)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def report(repo, built_workflow):
    path = built_workflow / "report.html"
    result = run_snakemake(repo, built_workflow, "--report", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    page = path.read_text()
    return {
        "page": page,
        "log": result.stdout + result.stderr,
        "results": script_variable(page, "results"),
        "categories": script_variable(page, "categories"),
        "workflow_desc": script_variable(page, "workflow_desc"),
    }


def by_suffix(results: dict) -> dict:
    """Registered results keyed by their path below results/test/."""
    return {path.split("results/test/", 1)[1]: entry for path, entry in results.items()}


def test_every_registered_result_is_in_the_report_under_its_category(report):
    results = by_suffix(report["results"])
    assert set(results) == set(EXPECTED)  # nothing missing, nothing unexpected
    placed = {
        path.split("results/test/", 1)[1]: category
        for category, subcategories in report["categories"].items()
        for paths in subcategories.values()
        for path in paths
    }
    for name, (category, mime) in EXPECTED.items():
        assert placed[name] == category, name
        assert results[name]["mime_type"] == mime, name
        assert len(decoded(results[name]["data_uri"])) > 1000, name
    assert "Missing metadata" not in report["log"]


def test_categories_are_plain_and_sort_in_reading_order(report):
    names = list(report["categories"])
    assert sorted(names, key=str.casefold) == CATEGORY_ORDER  # the menu sorts by name
    for subcategories in report["categories"].values():
        assert set(subcategories) <= {"Heat diffusion (SMoE)", "Other"}


def test_no_caption_or_landing_text_carries_a_docutils_warning(report):
    texts = [report["workflow_desc"]] + [e["caption"] for e in report["results"].values()]
    for text in texts:
        assert "system-message" not in text and "System Message" not in text, text[:300]
    assert "<h1" in report["workflow_desc"] or "title" in report["workflow_desc"]
    assert all(entry["caption"].strip() for entry in report["results"].values())


def test_tables_are_html_with_rounded_numbers_and_marked_rows(report):
    results = by_suffix(report["results"])
    non_html_tables = [
        name
        for name, entry in results.items()
        if not entry["mime_type"].startswith("image/") and entry["mime_type"] != "text/html"
    ]
    assert non_html_tables == []
    page = decoded(results["tables/summary.html"]["data_uri"]).decode()
    assert page.count("<table>") == 2  # all points, per region type
    for model in ("persistence", "stencil", "generator", "cnn", "smoe"):
        assert f'<td class="label">{model}' in page, model
    assert '<tr class="reference"><td class="label">generator<span class="badge"' in page
    cells = re.findall(r'<td class="num">([^<]*)</td>', page)
    assert cells and all("nan" not in c.lower() and "±" not in c for c in cells)  # one seed
    assert all(len(c.split(".")[-1]) <= 6 for c in cells if c)  # rounded, not raw floats
    assert "type 0 (a = 0.0025," in page and "mask0" not in page.split("<ul")[0]


def test_figures_fit_the_viewer(report):
    for name, entry in by_suffix(report["results"]).items():
        if entry["mime_type"] != "image/png":
            continue
        width, height = png_size(decoded(entry["data_uri"]))
        assert fits_viewer(width, height), (name, width, height)


def test_the_report_says_which_config_and_software_made_it(report, repo, built_workflow):
    results = by_suffix(report["results"])
    page = decoded(results["report/provenance.html"]["data_uri"]).decode()
    resolved = yaml.safe_load(
        (built_workflow / "results" / "test" / "report" / "config.yaml").read_text()
    )
    test_config = yaml.safe_load((repo / "config" / "test.yaml").read_text())
    assert resolved["models"]["cnn"]["options"]["hidden"] == [2]  # from config/test.yaml
    assert set(resolved) > set(test_config)  # schema defaults filled in
    assert "stop_at" in yaml.dump(resolved)
    assert "results: results/test" in page and "stop_at" in page
    for package in ("torch", "snakemake", "xarray", "zarr", "numpy"):
        assert f'<td class="label">{package}</td>' in page, package
    versions = json.loads(
        (built_workflow / "results" / "test" / "report" / "versions.json").read_text()
    )
    assert versions["packages"]["torch"] and versions["python"].startswith("3.")


def chromium_executable():
    """A Chromium the browser check can drive: $SMOE_CHROMIUM, or chromium on the PATH."""
    import os
    import shutil

    return (
        os.environ.get("SMOE_CHROMIUM")
        or shutil.which("chromium")
        or shutil.which("chromium-browser")
    )


@pytest.mark.parametrize("window", [(1920, 1080), (1366, 768)])
def test_in_a_headless_browser_every_result_shows_whole_and_without_errors(
    report, built_workflow, window, tmp_path
):
    """Opens the report in Chromium (Playwright), shows every registered result the way the
    viewer's own buttons do, and checks that each image lies wholly inside the window and
    each HTML page shows its table; a screenshot of each view is kept under tmp_path."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed")
    executable = chromium_executable()
    if not executable:
        pytest.skip("no Chromium (install it, or set SMOE_CHROMIUM)")
    width, height = window
    errors = []
    with sync_api.sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        except Exception as exc:  # the machine's browser, not the report, is at fault
            pytest.skip(f"Chromium at {executable} did not start: {str(exc)[:200]}")
        page = browser.new_page(viewport={"width": width, "height": height})
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.goto((built_workflow / "report.html").as_uri())
        page.wait_for_function("typeof app !== 'undefined'")
        for path, entry in report["results"].items():
            mime = entry["mime_type"]
            view = "img" if mime.startswith("image/") else "html"
            page.evaluate(
                "([view, path]) => app.setView({content: view, "
                "contentPath: results[path].data_uri, resultPath: path})",
                [view, path],
            )
            name = path.rsplit("/", 1)[1]
            if view == "img":
                image = page.locator("img[src^='data:image']").last
                image.wait_for()
                page.wait_for_function(
                    "img => img.complete && img.naturalWidth > 0", arg=image.element_handle()
                )
                box = image.bounding_box()
                inside = (
                    box["x"] >= 0
                    and box["y"] >= 0
                    and box["x"] + box["width"] <= width + 0.5
                    and box["y"] + box["height"] <= height + 0.5
                )
                assert inside, (name, window, box)
            else:
                frame = page.locator("iframe").last
                frame.wait_for()
                assert frame.content_frame.locator("h1").count() == 1, name
                if "summary" in name:
                    assert frame.content_frame.locator("table").count() == 2
            page.screenshot(path=str(tmp_path / f"{width}x{height}-{name}.png"))
        browser.close()
    assert errors == []
