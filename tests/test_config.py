import numpy as np
import pytest
import yaml

from smoe.config import Config, load_config, validate_config
from smoe.errors import InputError


@pytest.mark.parametrize("name", ["config.yaml", "paper.yaml", "test.yaml"])
def test_shipped_configs_are_valid(repo, name):
    config = load_config(repo / "config" / name)
    typed = Config.from_dict(config)
    assert typed.heat.diffusivity == (0.0025, 0.025, 0.25)
    assert set(typed.splits) == {"train", "val", "test"}


def test_paper_config_has_the_paper_sizes_and_seeds(repo):
    typed = Config.from_dict(load_config(repo / "config" / "paper.yaml"))
    assert (typed.mask.height, typed.mask.width, typed.mask.types, typed.mask.seed) == (
        64,
        64,
        3,
        42,
    )
    assert typed.heat.steps == 100
    assert {k: (s.runs, s.seed) for k, s in typed.splits.items()} == {
        "train": (1000, 42),
        "val": (20, 546981),
        "test": (20, 865124),
    }


def test_empty_config_gets_every_default():
    config = validate_config({})
    assert config["mask"] == {"file": None, "height": 64, "width": 64, "types": 3, "seed": 42}
    assert config["heat"]["splits"]["test"] == {"runs": 20, "seed": 865124}
    assert config["heat"]["init"] == {"kind": "uniform", "ranges": None}
    assert config["compute"] == {"scheduler": "threads", "threads": 4}


def test_validation_does_not_modify_its_input():
    raw = {"heat": {"steps": 5}}
    validate_config(raw)
    assert raw == {"heat": {"steps": 5}}


@pytest.mark.parametrize(
    "config, message",
    [
        ({"heat": {"stepz": 3}}, r"unknown config key 'heat.stepz' under 'heat'"),
        ({"trian": {}}, r"unknown config key 'trian'"),
        ({"heat": {"steps": "ten"}}, r"'heat.steps': 'ten' is not of type 'integer'"),
        ({"mask": {"types": 2.5}}, r"'mask.types': 2.5 is not of type 'integer'"),
        (
            {"heat": {"splits": {"train": {"runs": 0, "seed": 1}}}},
            r"'heat.splits.train.runs': 0 is less than the minimum of 1",
        ),
        (
            {"heat": {"splits": {"val": {"runs": -5, "seed": 1}}}},
            r"'heat.splits.val.runs': -5 is less than the minimum of 1",
        ),
        (
            {"heat": {"diffusivity": [0.0025, 0.025, 0.3]}},
            r"'heat.diffusivity\[2\]': 0.3 is greater than the maximum of 0.25.*unstable",
        ),
        (
            {"heat": {"diffusivity": [-0.01, 0.025, 0.25]}},
            r"'heat.diffusivity\[0\]': -0.01 is less than the minimum of 0",
        ),
        (
            {"heat": {"diffusivity": [0.0025, 0.025]}},
            r"'heat.diffusivity': 2 values for mask.types=3 region types",
        ),
        ({"heat": {"boundary": "reflect"}}, r"'heat.boundary': 'reflect' is not one of"),
        ({"heat": {"init": {"ranges": [[0, 1]]}}}, r"heat.init.ranges: 1 ranges for 3"),
        ({"heat": {"clip": [1, 0]}}, r"heat.clip: \[1.0, 0.0\] needs low < high"),
        (
            {"mask": {"file": "nowhere/mask.npy"}},
            r"config key 'mask.file': mask file 'nowhere/mask.npy' does not exist",
        ),
        ({"mask": {"file": "mask.tif"}}, r"'mask.file': 'mask.tif' does not match"),
    ],
)
def test_bad_config_is_rejected_with_the_key_named(config, message):
    with pytest.raises(InputError, match=message):
        validate_config(config)


def test_all_schema_errors_are_reported_together():
    with pytest.raises(InputError) as info:
        validate_config({"heat": {"steps": 0, "stepz": 1}, "mask": {"types": 0}})
    text = str(info.value)
    assert "heat.steps" in text and "heat.stepz" in text and "mask.types" in text


def test_mask_file_values_must_fit_the_types(tmp_path, small_mask):
    bad = small_mask.copy()
    bad[3, 4] = 7
    path = tmp_path / "mask.npy"
    np.save(path, bad)
    with pytest.raises(InputError, match=r"'mask.file'.*values \[7\] outside 0..2"):
        validate_config({"mask": {"file": str(path)}})
    np.save(path, small_mask)
    assert validate_config({"mask": {"file": str(path)}})["mask"]["file"] == str(path)


def test_load_config_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"heat": {"steps": -1}}))
    with pytest.raises(InputError, match=r"c.yaml: invalid config"):
        load_config(path)
    with pytest.raises(InputError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("heat: [unclosed")
    with pytest.raises(InputError, match="not valid YAML"):
        load_config(path)
