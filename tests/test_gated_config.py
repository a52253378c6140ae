"""The `gated` config section: shipped configs load, and cross-key problems name the key."""

import gzip

import numpy as np
import pytest
import yaml

from smoe.config import validate_config
from smoe.core.errors import InputError
from smoe.families.gated.config import gated_dependencies, gated_model_spec, gated_models_to_run


def config_with(**gated):
    return {"models": {"p": {"kind": "persistence"}}, "gated": gated}


def mnist_files(folder):
    folder.mkdir()
    for prefix, n in (("train", 10), ("t10k", 4)):
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        header = b"".join(v.to_bytes(4, "big") for v in (2051, n, 28, 28))
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as handle:
            handle.write(header + images.tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as handle:
            handle.write(b"".join(v.to_bytes(4, "big") for v in (2049, n)) + bytes(n))
    return folder


def test_the_mnist_config_loads_once_its_folder_holds_the_files(repo, tmp_path):
    raw = yaml.safe_load((repo / "config" / "mnist.yaml").read_text())
    with pytest.raises(InputError, match="config key 'gated.data.folder': mnist folder"):
        validate_config(raw)
    raw["gated"]["data"]["folder"] = str(mnist_files(tmp_path / "mnist"))
    config = validate_config(raw)
    assert config["models"] == {} and len(gated_models_to_run(config)) == 15
    assert gated_dependencies(config, "distilled_attentive_importance") == {
        "teacher": "attentive_expectation_importance"
    }
    spec = gated_model_spec(config, "top2")
    assert spec.train["batch_size"] == 512 and spec.options == {"variant": "topk", "top_k": 2}
    assert spec.train["weight_decay"] is None and spec.train["select"]["mode"] == "last"


@pytest.mark.parametrize("name", ["config.yaml", "paper.yaml"])
def test_the_shipped_configs_run_the_embedded_mnist_subset(repo, name):
    config = validate_config(yaml.safe_load((repo / "config" / name).read_text()))
    assert config["gated"]["data"]["dataset"] == "mnist5k"
    assert config["gated"]["data"]["folder"] is None
    models = config["gated"]["models"]
    assert models["single"] == {"kind": "gated_single", "options": {}, "train": {}}
    assert models["expectation_importance"]["options"]["importance"] == 0.2


def test_the_paper_config_has_every_published_mnist_row_with_its_weights(repo):
    from smoe.families.gated.spec import gated_label
    from smoe.families.gated.table import load_gated_references

    config = validate_config(yaml.safe_load((repo / "config" / "paper.yaml").read_text()))
    models = config["gated"]["models"]
    labels = {}
    for model in models.values():
        teacher = None
        if model["kind"] == "gated_distilled":
            teacher = models[model["options"]["teacher"]]["options"]
        labels[gated_label(model["kind"], model["options"], teacher)] = model["options"]
    published = {
        row["label"]
        for row in load_gated_references()
        if row["dataset"] == "mnist" and row["experts"] == 10
    }
    assert published <= set(labels)
    assert labels["top-2 + L_imp"]["importance"] == 0.4
    assert labels["expectation + L_s"]["similarity"] == {"beta_s": 1e-5, "beta_d": 1e-2}
    assert labels["top-2 + L_s"]["similarity"] == {"beta_s": 1e-5, "beta_d": 1e-6}
    assert labels["attentive top-2 + L_s"]["similarity"] == {"beta_s": 1e-5, "beta_d": 1e-4}
    assert {"EM", "single", "single (mixture-sized)"} <= set(labels)
    assert config["gated"]["seeds"] == list(range(10))


def test_models_may_be_empty_only_when_another_family_runs():
    with pytest.raises(InputError, match="config key 'models': no models are defined"):
        validate_config({"models": {}})
    config = validate_config(
        {"models": {}, "gated": {"enabled": True, "models": {"e": {"kind": "gated_moe"}}}}
    )
    assert config["gated"]["train"]["epochs"] == 100


@pytest.mark.parametrize(
    "gated, message",
    [
        (
            {"data": {"folder": "somewhere"}},
            "config key 'gated.data.folder': mnist5k comes with an installed package and reads "
            "no files",
        ),
        (
            {"data": {"dataset": "cifar10"}},
            "config key 'gated.data.folder': dataset cifar10 is read from its files",
        ),
        ({"enabled": True}, "config key 'gated.models': no models are defined"),
        (
            {
                "models": {
                    "m": {"kind": "gated_moe", "options": {"variant": "stochastic", "top_k": 2}}
                }
            },
            "config key 'gated.models.m.options.top_k': top_k=2 applies to variant topk only",
        ),
        (
            {"models": {"m": {"kind": "gated_moe", "options": {"similarity": {"beta_s": 0}}}}},
            "config key 'gated.models.m.options.similarity': give beta_s and/or beta_d above 0",
        ),
        (
            {
                "models": {
                    "m": {
                        "kind": "gated_moe",
                        "options": {"experts": 2, "top_k": 3, "variant": "topk"},
                    }
                }
            },
            "config key 'gated.models.m.options.top_k': top_k=3 must be between 1 and experts=2",
        ),
        (
            {
                "models": {
                    "m": {"kind": "gated_moe"},
                    "d": {"kind": "gated_distilled", "options": {"teacher": "m", "importance": 1}},
                }
            },
            "config key 'gated.models.d.options.importance': unknown option of model kind "
            "'gated_distilled'; known: teacher",
        ),
        (
            {"models": {"m": {"kind": "gated_moe", "train": {"early_stop": 5}}}},
            "config key 'gated.models.m.train.early_stop': early stopping needs a best epoch",
        ),
        (
            {
                "models": {
                    "m": {
                        "kind": "gated_moe",
                        "options": {"similarity": {"beta_s": 1, "features": "x"}},
                    }
                }
            },
            "config key 'gated.models.m.options.similarity.features': 'x' is not a model",
        ),
        (
            {"models": {"m": {"kind": "gated_moe", "train": {"batch_size": 0}}}},
            "config key 'gated.models.m.train.batch_size'",
        ),
        (
            {"models": {"m": {"kind": "gated_mixture"}}},
            "config key 'gated.models.m.kind'",
        ),
    ],
)
def test_a_bad_gated_section_names_its_key(gated, message):
    with pytest.raises(InputError) as error:
        validate_config(config_with(**gated))
    assert message in str(error.value)


def test_processes_are_checked_before_any_job():
    smoe = {"kind": "smoe", "options": {"noise": True, "aux": {"importance": 0.1}}}
    raw = {
        "models": {"s": smoe, "c": {"kind": "cnn", "train": {"processes": 64}}},
        "train": {"processes": 2, "batch_size": 32},
        "gated": {
            "train": {"processes": 4, "batch_size": 2},
            "models": {"m": {"kind": "gated_moe"}},
        },
    }
    with pytest.raises(InputError) as error:
        validate_config(raw)
    message = str(error.value)
    assert (
        "config key 'train.processes': 2 processes for model 's': its aux losses importance"
        in message
    )
    assert "models.s.options.noise draws routing noise sample by sample" in message
    assert (
        "config key 'models.c.train.processes': 64 processes for model 'c', but its batch_size 32"
        in message
    )
    assert (
        "config key 'gated.train.processes': 4 processes for model 'm', but its batch_size 2"
        in message
    )
    fine = validate_config({"models": {"c": {"kind": "cnn"}}, "train": {"processes": 2}})
    assert fine["train"]["processes"] == 2
