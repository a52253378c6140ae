"""CUDA paths: mixed-precision training and evaluation. Skipped where no GPU is present."""

import pytest
import torch

from smoe.config import validate_config
from smoe.core.train.device import resolve_precision
from smoe.families.heat.config import model_spec
from smoe.families.heat.evaluate import evaluate_checkpoint
from smoe.families.heat.simulation import HeatParams
from smoe.families.heat.store import simulate_split
from smoe.families.heat.task import train
from smoe.nn.routing import RoutingOptions, route

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def stores(tmp_path_factory, small_mask):
    folder = tmp_path_factory.mktemp("cuda")
    params = HeatParams((0.0025, 0.025, 0.25), steps=8)
    return {
        split: simulate_split(
            small_mask, params, seed, runs, folder / f"{split}.zarr", progress=False
        )
        for split, seed, runs in (("train", 1, 6), ("val", 2, 2), ("test", 3, 2))
    }


def test_auto_precision_is_bf16_or_fp16_on_cuda_and_fp32_on_cpu():
    assert resolve_precision("auto", torch.device("cpu")) is None
    assert resolve_precision("auto", torch.device("cuda")) in (torch.bfloat16, torch.float16)
    assert resolve_precision("fp32", torch.device("cuda")) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_routing_stays_float32_under_cuda_autocast(dtype):
    y = torch.randn(4, 3, 1, 16, 16, device="cuda")
    logits = torch.randn(4, 3, 16, 16, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        r = route(y.to(dtype), logits.to(dtype), RoutingOptions(), True, {})
        out, idx, scores = r.out, r.idx, r.scores
    assert out.dtype == torch.float32 and scores.dtype == torch.float32
    assert torch.equal(idx, logits.to(dtype).float().argmax(1, keepdim=True))


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("kind", ["smoe", "cnn"])
def test_mixed_precision_training_and_evaluation_on_cuda(stores, tmp_path, precision, kind):
    options = (
        {
            "gate": "latent",
            "rc_loss": True,
            "damping": True,
            "damping_factor": 0.1,
            "expert_init": "identity",
        }
        if kind == "smoe"
        else {"hidden": [4]}
    )
    config = validate_config(
        {
            "models": {"m": {"kind": kind, "options": options}},
            "train": {
                "device": "cuda",
                "precision": precision,
                "epochs": 3,
                "batch_size": 8,
                "lr": 0.01,
            },
        }
    )
    summary = train(
        model_spec(config, "m"), stores["train"], stores["val"], 0, tmp_path, progress=False
    )
    assert summary["device"].startswith("cuda")
    assert (
        summary["precision"] == {"bf16": "bfloat16", "fp16": "float16", "fp32": "fp32"}[precision]
    )
    assert summary["epochs"] == 3
    result = evaluate_checkpoint(tmp_path / "best.pt", stores["test"], device="cuda")
    on_cpu = evaluate_checkpoint(tmp_path / "best.pt", stores["test"], device="cpu")
    # test metrics are float32 wherever they are computed: GPU and CPU agree
    assert result["device"].startswith("cuda") and result["precision"] == "fp32"
    assert result["metrics"] == pytest.approx(on_cpu["metrics"], rel=1e-4, abs=1e-9)
    if kind == "smoe":
        assert result["routing"]["confusion"] == on_cpu["routing"]["confusion"]
        history = (tmp_path / "history.csv").read_text()
        assert "train_rc" in history


def test_cuda_training_resumes_to_the_uninterrupted_result(stores, tmp_path):
    def spec(epochs):
        config = validate_config(
            {
                "models": {"m": {"kind": "cnn", "options": {"hidden": [2]}}},
                "train": {"device": "cuda", "precision": "fp32", "epochs": epochs, "batch_size": 8},
            }
        )
        return model_spec(config, "m")

    whole = train(spec(4), stores["train"], stores["val"], 0, tmp_path / "a", progress=False)
    from smoe.families.heat.task import Trainer

    trainer = Trainer(spec(4), stores["train"], stores["val"], 0, tmp_path / "b", False)
    original = trainer._validate
    calls = {"n": 0}

    def interrupt():
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original()

    trainer._validate = interrupt
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    resumed = train(spec(4), stores["train"], stores["val"], 0, tmp_path / "b", progress=False)
    assert resumed["val_metrics"] == pytest.approx(whole["val_metrics"], rel=1e-6)


@pytest.mark.parametrize("attentive", [False, True])
def test_stochastic_gated_variants_train_on_cuda(tmp_path, attentive):
    """The stochastic routes are drawn on the GPU from the trainer's `routes` stream (a CPU
    generator with CUDA probabilities would raise), and a resumed run draws the same."""
    from smoe.families.gated.store import write_image_split
    from smoe.families.gated.task import evaluate_gated_checkpoint, train_gated

    stores = {
        split: write_image_split("digits", None, split, 0, 0.1, tmp_path / f"{split}.zarr")
        for split in ("train", "val", "test")
    }
    spec = {
        "name": "stochastic",
        "kind": "gated_moe",
        "options": {"experts": 3, "variant": "stochastic", "attentive": attentive},
        "train": {"epochs": 2, "batch_size": 64, "device": "cuda", "progress": False},
    }
    summary = train_gated(spec, stores["train"], stores["val"], 0, tmp_path / "m")
    assert summary["device"].startswith("cuda")
    result = evaluate_gated_checkpoint(tmp_path / "m" / "best.pt", stores["test"])
    assert 0 <= result["metrics"]["test_accuracy"] <= 100
    saved = torch.load(tmp_path / "m" / "last.pt", weights_only=True)
    assert saved["streams"]["routes"]["device"] == "cuda"
