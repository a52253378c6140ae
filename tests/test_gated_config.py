"""The `gated` config section: shipped configs load, and cross-key problems name the key."""

import gzip

import numpy as np
import pytest
import yaml

from smoe.config import validate_config
from smoe.errors import InputError
from smoe.gated_config import gated_dependencies, gated_model_spec, gated_models_to_run


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
    assert config["models"] == {} and len(gated_models_to_run(config)) == 13
    assert gated_dependencies(config, "distilled_attentive_importance") == {
        "teacher": "attentive_top2_similarity"
    }
    spec = gated_model_spec(config, "top2")
    assert spec.train["batch_size"] == 512 and spec.options == {"variant": "topk", "top_k": 2}


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
            "config key 'gated.data.folder': digits come with scikit-learn and read no files",
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
                    "m": {"kind": "gated_moe", "options": {"experts": 2}},
                    "d": {"kind": "gated_distilled", "options": {"teacher": "m", "top_k": 3}},
                }
            },
            "config key 'gated.models.d.options.top_k': top_k=3 must be between 1 and experts=2",
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
