"""The import graph of ``edgevoice/``, read with ``ast``: the layering docs/architecture.md describes.

Every import counts, wherever it is written (module level, inside a function, under
``TYPE_CHECKING``): a lazy import is still an arrow between two modules. So does a
module named in a tuple of module names for ``importlib`` (the CLI's command modules).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "edgevoice"

ROOT = "edgevoice.app"
"""The composition root: wires every component."""
ENTRY_POINTS = {"edgevoice.cli", "edgevoice.__main__", "edgevoice.daemon", "edgevoice.doctor", "edgevoice.transcribe"}
"""The process and the command line: above the composition root, imported by nothing in a feature."""
KERNEL = "edgevoice.server"
"""The web kernel: app keys, middleware, /health; every feature may import it, it imports no feature."""
FEATURES = ("recognition", "delivery", "events", "sources", "funvoice", "dashboard")
LAYERS = {"recognition": 1, "delivery": 1, "events": 2, "sources": 3}
"""Data-flow layers: a module imports only from lower layers (and never from a sibling of its own layer)."""
BESIDE = {"funvoice": set(), "dashboard": {"events", "delivery"}}
"""Features outside the data flow and the features each may import (the dashboard subscribes to the hub)."""


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str, modules: set[str]) -> Iterator[str]:
    """The edgevoice modules ``path`` imports (``from pkg import sub`` names the submodule, not the package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield sub if sub in modules else target
        elif isinstance(node, ast.Assign) and isinstance(node.value, (ast.Tuple, ast.List)):
            names = [e.value for e in node.value.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            if names and len(names) == len(node.value.elts) and all(n in modules for n in names):
                yield from names  # imported by name (importlib)


def import_graph() -> dict[str, set[str]]:
    """Every edgevoice module -> the edgevoice modules it imports."""
    paths = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        targets = set()
        for target in _imports(path, name, set(paths)):
            # `import edgevoice.x.y` names module edgevoice.x.y; an unknown tail (a typo, a moved module) is cut.
            while target and target not in paths:
                target = target.rpartition(".")[0]
            if target and target != name and _in(target, "edgevoice"):
                targets.add(target)
        graph[name] = targets
    return graph


GRAPH = import_graph()


def _feature(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FEATURES else None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One example cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read() -> None:
    """The walker sees the package: a broken walker would pass every rule below."""
    assert len(GRAPH) > 40
    assert "edgevoice.events.hub" in GRAPH[ROOT]
    assert "edgevoice.recognition.types" in GRAPH["edgevoice.events.hub"]
    assert "edgevoice.modelstore.cli" in GRAPH["edgevoice.cli"]  # named for importlib
    assert "edgevoice.recognition.diarization.sortformer" in GRAPH["edgevoice.recognition.diarization"]  # lazy
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle() -> None:
    assert _cycles(GRAPH) == []


def test_no_feature_imports_the_composition_root_or_the_process() -> None:
    above = {ROOT, *ENTRY_POINTS}
    bad = {f"{m} -> {t}" for m, targets in GRAPH.items() if _feature(m) or _in(m, KERNEL) for t in targets & above}
    assert sorted(bad) == []


def test_the_kernel_and_the_base_import_no_feature() -> None:
    """server/ (and the small modules every layer shares) import no feature package."""
    bad = {
        f"{m} -> {t}"
        for m, targets in GRAPH.items()
        if m not in ENTRY_POINTS and m != ROOT and _feature(m) is None
        for t in targets
        if _feature(t) is not None
    }
    assert sorted(bad) == []


@pytest.mark.parametrize("feature", sorted(LAYERS))
def test_layers_only_import_downwards(feature: str) -> None:
    """recognition/delivery below events below sources; a layer never imports a higher one or a sibling."""
    rank = LAYERS[feature]
    bad = set()
    for m, targets in GRAPH.items():
        if _feature(m) != feature:
            continue
        for t in targets:
            other = _feature(t)
            if other is None or other == feature:
                continue
            if other not in LAYERS or LAYERS[other] >= rank:
                bad.add(f"{m} -> {t}")
    assert sorted(bad) == []


@pytest.mark.parametrize("feature", sorted(BESIDE))
def test_features_beside_the_flow(feature: str) -> None:
    """funvoice stands beside the data flow; the dashboard only subscribes to it; nothing imports either."""
    allowed = BESIDE[feature]
    bad = set()
    for m, targets in GRAPH.items():
        for t in targets:
            if _feature(m) == feature and _feature(t) not in (None, feature, *allowed):
                bad.add(f"{m} -> {t}")
            if _feature(t) == feature and _feature(m) not in (None, feature) and m not in ENTRY_POINTS:
                bad.add(f"{m} -> {t}")
    assert sorted(bad) == []
