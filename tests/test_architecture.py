"""The package's shape (docs/ARCHITECTURE.md): layers that import only downward,
no import cycle, small modules, and the public import paths that configurations
and scripts name."""

from __future__ import annotations

import ast
import importlib
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gatewayd"

# Bottom to top; a module may import from its own layer and any layer before it.
# http and stats share the bottom rank: neither may import the other.
LAYERS = {
    "__init__": 0, "exits": 0,
    "http": 1, "stats": 1,
    "config": 2,
    "proxy": 3,
    "upstreams": 4,
    "runtime": 5,
    "control": 6,
    "process": 7,
}
TOP = 8  # gatewayd/__main__.py, handlers.py, upstream_process.py: entry points and kept paths

MAX_LINES = 600
# Modules allowed past MAX_LINES, each with the reason it stays whole.
BIG: dict[str, str] = {}


def modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def imports(name: str, path: Path) -> Iterator[str]:
    """Every gatewayd module ``name`` imports: top level, under TYPE_CHECKING, in functions."""
    is_package = path.name == "__init__.py"
    known = {n for n, _ in modules()}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "gatewayd")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "gatewayd":
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                yield sub if sub in known else module


def rank(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return 0
    return LAYERS.get(parts[1], TOP)


def test_every_import_points_down_the_layers():
    upward = [
        f"{name} -> {target}"
        for name, path in modules()
        for target in imports(name, path)
        if rank(target) > rank(name) or (rank(target) == rank(name) == 1 and target.split(".")[1] != name.split(".")[1])
    ]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_no_import_cycle():
    graph = {name: {t for t in imports(name, path) if t != name} for name, path in modules()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_checks_see_what_they_check():
    """The import walk finds imports under TYPE_CHECKING and inside functions (a
    walk that saw none would pass the two tests above for nothing)."""
    found = {name: set(imports(name, path)) for name, path in modules()}
    assert "gatewayd.http.server" in found["gatewayd.http.body"]  # under TYPE_CHECKING
    assert "gatewayd.process.master" in found["gatewayd.process.cli"]  # inside main()
    assert rank("gatewayd.process.master") > rank("gatewayd.http.server")


def test_modules_are_small():
    big = {
        str(path.relative_to(ROOT)): n
        for _, path in modules()
        if (n := len(path.read_text().splitlines())) > MAX_LINES and str(path.relative_to(ROOT)) not in BIG
    }
    assert not big, f"modules over {MAX_LINES} lines (split them, or say in BIG why they stay whole): {big}"


def test_subpackages_are_the_layers():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(LAYERS) - {"__init__", "exits"}
    loose = {p.name for p in PACKAGE.glob("*.py")}
    assert loose == {"__init__.py", "__main__.py", "exits.py", "handlers.py", "upstream_process.py"}


@pytest.mark.parametrize("path", [
    "gatewayd.handlers:simulated_io",
    "gatewayd.handlers:cpu_hash",
    "gatewayd.upstream_process:ProcessRequest",
])
def test_public_import_paths_keep_working(path: str):
    module, _, attr = path.partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


def test_console_scripts_resolve():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"gatewayd", "gatewayctl", "gatewayd-dashboard"}
    for target in scripts.values():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), target
