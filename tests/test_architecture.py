"""The package's shape, as a test: imports point down the layers, no module imports one that
imports it back, and the engine never sees aiohttp's server. See ARCHITECTURE.md."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gateway"

LAYERS = [
    ("errors", "config"),
    ("observe",),
    ("admission", "upstreams"),
    ("engine",),
    ("protocols",),
    ("admin", "build", "app", "explain", "explain_protocol", "processes", "__main__"),
]
"""Bottom to top: a module imports from its own layer or the ones below, never above.
`fake_llm` stands apart: it is a separate program and imports nothing of the gateway."""

MAX_MODULE_LINES = 280
"""STYLE.md asks for modules of one concept, 50 to 250 lines; this is the hard stop."""


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every gateway module `name` imports, anywhere in it (type-checking imports included:
    they are dependencies too)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            submodules = {f"{base}.{alias.name}" for alias in node.names} & MODULES.keys()
            found.update(submodules or {base})
    return {m for m in found if m in MODULES and m != name and m != "gateway"}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> int | None:
    top = module.split(".")[1] if "." in module else ""
    for level, names in enumerate(LAYERS):
        if top in names:
            return level
    return None


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
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

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert _cycles() == []


def test_imports_point_down_the_layers():
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in sorted(GRAPH.items())
        for target in sorted(targets)
        if _layer(module) is not None
        and _layer(target) is not None
        and _layer(target) > _layer(module)
    ]
    assert upward == []


def test_every_module_belongs_to_a_layer():
    assert [m for m in MODULES if _layer(m) is None and not m.startswith(
        ("gateway.fake_llm", "gateway.protocols")) and m != "gateway"] == []


def test_the_fake_worker_imports_nothing_of_the_gateway():
    outside = {
        f"{m} imports {t}"
        for m, targets in GRAPH.items()
        if m.startswith("gateway.fake_llm")
        for t in targets
        if not t.startswith("gateway.fake_llm")
    }
    assert outside == set()


WIRE_LIBRARIES = ("aiohttp", "grpc", "grpc_health", "grpc_reflection", "google.protobuf")
"""What an adapter speaks its protocol with; never the engine's business."""


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("gateway.engine")))
def test_the_engine_does_not_import_a_wire_library(module):
    """The engine knows frames and sinks; aiohttp and grpcio (servers or clients) and protobuf
    belong to an adapter."""
    imported = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    wire = {m for m in imported if any(m == w or m.startswith(w + ".") for w in WIRE_LIBRARIES)}
    assert wire == set()


def test_modules_stay_small():
    long = {
        name: n
        for name, path in MODULES.items()
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}
