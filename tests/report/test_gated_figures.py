"""The gated family's figures: routing heat maps and accuracy against usage entropy, their
numbers, their size in the report viewer, and bad inputs named."""

import json

import numpy as np
import pytest
from test_gated_table import result, write

from smoe.core.errors import InputError
from smoe.core.report.figures import fits_report_viewer, png_size
from smoe.families.gated.figures import (
    expert_order,
    plot_accuracy_usage,
    plot_gated_routing,
    published_points,
    routing_panels,
)
from smoe.families.gated.table import load_gated_runs


def models(folder, count, seeds=1):
    """``count`` MoE models (and one single) of ``seeds`` seeds each, as metrics files."""
    results = []
    for index in range(count):
        label = ("top-2", "expectation + L_imp", "distilled attentive + L_imp")[index % 3]
        for seed in range(seeds):
            results.append(result(f"m{index}", label, seed, 90.0 + index, 1.0 + 0.2 * index))
    results.append(result("single", "single", 0, 89.0, kind="gated_single"))
    return write(folder, results)


def test_expert_order_follows_the_dominant_class():
    counts = np.array(
        [
            [0, 0, 9, 1],  # dominant class 2
            [0, 0, 0, 0],  # never chosen: last
            [8, 1, 0, 0],  # class 0
            [0, 5, 0, 5],  # tie 1/3: the first, class 1
            [3, 0, 0, 0],  # class 0 too, all of its load: before expert 2 (8 of 9)
        ]
    )
    assert expert_order(counts) == [4, 2, 3, 0, 1]


def test_routing_panels_take_the_lowest_seed(tmp_path):
    results = [
        result("exp", "expectation", 3, 95.0, 1.2),
        result("exp", "expectation", 1, 96.0, 1.4),
        result("single", "single", 0, 90.0, kind="gated_single"),
    ]
    results[1]["routing"]["matrix"][0] = [10, 5, 0, 0, 0, 0, 0, 0, 0, 0]
    panels = routing_panels(load_gated_runs(write(tmp_path, results)))
    assert len(panels) == 1  # the single model has no gate
    panel = panels[0]
    assert (panel.seed, panel.seeds, panel.usage_entropy) == (1, 2, 1.4)
    shares = panel.shares
    assert shares[0, 1] == pytest.approx(5 / 15) and shares[1, 1] == pytest.approx(10 / 15)
    assert np.allclose(shares.sum(axis=0), 1.0)  # every class's samples, shared out


@pytest.mark.parametrize("count", [1, 4, 12])
def test_routing_figure_fits_the_viewer(tmp_path, count):
    out = tmp_path / "routing.png"
    plot_gated_routing(models(tmp_path, count, seeds=2 if count == 4 else 1), out)
    assert fits_report_viewer(out) and out.with_suffix(".svg").is_file()
    width, height = png_size(out)
    assert height <= 720 or (height <= 0.62 * width and height <= 1000)
    svg = out.with_suffix(".svg").read_text()
    assert "seed 0 (only seed)" in svg or "seed 0 (lowest of 2 seeds)" in svg
    assert "H_u 1.00, I(E;Y) 0.75 bits" in svg


@pytest.mark.parametrize("count", [1, 12])
def test_accuracy_usage_figure(tmp_path, count):
    out = tmp_path / "accuracy.png"
    plot_accuracy_usage(models(tmp_path, count, seeds=2), out)
    assert fits_report_viewer(out)
    svg = out.with_suffix(".svg").read_text()
    assert "published (MNIST, E = 10)" in svg and "log2 E = 3.32 (E = 10)" in svg
    assert "single: 89.00 %" in svg and "top-2" in svg


def test_published_points_are_mnist_ten_experts_with_usage():
    points = {point.label: point for point in published_points()}
    assert set(points) == {
        "expectation",
        "stochastic",
        "top-1",
        "top-2",
        "expectation + L_imp",
        "expectation + L_s",
    }
    assert (points["top-2"].usage_entropy, points["top-2"].test_accuracy) == (1.91, 96.25)


def test_bad_inputs_refused(tmp_path):
    out = tmp_path / "figure.png"
    for plot in (plot_gated_routing, plot_accuracy_usage):
        with pytest.raises(InputError, match="no metrics files"):
            plot([], out)
        singles = write(tmp_path, [result("single", "single", 0, 90.0, kind="gated_single")])
        with pytest.raises(InputError, match="none of the 1 metrics files is of a gated MoE"):
            plot(singles, out)
        other = write(tmp_path, [result("exp", "expectation", 0, 95.0, family="heat")])
        with pytest.raises(InputError, match=r"00_exp_seed0.json' belongs to family 'heat'"):
            plot(other, out)
    broken = write(tmp_path, [result("exp", "expectation", 0, 95.0)])
    values = json.loads(broken[0].read_text())
    values["routing"]["matrix"] = [[1, 2], [3]]
    broken[0].write_text(json.dumps(values))
    with pytest.raises(InputError, match=r"00_exp_seed0.json': routing.matrix is not"):
        plot_gated_routing(broken, out)
    assert not out.exists()
