"""The experiment families, in one list: the ``smoe`` command, the config schema, the config
checks and the report categories are all built from :data:`NAMES`.

A family is a package ``smoe.families.<name>`` whose ``__init__`` defines ``FAMILY``, a
:class:`smoe.core.family.Family`; it imports the core and :mod:`smoe.nn`, never another
family. Adding one: README "Adding an experiment family".
"""

from __future__ import annotations

import importlib

from smoe.core.family import Family

NAMES = ("heat", "clusters", "gated")
"""Every registered family, in the order the CLI, the checks and the report list them."""


def families() -> tuple[Family, ...]:
    """The registered families' :class:`Family` records (their packages imported, which
    imports nothing heavy: the hooks load on use)."""
    return tuple(importlib.import_module(f"smoe.families.{name}").FAMILY for name in NAMES)


def family(name: str) -> Family:
    """The family called ``name``."""
    for candidate in families():
        if candidate.name == name:
            return candidate
    raise KeyError(f"no experiment family {name!r}; known: {', '.join(NAMES)}")
