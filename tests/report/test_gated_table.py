"""The gated family's results table: CSV numbers, published figures beside ours with their
citation, the paper's orderings on our numbers, and bad inputs named."""

import csv
import json
import math

import pytest
from command_runs import write_results

from smoe.core.errors import InputError
from smoe.families.gated.orderings import FAILS, HOLDS, UNCHECKED, gated_orderings
from smoe.families.gated.table import (
    CSV_COLUMNS,
    REFERENCES,
    load_gated_references,
    write_gated_table,
)

HEADER = (
    "variant,label,dataset,seeds,test_accuracy_mean,test_accuracy_std,mutual_information_mean,"
    "mutual_information_std,sample_entropy_mean,sample_entropy_std,usage_entropy_mean,"
    "usage_entropy_std,per_task_entropy_mean,per_task_entropy_std,selected_seed,"
    "selected_last_val_accuracy,selected_test_accuracy,selected_mutual_information,"
    "selected_sample_entropy,selected_usage_entropy,selected_per_task_entropy,params"
)


def result(
    model,
    label,
    seed,
    accuracy,
    usage=1.0,
    *,
    kind="gated_moe",
    experts=10,
    last_val=None,
    **changes,
):
    """A metrics dict of exactly the shape ``evaluate_gated_checkpoint`` writes; the last
    epoch's validation accuracy is the test accuracy minus one unless given."""
    single = kind == "gated_single"
    last_val = accuracy - 1.0 if last_val is None else last_val
    values = {
        "family": "gated",
        "dataset": "mnist",
        "model": model,
        "kind": kind,
        "label": label,
        "options": {} if single else {"experts": experts},
        "variant": None if single else "expectation",
        "top_k": None if single else 1,
        "attentive": None if single else False,
        "experts": None if single else experts,
        "architecture": "mnist",
        "hard_routing": None if single else False,
        "seed": seed,
        "params": 5010 if single else 4990,
        "best_epoch": 4,
        "epochs": 5,
        "kept": "last epoch",
        "val_accuracy": last_val,
        "last_val_accuracy": last_val,
        "train_time_s": 1.5,
        "device": "cpu",
        "routing_rule": "argmax",
        "metrics": {
            "test_accuracy": accuracy,
            "mutual_information": None if single else usage - 0.25,
            "sample_entropy": None if single else 0.5,
            "usage_entropy": None if single else usage,
            "per_task_entropy": None if single else 0.25,
        },
        "routing": None
        if single
        else {
            "matrix": [[10 if e == c else 0 for c in range(10)] for e in range(experts)],
            "experts": experts,
            "classes": 10,
        },
        "store": "results/gated/data/test.zarr",
        "train_store": "results/gated/data/train.zarr",
        "val_store": "results/gated/data/val.zarr",
    }
    values.update(changes)
    return values


def write(folder, results):
    return write_results(folder, results, lambda v: f"{v['model']}_seed{v['seed']}")


def table(tmp_path, results):
    outputs = write_gated_table(write(tmp_path, results), tmp_path / "table")
    with open(outputs["csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    return outputs, rows


MIXED = [
    result("exp", "expectation", 0, 95.0, 1.5),
    result("imp", "expectation + L_imp", 0, 97.0, 3.2),
    result("exp", "expectation", 1, 96.0, 1.75),
    result("imp", "expectation + L_imp", 1, 98.0, 3.3),
    result("exp", "expectation", 2, 97.0, 2.0),
    result("single", "single", 0, 94.0, kind="gated_single"),
]


def test_csv_header_order_and_hand_computed_numbers(tmp_path):
    outputs, rows = table(tmp_path, MIXED)
    assert outputs["csv"].read_text().splitlines()[0] == HEADER
    assert ",".join(CSV_COLUMNS) == HEADER
    # one row per model, in first-seen order, whatever order the seeds come in
    assert [row["variant"] for row in rows] == ["exp", "imp", "single"]
    exp, imp, single = rows
    assert exp["label"] == "expectation" and exp["dataset"] == "mnist" and exp["seeds"] == "3"
    assert float(exp["test_accuracy_mean"]) == pytest.approx(96.0)
    assert float(exp["test_accuracy_std"]) == pytest.approx(1.0)  # ddof 1 of 95, 96, 97
    assert float(exp["usage_entropy_mean"]) == pytest.approx(1.75)
    assert float(exp["usage_entropy_std"]) == pytest.approx(0.25)
    assert float(exp["mutual_information_mean"]) == pytest.approx(1.5)
    assert float(imp["test_accuracy_std"]) == pytest.approx(math.sqrt(2) / 2)
    assert float(imp["sample_entropy_std"]) == 0.0 and exp["params"] == "4990"
    # one seed: std empty; the single model: entropies empty
    assert single["seeds"] == "1" and single["test_accuracy_std"] == ""
    assert float(single["test_accuracy_mean"]) == 94.0 and single["params"] == "5010"
    for key in ("mutual_information", "sample_entropy", "usage_entropy", "per_task_entropy"):
        assert single[f"{key}_mean"] == single[f"{key}_std"] == ""
    # the published rule on our seeds: the highest last-epoch validation accuracy (seed 2)
    assert exp["selected_seed"] == "2" and float(exp["selected_test_accuracy"]) == 97.0
    assert float(exp["selected_last_val_accuracy"]) == 96.0
    assert float(exp["selected_usage_entropy"]) == 2.0
    assert not list((tmp_path / "table").glob("*.partial"))


def test_the_selection_rule_reads_the_last_validation_epoch_not_the_test(tmp_path):
    results = [
        result("exp", "expectation", 0, 97.0, last_val=90.0),
        result("exp", "expectation", 1, 91.0, last_val=95.0),
        result("exp", "expectation", 2, 99.0, last_val=95.0),  # a tie: the lower seed wins
    ]
    _, rows = table(tmp_path, results)
    assert rows[0]["selected_seed"] == "1" and float(rows[0]["selected_test_accuracy"]) == 91.0


def test_published_figures_beside_ours_with_citation(tmp_path):
    outputs, _ = table(tmp_path, MIXED)
    markdown = outputs["markdown"].read_text()
    lines = markdown.splitlines()
    ours = next(i for i, line in enumerate(lines) if line.startswith("| expectation (mean ± std)"))
    assert "| MNIST | 10 | 3 (mean ± std) |" in lines[ours]
    assert "| 96.00 ± 1.00 | 1.50 ± 0.25 | 0.50 ± 0.00 | 1.75 ± 0.25 |" in lines[ours]
    selected = lines[ours + 1]
    assert selected.startswith("| expectation (selected run) | MNIST | 10 | seed 2 of 3 |")
    assert "| 97.00 | 1.75 | 0.50 | 2.00 |" in selected
    published = lines[ours + 2]
    assert published.startswith(
        "| expectation, MNIST *(published)* [1] | MNIST | 10 | best of 10 |"
    )
    assert "| 95.38 | 1.49 |  | 1.49 |" in published
    assert "| expectation + L_imp, MNIST *(published)* [1] | MNIST | 10 | best of 10 |" in markdown
    assert "[1] Y. Krishnamurthy, C. Watkins, T. Gaertner. Improving Expert" in markdown
    assert "lowest last-epoch validation error" in markdown
    assert "follow the authors' released code" in markdown
    html = outputs["html"].read_text()
    assert html.count('<tr class="published">') == 2
    assert "arXiv:2302.14703" in html and 'id="cite-1"' in html
    assert "Published orderings on our data" in html and "Download table.csv" in html
    # the MNIST single figure is for E = 5: not beside our single of E = 10, and said so
    assert "single (single, E = 10): the paper&#x27;s MNIST figure is for E = 5, not 10" in html


def test_the_embedded_subset_sits_beside_full_mnist_with_a_note(tmp_path):
    results = [
        result("exp", "expectation", 0, 90.0, dataset="mnist5k"),
        result("em", "EM", 0, 85.0, dataset="mnist5k"),
    ]
    markdown = table(tmp_path, results)[0]["markdown"].read_text()
    assert "# Gated modular MoE on MNIST, 5,000-image subset" in markdown
    assert "| expectation, MNIST *(published)* [1] |" in markdown
    assert "3,500 train, 500 validation, 1,000 test" in markdown
    assert "EM: EM-style hard routing is not in the published code" in markdown


def test_figures_of_another_data_set_or_size_are_not_shown(tmp_path):
    results = [
        result("exp", "expectation", 0, 90.0, dataset="digits"),
        result("t2", "top-2", 0, 91.0, dataset="digits"),
    ]
    outputs, _ = table(tmp_path, results)
    html = outputs["html"].read_text()
    assert '<tr class="published">' not in html and "arXiv:2302.14703" not in html
    assert (
        "No published figure is shown: the paper&#x27;s figures are on CIFAR-10 and MNIST" in html
    )
    assert "ours on digits (scikit-learn" in html
    # MNIST with 4 experts: the E = 10 figure is not put beside it
    outputs, _ = table(tmp_path, [result("t2", "top-2", 0, 91.0, experts=4)])
    markdown = outputs["markdown"].read_text()
    assert "*(published)*" not in markdown
    assert "top-2 (t2, E = 4): the paper's MNIST figure is for E = 10, not 4" in markdown


def test_five_expert_figures_only_beside_five_experts(tmp_path):
    results = [
        result("moe5", "expectation", 0, 96.0, experts=5),
        result("single5", "single", 0, 90.0, kind="gated_single", options={"experts": 5}),
    ]
    markdown = table(tmp_path, results)[0]["markdown"].read_text()
    assert "| expectation (paper: MoE), MNIST *(published)* [1] | MNIST | 5 |  |  | 96.20 |" in (
        markdown
    )
    assert "| single, MNIST *(published)* [1] | MNIST | 1 |  |  | 90.40 |" in markdown
    assert "filed under the plain expectation gate" in markdown


def test_references_are_cited_and_complete():
    rows = load_gated_references(REFERENCES)
    assert len(rows) == 19
    distilled = [row for row in rows if row["label"].startswith("distilled")]
    assert [row["source_label"] for row in distilled] == ["distilled attentive + L_imp"]
    assert all("arXiv:2302.14703" in row["citation"] and "2023" in row["citation"] for row in rows)
    mnist = {
        row["label"]: row for row in rows if row["dataset"] == "mnist" and row["experts"] == 10
    }
    assert len(mnist) == 11
    assert mnist["top-2"]["values"]["usage_entropy"] == 1.91
    assert mnist["top-2 + L_imp"]["values"]["usage_entropy"] is None
    assert {row["label"] for row in rows if row["dataset"] == "cifar10"} == {
        "single",
        "expectation",
        "top-2",
        "attentive top-2 + L_s",
    }


def test_references_without_citation_refused(tmp_path):
    bad = tmp_path / "refs.yaml"
    bad.write_text("rows:\n  - {label: top-2, dataset: mnist, experts: 10, test_accuracy: 96}\n")
    with pytest.raises(InputError, match=r"rows\[0\] has no citation"):
        load_gated_references(bad)


# --- orderings ----------------------------------------------------------------------------


def row(label, accuracy, usage=None, std=None, *, kind="gated_moe", experts=10, variant=None):
    return {
        "variant": variant or label,
        "label": label,
        "kind": kind,
        "experts": experts,
        "test_accuracy_mean": accuracy,
        "test_accuracy_std": math.nan if std is None else std,
        "usage_entropy_mean": math.nan if usage is None else usage,
        "usage_entropy_std": math.nan,
    }


def by_ordering(checks):
    return {(check.ordering[:3], check.compared): check for check in checks}


def test_orderings_hold():
    rows = [
        row("expectation", 95.0, 1.5, 0.5),
        row("expectation + L_imp", 94.7, 3.3, 0.3),  # 0.3 lower: within the larger std 0.5
        row("top-1", 94.0, 1.3),
        row("top-2", 94.0, 1.9),  # equal to top-1: "at least as accurate" holds
        row("top-2 + L_imp", 97.0, 3.2),
        row("single", 93.0, kind="gated_single"),
        row("single (mixture-sized)", 99.0, kind="gated_single"),  # not the baseline of (c)
    ]
    checks = by_ordering(gated_orderings(rows))
    assert {check.status for check in checks.values()} == {HOLDS}
    a = checks["(a)", "expectation + L_imp vs expectation"]
    assert "H_u 1.50 → 3.30 bits (+1.80; log2 E = 3.32)" in a.detail
    assert "(-0.30 points, allowed down to -0.50)" in a.detail
    assert checks["(b)", "top-2 vs top-1"].detail == "accuracy 94.00 % vs 94.00 % (+0.00 points)"
    c = checks["(c)", "5 MoE variant(s) of E = 10 vs single"]
    assert "the closest top-1 94.00 % (+1.00 points)" in c.detail and c.verdict == "✓ holds"
    d = checks["(d)", "top-1"]
    assert d.detail == "H_u 1.30 bits (log2 E = 3.32)"


def test_a_collapsed_top1_gate_is_reported():
    checks = by_ordering(gated_orderings([row("top-1", 90.0, 0.0)]))
    d = checks["(d)", "top-1"]
    assert d.status == FAILS and d.shortfall == pytest.approx(-0.5)
    assert d.why.startswith("H_u 0.00 bits: the gate sends nearly every sample to one expert")


def test_orderings_fail_with_by_how_much():
    rows = [
        row("expectation", 95.0, 1.5, 0.2),
        row("expectation + L_imp", 94.0, 1.4, 0.3),  # 1.0 lower, allowed 0.3; H_u down
        row("top-1", 96.5, 1.3),
        row("top-2", 96.0, 1.9),
        row("single", 95.5, kind="gated_single"),
        row("EM", 90.0, 2.0, experts=5),
    ]
    checks = by_ordering(gated_orderings(rows))
    a = checks["(a)", "expectation + L_imp vs expectation"]
    assert a.status == FAILS and a.shortfall == pytest.approx(-0.1)
    assert a.why == ("H_u not raised (-0.10 bits); accuracy lowered -0.70 points beyond the spread")
    assert a.verdict.startswith("✗ does not hold: H_u not raised")
    b = checks["(b)", "top-2 vs top-1"]
    assert b.status == FAILS and b.shortfall == pytest.approx(-0.5)
    assert b.why == "top-2 -0.50 points against top-1"
    c = checks["(c)", "4 MoE variant(s) of E = 10 vs single"]
    assert c.status == FAILS and c.shortfall == pytest.approx(-1.5)
    assert c.why == "2 of 4 not above: expectation + L_imp -1.50, expectation -0.50 points"
    assert "not compared (no single of their size): EM (E = 5)" in c.detail
    # top-2 + L_imp was not run, but top-2 was: that comparison is said to be unchecked
    unchecked = checks["(a)", "top-2 + L_imp vs top-2"]
    assert unchecked.status == UNCHECKED and unchecked.detail == "no model labelled 'top-2 + L_imp'"


def test_orderings_not_checked_without_their_labels():
    checks = gated_orderings([row("EM", 90.0, 1.0)])
    assert [check.status for check in checks] == [UNCHECKED] * 4
    assert [check.compared for check in checks] == [
        "expectation + L_imp vs expectation",
        "top-2 vs top-1",
        "MoE variants vs single",
        "top-1 vs top-1",
    ]
    assert checks[2].detail == "no single model"
    # same labels, other numbers of experts: nothing to compare either
    checks = by_ordering(
        gated_orderings([row("top-2", 96.0, experts=4), row("top-1", 95.0, experts=10)])
    )
    top_k = checks["(b)", "top-2 vs top-1"]
    assert top_k.status == UNCHECKED and top_k.detail == "no two of the same number of experts"


def test_orderings_section_in_markdown(tmp_path):
    results = [*MIXED, result("t1", "top-1", 0, 97.5, 1.2), result("t2", "top-2", 0, 96.5, 1.8)]
    outputs = table(tmp_path, results)[0]
    markdown = outputs["markdown"].read_text()
    section = markdown.split("## Published orderings on our data")[1]
    # words left-aligned and wrapped in HTML (column style "text"), numbers right-aligned
    html = outputs["html"].read_text()
    assert '<td class="text">✗ does not hold: top-2 -1.00 points against top-1</td>' in html
    assert '<td class="num">96.00 ± 1.00</td>' in html
    assert (
        "| (b) top-2 at least as accurate as top-1 | top-2 vs top-1 | ✗ does not hold: top-2 "
        "-1.00 points" in section
    )
    assert "| ✓ holds | H_u 1.75 → 3.25 bits" in section
    assert "Of 5 comparisons: 3 hold, 1 do not hold, 1 not checked." in section


# --- bad inputs ---------------------------------------------------------------------------


def test_bad_inputs_named(tmp_path):
    out = tmp_path / "out"
    same = write(
        tmp_path, [result("exp", "expectation", 0, 95.0), result("exp", "expectation", 0, 96.0)]
    )
    with pytest.raises(InputError, match=r"00_exp_seed0.json.*01_exp_seed0.json.*seed 0"):
        write_gated_table(same, out)
    mixed = write(
        tmp_path,
        [result("exp", "expectation", 0, 95.0), result("b", "top-2", 0, 9, dataset="digits")],
    )
    with pytest.raises(InputError, match=r"01_b_seed0.json' is on 'digits'"):
        write_gated_table(mixed, out)
    other = write(tmp_path, [result("exp", "expectation", 0, 95.0, family="clusters")])
    with pytest.raises(InputError, match=r"00_exp_seed0.json' belongs to family 'clusters'"):
        write_gated_table(other, out)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(InputError, match=r"broken.json' is not JSON"):
        write_gated_table([broken], out)
    with pytest.raises(InputError, match=r"missing.json' does not exist"):
        write_gated_table([tmp_path / "missing.json"], out)
    no_entropy = write(tmp_path, [result("exp", "expectation", 0, 95.0)])
    values = json.loads(no_entropy[0].read_text())
    values["metrics"]["usage_entropy"] = None
    no_entropy[0].write_text(json.dumps(values))
    with pytest.raises(InputError, match=r"00_exp_seed0.json': metrics.usage_entropy is None"):
        write_gated_table(no_entropy, out)
    with pytest.raises(InputError, match="no metrics files"):
        write_gated_table([], out)
    assert not out.exists()


def test_seeds_of_one_model_must_agree(tmp_path):
    paths = write(
        tmp_path,
        [result("exp", "expectation", 0, 95.0), result("exp", "top-2", 1, 96.0)],
    )
    with pytest.raises(InputError, match=r"01_exp_seed1.json': model 'exp' has label 'top-2'"):
        write_gated_table(paths, tmp_path / "out")
