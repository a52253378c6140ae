"""The shape of the house, checked: families over a shared core, never importing each other,
no import circle, and files small enough to read (README "Layout: one family, one folder")."""

import ast
from pathlib import Path

import pytest

from smoe.families import NAMES, families


def module_name(repo: Path, path: Path) -> str:
    parts = list(path.relative_to(repo).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(repo: Path) -> dict[str, set[str]]:
    """Every smoe module and the smoe modules it imports, anywhere in it (functions too)."""
    modules = {module_name(repo, p): p for p in (repo / "smoe").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import module` depends on the module; `from pkg import name`
                # on pkg itself
                submodules = [f"{node.module}.{a.name}" for a in node.names]
                modules_named = [m for m in submodules if m in modules]
                targets = modules_named if modules_named else [node.module]
            for target in targets:
                if target in modules and target != name:
                    found.add(target)
        graph[name] = found
    return graph


def family_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "families" else None


def test_no_family_imports_another(repo):
    crossings = [
        f"{module} imports {target}"
        for module, targets in imports(repo).items()
        for target in targets
        if family_of(module) and family_of(target) and family_of(module) != family_of(target)
    ]
    assert not crossings


def test_the_core_and_the_layer_import_no_family(repo):
    assembly = ("smoe.families", "smoe.cli", "smoe.config")
    leaks = [
        f"{module} imports {target}"
        for module, targets in imports(repo).items()
        if module.startswith(("smoe.core", "smoe.nn"))
        for target in targets
        if target.startswith(assembly)
    ]
    assert not leaks


def test_no_import_circle(repo):
    graph = imports(repo)
    state: dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # a package's __init__ importing its own submodule is not a circle of two modules
    real = [c for c in cycles if not all(c[-1].startswith(m) for m in c[:-1])]
    assert not real, real


def test_every_family_is_one_folder_with_its_parts(repo):
    records = families()
    assert tuple(f.name for f in records) == NAMES
    for family in records:
        folder = repo / "smoe" / "families" / family.name
        for part in ("__init__.py", "schema.yaml", "config.py", "cli.py", "workflow.py"):
            assert (folder / part).is_file(), f"{family.name}: {part}"
        assert family.schema == folder / "schema.yaml"
        assert (repo / "workflow" / "rules" / f"{family.name}.smk").is_file()
        assert (repo / "docs" / f"{family.name}.md").is_file()
        for hook in family.hooks:
            assert family.hook(hook) is not None, f"{family.name}: hook {hook}"


def test_files_stay_small(repo):
    common = (repo / "workflow" / "rules" / "common.smk").read_text().count("\n")
    assert common < 150
    rules = {p.name: p.read_text().count("\n") for p in (repo / "workflow" / "rules").glob("*.smk")}
    assert max(rules.values()) <= 300, rules
    big = {
        str(p.relative_to(repo)): n
        for p in (repo / "smoe").rglob("*.py")
        if (n := p.read_text().count("\n")) > 800
    }
    assert not big


@pytest.mark.parametrize("name", NAMES)
def test_a_familys_rule_file_registers_its_rules(repo, name):
    text = (repo / "workflow" / "rules" / f"{name}.smk").read_text()
    assert f'FAMILY_RULES["{name}"] = ' in text
