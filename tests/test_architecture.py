"""The layer picture of docs/architecture.md stays true: the import contract (import-linter), no
import cycle among our modules, no `_private` name imported across modules, our own modules
imported at module top, and a docstring saying what each package owns."""
from __future__ import annotations

import ast
from pathlib import Path

import grimp
import pytest
from importlinter.cli import lint_imports

import mergelab

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(mergelab.__file__).resolve().parent
# Importing the library inside the command functions keeps `mergelab --help` at 0.3 s instead of
# ~4 s (torch); evaluate/__init__ resolves its public names lazily for the same reason.
LAZY_ALLOWED = ("commands/", "evaluate/__init__.py")


def modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "zoo/adapters" not in p.as_posix())


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``edges`` (module → modules it imports), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_import_contract_holds(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0


def test_no_import_cycle_among_our_modules():
    graph = grimp.build_graph("mergelab")
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert find_cycle(edges) is None, " → ".join(find_cycle(edges))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) is None


def _imports(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {id(c): p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("mergelab"):
            yield node, node.module, [a.name for a in node.names], parents.get(id(node))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("mergelab"):
                    yield node, a.name, [], parents.get(id(node))


def test_no_module_imports_a_private_name_of_another():
    found = [f"{p.relative_to(SRC)}:{node.lineno} {mod}.{name}"
             for p in modules() for node, mod, names, _ in _imports(p) for name in names
             if name.startswith("_") and name != "__version__"]
    assert found == []


def test_our_modules_are_imported_at_module_top():
    found = [f"{p.relative_to(SRC)}:{node.lineno} {mod}"
             for p in modules() if not any(a in p.relative_to(SRC).as_posix() for a in LAZY_ALLOWED)
             for node, mod, _, parent in _imports(p) if not isinstance(parent, ast.Module)]
    assert found == []


@pytest.mark.parametrize("package", sorted(p.parent.relative_to(SRC).as_posix()
                                           for p in SRC.rglob("__init__.py") if "zoo/adapters" not in p.as_posix()))
def test_every_package_says_what_it_owns(package):
    doc = ast.get_docstring(ast.parse((SRC / package / "__init__.py").read_text(encoding="utf-8")))
    assert doc and len(doc.split("\n")[0]) > 20
