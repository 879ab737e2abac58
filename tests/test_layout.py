"""The package's imports flow one way (README, Layout): data and codec -> model and masking -> training ->
generation -> evaluation, with no import circle, counting the imports made inside functions."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "vampnet_pl"
LAYERS = [{"codec", "data"}, {"model", "masking"}, {"training"}, {"generation"}, {"evaluation"}]  # never upward
SCHEMA_ROOT = "config"  # gathers the component configs of the packages below it, which import it back


def module_imports() -> dict[str, set[str]]:
    """Every module of vampnet_pl (dotted, without the package prefix) -> the vampnet_pl modules it imports."""
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in names.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            found = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("vampnet_pl"):
                found = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            targets |= {t.removeprefix("vampnet_pl").lstrip(".") for t in found if t.startswith("vampnet_pl")}
        graph[name] = {t for t in targets if t in names and t and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: each a path that leads back to its start."""
    found, done = [], set()

    def visit(node, path):
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, path + [nxt])
        done.add(node)

    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    return found


def test_no_module_imports_itself_back():
    assert cycles(module_imports()) == []


def test_packages_import_one_way():
    packages = defaultdict(set)
    for name, targets in module_imports().items():
        top = name.split(".")[0]
        if name and top != SCHEMA_ROOT:
            packages[top] |= {t.split(".")[0] for t in targets} - {top}
    assert cycles(packages) == []
    upward = [(low, high) for i, layer in enumerate(LAYERS) for low in layer for later in LAYERS[i + 1:]
              for high in later if high in packages[low]]
    assert upward == []


def test_the_checks_see_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    graph = module_imports()
    assert "training.module" in graph["training.app"] and "model" in graph["training.module"]
