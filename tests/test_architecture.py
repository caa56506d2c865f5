"""The package's shape, kept true: no import circle between its modules, and no import across a boundary
that ARCHITECTURE.md (at the repository root) forbids.

Imports are read with ast from every module, function-level (lazy) imports included: a lazy import only
defers a circle to the first call, where half-initialised modules and import-order bugs wait, so a circle
through lazy imports still counts. `from pkg import name` counts as an import of the submodule pkg.name
when it exists, else of pkg. Importing a module from outside its package also runs the package's
__init__.py, so that is an edge too (from inside, the package is already initialised). A package's face
importing its own modules is not a circle for the same reason.

The rules are read from the "may import" table of ARCHITECTURE.md: each row names a part (a package or a
top-level module) and the parts it may import; a part may always import itself and the base modules.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "ssmscale"


def module_files() -> dict[str, Path]:
    """{dotted module name: file} for every module of the package (a package is named by its __init__)."""
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_package(name: str, files: dict[str, Path]) -> bool:
    return name in files and files[name].name == "__init__.py"


def imports_of(name: str, path: Path, files: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (top level or inside functions)."""
    package = name if _is_package(name, files) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in files else module for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in files:          # `import a.b.c` where c is not a module
                target = target.rpartition(".")[0]
            if not target.startswith(PACKAGE) or target == name:
                continue
            found.add(target)
            # importing a.b.c from outside a.b runs a.b's __init__ (the root package's face imports nothing)
            parent = target.rpartition(".")[0]
            while parent.count(".") >= 1:
                if not (name == parent or name.startswith(parent + ".")):
                    found.add(parent)
                parent = parent.rpartition(".")[0]
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, files) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def one_circle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A concrete circle a -> b -> ... -> a inside a strongly connected component, for the message."""
    members = set(component)
    start = component[0]
    path, seen = [start], {start}
    while True:
        nxt = sorted(w for w in graph[path[-1]] if w in members)
        back = [w for w in nxt if w in path]
        if back:
            return path[path.index(back[0]):] + [back[0]]
        step = next(w for w in nxt if w not in seen)
        path.append(step)
        seen.add(step)


def boundary_rules() -> tuple[set[str], dict[str, set[str]]]:
    """(base modules, {part: parts it may import}) from ARCHITECTURE.md's "may import" table."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    section = text.split("## What may import what", 1)[1]
    base, rules = set(), {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) != 2 or set(cells[0]) <= set("-: ") or cells[0] == "part":
            continue
        parts = re.findall(r"`([a-z_]+)/?`", cells[0])
        allowed = set(re.findall(r"`([a-z_]+)/?`", cells[1]))
        if cells[0].startswith("base"):
            base.update(parts)
            continue
        for part in parts:
            rules[part] = allowed
    return base, rules


def part_of(module: str) -> str:
    """ssmscale.study.plan -> 'study'; ssmscale.flops -> 'flops'."""
    return module.split(".")[1] if module.count(".") else module


def test_the_package_has_no_import_circle():
    graph = import_graph()
    found = [" -> ".join(one_circle(graph, c)) for c in cycles(graph)]
    assert not found, "import circles:\n" + "\n".join(found)


def test_no_import_crosses_a_boundary_architecture_md_names():
    base, rules = boundary_rules()
    graph = import_graph()
    parts = {part_of(m) for m in graph if m != PACKAGE}
    unruled = sorted(parts - base - set(rules))
    assert not unruled, f"ARCHITECTURE.md's table says nothing about {unruled}: add them to it"
    crossings = []
    for module, targets in sorted(graph.items()):
        if module == PACKAGE:
            continue
        here = part_of(module)
        allowed = (rules.get(here, set()) | base | {here}) if here not in base else base | {here}
        for target in sorted(targets):
            if target != PACKAGE and part_of(target) not in allowed:
                crossings.append(f"{module} imports {target} ({here} may import: {', '.join(sorted(allowed))})")
    assert not crossings, "imports across a boundary ARCHITECTURE.md names:\n" + "\n".join(crossings)


@pytest.mark.parametrize("source, circle", [
    ({"a": "from . import b\n", "b": "def f():\n    from .a import x\n"}, True),       # lazy still counts
    ({"a": "from . import b\n", "b": "import os\n"}, False),
])
def test_the_circle_check_sees_a_lazy_import_circle(tmp_path, monkeypatch, source, circle):
    package = tmp_path / PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, text in source.items():
        (package / f"{name}.py").write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    assert bool(cycles(import_graph())) == circle


def test_the_boundary_check_reads_every_row_of_the_table():
    base, rules = boundary_rules()
    assert {"errors", "fsutil"} <= base
    assert "cli" in rules and "fit" in rules and "report" in rules["study"]
    assert "study" not in rules["report"] and "models" not in rules["fit"]
