"""SMoE training dynamics and expert x region-type counts: figures from real tiny trainings,
what they draw, their size in the report viewer, and errors without an SMoE."""

import csv
import json

import matplotlib.image
import numpy as np
import pytest
from matplotlib.patches import Rectangle
from matplotlib.text import Text

from smoe.config import validate_config
from smoe.core.errors import InputError
from smoe.core.report.figures import DPI
from smoe.families.heat import dynamics as D
from smoe.families.heat.config import model_spec
from smoe.families.heat.evaluate import evaluate_checkpoint
from smoe.families.heat.figures import load_histories, read_history
from smoe.families.heat.simulation import HeatParams
from smoe.families.heat.store import simulate_split
from smoe.families.heat.task import train

PARAMS = HeatParams((0.0025, 0.025, 0.25), steps=6)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EPOCHS = 3


def make_spec(kind, options):
    config = validate_config(
        {
            "models": {kind: {"kind": kind, "options": options}},
            "train": {"epochs": EPOCHS, "batch_size": 8, "threads": 1, "stop_at": None},
        }
    )
    return model_spec(config, kind)


@pytest.fixture(scope="module")
def workflow(tmp_path_factory, small_mask):
    """``results/models/<model>/seed<k>/`` of SMoE (seeds 0 and 1) and a CNN (seed 0), and
    the SMoE's metrics on the validation split, as the workflow lays them out."""
    root = tmp_path_factory.mktemp("results")
    stores = {
        split: simulate_split(
            small_mask, PARAMS, seed, runs, root / f"{split}.zarr", split=split, progress=False
        )
        for split, seed, runs in [("train", 41, 4), ("val", 42, 1)]
    }
    smoe = make_spec("smoe", {"gate": "latent", "experts": 3, "k": 1, "rc_loss": True})
    cnn = make_spec("cnn", {"hidden": [2]})
    histories, metrics = [], []
    for spec, seed in [(smoe, 0), (smoe, 1), (cnn, 0)]:
        folder = root / "models" / spec.name / f"seed{seed}"
        train(spec, stores["train"], stores["val"], seed, folder, progress=False)
        histories.append(folder / "history.csv")
        metrics.append(evaluate_checkpoint(folder / "best.pt", stores["val"], device="cpu"))
    return root, histories, metrics


def snapshot(fig):
    """What the tests check of a figure, after its layout (axes positions included)."""
    fig.draw_without_rendering()
    width, height = fig.get_size_inches()
    box = fig.get_tightbbox(fig.canvas.get_renderer())  # inches
    slack = 1 / DPI  # one pixel
    inside = min(box.x0, box.y0) >= -slack and box.x1 <= width + slack
    return {
        "pixels": (round(width * DPI), round(height * DPI)),
        "inside": inside and box.y1 <= height + slack,
        "axes": [
            {
                "title": ax.get_title(),
                "ylim": ax.get_ylim(),
                "yscale": ax.get_yscale(),
                "y0": round(ax.get_position().y0, 3),
                "lines": {
                    line.get_label(): (line.get_xdata(), line.get_ydata()) for line in ax.lines
                },
                "markers": [line.get_marker() for line in ax.lines],
                "outlined": [
                    (p.get_x(), p.get_y())
                    for p in ax.patches
                    if isinstance(p, Rectangle) and not p.get_fill()
                ],
                "texts": [t.get_text() for t in ax.texts],
                "xticks": [t.get_text() for t in ax.get_xticklabels()],
                "yticks": [t.get_text() for t in ax.get_yticklabels()],
            }
            for ax in fig.axes
        ],
        "texts": [t.get_text() for t in fig.findobj(Text)],
    }


@pytest.fixture
def drawn(monkeypatch):
    """Every figure the dynamics module saves, as it was just before it was written."""
    figures = []
    save = D.save_figure

    def keep(fig, out):
        figures.append(snapshot(fig))
        return save(fig, out)

    monkeypatch.setattr(D, "save_figure", keep)
    return figures


@pytest.fixture
def laid_out(monkeypatch):
    """Like ``drawn``, but nothing is rendered or written (the PNG's size is the figure's
    size at DPI: save_figure crops nothing)."""
    figures = []
    monkeypatch.setattr(D, "save_figure", lambda fig, out: figures.append(snapshot(fig)))
    return figures


def fits_viewer(width, height):
    return height <= 1000 and height / width <= 0.62


def assert_viewer_png(paths, folder):
    """PNG and SVG written, nothing partial left, and the PNG fits the report viewer."""
    png, svg = paths
    assert png.suffix == ".png" and svg.suffix == ".svg" and png.stem == svg.stem
    assert png.read_bytes()[:8] == PNG_MAGIC
    text = svg.read_text()
    assert text.startswith("<?xml") and text.rstrip().endswith("</svg>")
    assert "mask0" not in text
    assert not [p for p in folder.rglob("*") if "partial" in p.name]
    height, width = matplotlib.image.imread(png).shape[:2]
    assert fits_viewer(width, height), (width, height)
    return width, height


def test_dynamics_figure_from_real_histories(workflow, drawn, tmp_path):
    root, histories, _ = workflow
    paths = D.dynamics_figure(load_histories(histories), tmp_path / "dynamics.png")
    assert_viewer_png(paths, tmp_path)
    (figure,) = drawn
    axes = figure["axes"]
    assert len(axes) == 3  # one SMoE model (the CNN is skipped): three panels
    assert [ax["title"] for ax in axes] == [
        "misrouted fraction (training)",
        "routing-classification loss (training)",
        "routing agreement (validation)",
    ]
    assert axes[2]["ylim"][0] == 0 and 100 <= axes[2]["ylim"][1] <= 101
    for ax, column in zip(axes, D.DYNAMICS_COLUMNS, strict=True):
        labels = [label for label in ax["lines"] if not label.startswith("_")]
        assert labels == ["smoe seed 0", "smoe seed 1"]  # one line per seed
        assert ax["markers"].count("*") == 2  # each seed's best epoch
        for seed in (0, 1):
            folder = root / "models" / "smoe" / f"seed{seed}"
            history = read_history(folder / "history.csv")
            x, y = ax["lines"][f"smoe seed {seed}"]
            np.testing.assert_array_equal(x, np.arange(EPOCHS))
            np.testing.assert_array_equal(y, history[column])
            best = json.loads((folder / "train.json").read_text())["best_epoch"]
            bx, by = ax["lines"][f"_best smoe seed {seed}"]
            assert list(bx) == [best] and list(by) == [history[column][best]]
    agreement = np.concatenate([ax_y for _, ax_y in axes[2]["lines"].values()])
    assert np.all((agreement >= 0) & (agreement <= 100))
    assert "smoe" in figure["texts"] and "cnn seed 0" not in figure["texts"]


def test_dynamics_without_an_smoe_history_is_an_error(workflow, tmp_path):
    _, histories, _ = workflow
    cnn = [path for path in histories if path.parent.parent.name == "cnn"]
    with pytest.raises(InputError, match=r"no SMoE history was given.*cnn/seed0/history\.csv"):
        D.dynamics_figure(load_histories(cnn), tmp_path / "dynamics")
    with pytest.raises(InputError, match="no SMoE history was given"):
        D.dynamics_figure({}, tmp_path / "dynamics")
    assert not list(tmp_path.iterdir())


def test_expert_region_figure_from_real_metrics(workflow, drawn, tmp_path):
    _, _, metrics = workflow
    paths = D.expert_region_figure(metrics, tmp_path / "experts")
    assert_viewer_png(paths, tmp_path)
    (figure,) = drawn
    panels = [ax for ax in figure["axes"] if ax["xticks"] and "type 0" in ax["xticks"]]
    assert len(panels) == 2  # SMoE seeds 0 and 1; the CNN has no routing
    assert len(figure["axes"]) == 3  # and a colour bar
    for panel, result in zip(panels, metrics[:2], strict=True):
        routing = result["routing"]
        assert panel["title"] == (
            f"smoe seed {result['seed']}\nagreement {routing['agreement']:.1f} %"
        )
        assert panel["xticks"] == ["type 0", "type 1", "type 2"]
        confusion = np.asarray(routing["confusion"])
        counts = [text.split("\n")[0] for text in panel["texts"]]
        assert counts == [D.compact_count(v) for v in confusion.ravel()]
        outlined = {(round(x + 0.47), round(y + 0.47)) for x, y in panel["outlined"]}
        assert outlined == {(t, int(e)) for e, t in routing["expert_to_type"].items()}
    assert panels[0]["yticks"] == ["expert 0", "expert 1", "expert 2"]
    assert not any("mask" in text for text in figure["texts"])


def test_expert_region_figure_without_routing_is_an_error(workflow, tmp_path):
    _, _, metrics = workflow
    with pytest.raises(InputError, match=r"none of the results cnn seed 0 has a routing"):
        D.expert_region_figure(metrics[2:], tmp_path / "experts")
    broken = {**metrics[0], "routing": {"agreement": 50.0}}
    with pytest.raises(InputError, match=r"'a\.json'.*lacks 'confusion', 'expert_to_type'"):
        D.expert_region_figure([broken], tmp_path / "experts", sources=["a.json"])


def test_row_shares_and_compact_counts():
    shares = D.row_shares(np.array([[3, 1, 0], [0, 0, 0]]))
    np.testing.assert_array_equal(shares, [[75, 25, 0], [0, 0, 0]])
    assert [D.compact_count(v) for v in (0, 950, 12_345, 1_449_000, 123_456_789)] == [
        "0",
        "950",
        "12.3k",
        "1.45M",
        "123M",
    ]


def write_history(path, epochs, seed, smoe=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = ["epoch", "train_loss", "train_rc", "train_misrouted", "val_prcntclose1.0"]
    columns += ["val_routing_agreement"] if smoe else []
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for epoch in range(epochs):
            decay = np.exp(-epoch / (3 + seed))
            rc, misrouted = (0.5 * decay**3, 0.6 * decay) if smoe else (0.0, 0.0)
            row = [epoch, decay, rc, misrouted, 100 - 50 * decay, 100 - 60 * decay]
            writer.writerow(row[: len(columns)])
    (path.parent / "train.json").write_text(json.dumps({"best_epoch": epochs - 1}))
    return path


def synthetic_metrics(model, seed, experts=3):
    rng = np.random.default_rng(seed)
    confusion = rng.integers(0, 5_000_000, (experts, 3))
    return {
        "model": model,
        "seed": seed,
        "metrics": {},
        "routing": {
            "agreement": 90.0,
            "confusion": confusion.tolist(),
            "expert_to_type": {str(e): (e + seed) % 3 for e in range(min(experts, 3))},
        },
    }


@pytest.mark.parametrize(("models", "seeds"), [(1, 1), (1, 5), (2, 6), (3, 10)])
def test_figures_fit_the_report_viewer(tmp_path, laid_out, models, seeds):
    histories = [
        write_history(tmp_path / "m" / f"smoe{m}" / f"seed{s}" / "history.csv", 12, s)
        for m in range(models)
        for s in range(seeds)
    ]
    histories.append(write_history(tmp_path / "m" / "cnn" / "seed0" / "history.csv", 12, 0, False))
    D.dynamics_figure(load_histories(histories), tmp_path / "d")
    metrics = [synthetic_metrics(f"smoe{m}", s, 3 + m) for m in range(models) for s in range(seeds)]
    D.expert_region_figure(metrics, tmp_path / "e")
    for figure in laid_out:
        assert fits_viewer(*figure["pixels"]), figure["pixels"]
        assert figure["inside"], "a title, label or legend is cut off"
    dynamics, experts = laid_out
    assert len(dynamics["axes"]) == 3 * models
    for ax in dynamics["axes"]:
        assert len([k for k in ax["lines"] if not k.startswith("_")]) == seeds
    panels = [ax for ax in experts["axes"] if ax["xticks"]]
    assert len(panels) == models * seeds
    assert len({ax["title"].split(" seed")[0] for ax in panels}) == models
    rows = models * -(-seeds // 5)  # at most 5 seeds to a row
    assert len({ax["y0"] for ax in panels}) == rows


def test_rc_loss_axis_is_logarithmic_only_over_two_decades(tmp_path, laid_out):
    wide = write_history(tmp_path / "m" / "smoe" / "seed0" / "history.csv", 12, 0)  # decay^3
    D.dynamics_figure({"smoe": [wide]}, tmp_path / "wide")
    rows = read_history(wide)
    assert rows["train_rc"].max() / rows["train_rc"].min() > 100
    narrow = write_history(tmp_path / "n" / "smoe" / "seed0" / "history.csv", 3, 0)
    D.dynamics_figure({"smoe": [narrow]}, tmp_path / "narrow")
    assert [figure["axes"][1]["yscale"] for figure in laid_out] == ["log", "linear"]
    assert D._log_scale([rows["train_rc"]]) and not D._log_scale([read_history(narrow)["train_rc"]])
    assert not D._log_scale([np.array([0.0, 1.0, 1e-5])])  # a zero: never log
