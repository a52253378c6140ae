"""The CPU trainings that allocate large tensors every step keep freed memory (glibc)."""

import sys

import pytest

from smoe.core.train.device import keep_freed_memory
from smoe.families.clusters.task import ClusterTask
from smoe.families.gated.task import GatedTask
from smoe.families.heat.task import HeatTask


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_glibc_takes_the_settings():
    assert keep_freed_memory() is True


def test_the_families_with_large_step_tensors_ask_for_it_and_heat_does_not():
    assert GatedTask.keep_freed_memory and ClusterTask.keep_freed_memory
    assert not HeatTask.keep_freed_memory  # measured: its 2 MB tensors gain nothing
