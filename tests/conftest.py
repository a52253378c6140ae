"""Shared fixtures: the paper's region map, a small generated map, paths of the repository."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from smoe.families.heat.mask import generate_mask

REPO = Path(__file__).resolve().parents[1]

# The tests' tensors are tiny: one intra-op thread is fastest, and on a busy 2-core machine
# several threads per process make a 1-second training test take a minute.
torch.set_num_threads(1)
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def paper_mask() -> np.ndarray:
    """The exact region map of the SMoE paper (64 x 64, 3 types)."""
    return np.load(FIXTURES / "paper_mask.npy")


@pytest.fixture(scope="session")
def small_mask() -> np.ndarray:
    """A 12 x 10 map with 3 types, quick to simulate."""
    return generate_mask(12, 10, 3, seed=3)


@pytest.fixture
def work(pristine, tmp_path) -> Path:
    """A fresh copy of the test module's ``pristine`` folder (built once per module) that one
    test may change."""
    root = tmp_path / "work"
    shutil.copytree(pristine, root)
    return root
