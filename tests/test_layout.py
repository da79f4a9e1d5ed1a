"""The layout shows the architecture (issue 10): subpackages for the pipeline, delivery,
state and operations under the CLI, no import cycles, and a README that names every
module."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "reconciler"
README = PACKAGE.parent / "README.md"


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imported_at_load(path: Path, known: set[str]) -> set[str]:
    """The project's modules `path` imports when it is loaded (not inside functions, not
    under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                dotted = f"{node.module}.{alias.name}"
                names.add(dotted if dotted in known else node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name in known}


def test_no_module_imports_itself_back_through_others():
    found = modules()
    graph = {name: imported_at_load(path, set(found)) - {name} for name, path in found.items()}
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            raise AssertionError("import cycle: " + " -> ".join([*trail, name]))
        if name in done:
            return
        for other in sorted(graph[name]):
            visit(other, [*trail, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_the_readme_module_map_names_every_module():
    text = README.read_text()
    missing = [
        str(path.relative_to(PACKAGE.parent))
        for path in modules().values()
        if path.name != "__init__.py"
        and path.name != "__main__.py"
        and str(path.relative_to(PACKAGE.parent)).removeprefix("reconciler/") not in text
    ]
    assert missing == []


def test_core_modules_do_not_import_the_cli_framework():
    for name, path in modules().items():
        if name in ("reconciler.cli", "reconciler.views", "reconciler.tables"):
            continue
        source = path.read_text()
        assert "import click" not in source and "from click" not in source, name
