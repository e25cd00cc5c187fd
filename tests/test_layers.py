"""The import graph of the product packages (docs/architecture.md, "Layers"): no cycle, no upward import.

Read from the source with ``ast``, every import counted -- function-local and ``TYPE_CHECKING`` ones too: a cycle a
lazy import hides is still one a reader has to hold. A module that imports ``zps.a.b`` or ``from zps.a import b``
depends on ``a.b`` (and on ``a``, the package, whose ``__init__`` runs first, unless ``a`` is its own package).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import ROOT

pytestmark = pytest.mark.unit

# Each package may import itself and the packages listed for it, nothing else. Top to bottom: the launcher starts
# jobs and may use everything; the lab studies jobs (it drives the server's optimizer, the emulated network, a
# running job's status); the server and the client library never import each other; telemetry reports on a job and
# is used by the roles; protocol is what every process shares; process is the standard-library plumbing anyone may
# use.
ALLOWED: dict[str, set[str]] = {
    "launcher": {"lab", "ps", "worker", "telemetry", "protocol", "process"},
    "lab": {"ps", "worker", "telemetry", "protocol", "process"},
    "ps": {"telemetry", "protocol"},
    "worker": {"telemetry", "protocol"},
    "telemetry": {"protocol"},
    "protocol": set(),
    "process": set(),
}
PACKAGES = tuple(ALLOWED)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) for every zps module ``path`` imports, relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("zps."):
                    yield node.lineno, alias.name.removeprefix("zps.")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module is not None and (node.module == "zps" or node.module.startswith("zps.")):
                target = node.module.removeprefix("zps").removeprefix(".")
            else:
                continue
            if target:
                yield node.lineno, target
            for alias in node.names:  # `from zps.protocol import config`: the module protocol.config
                yield node.lineno, f"{target}.{alias.name}" if target else alias.name


def graph() -> dict[str, dict[str, int]]:
    """module -> {zps module it imports: the line of the first such import}, over the product packages."""
    modules = {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}
    edges: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        out: dict[str, int] = {}
        for line, target in imports(path):
            # a package is imported before its modules: an import of a module's own package adds nothing
            if target in modules and target != name and not name.startswith(target + "."):
                out.setdefault(target, line)
        edges[name] = out
    return edges


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read_whole() -> None:
    """The reader sees what the test relies on: relative, absolute, function-local and package imports."""
    edges = graph()
    assert "launcher.backend" in edges["launcher.local"]  # from .backend import ...
    assert "protocol.checkpoint" in edges["launcher.job"]  # from zps.protocol import checkpoint as ckpt
    assert "lab.plan_cli" in edges["launcher.cli"]  # inside a function
    assert "ps.server" in edges["launcher.node"]  # inside a function
    assert "launcher.zygote" in edges["launcher.zygote_client"]
    assert "launcher.coordinator.membership" in edges["launcher.coordinator"]  # a package's __init__


def test_no_import_cycle() -> None:
    assert cycles(graph()) == []


def test_cycles_are_found() -> None:
    edges: dict[str, dict[str, int]] = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    assert cycles(edges) == [["a", "b", "c"]]


def test_no_upward_import() -> None:
    upward = [f"{module} imports {target} (line {line})"
              for module, out in graph().items() for target, line in out.items()
              if target.split(".")[0] != module.split(".")[0]
              and target.split(".")[0] not in ALLOWED[module.split(".")[0]]]
    assert upward == []


def test_every_product_package_is_layered_and_linked() -> None:
    """A top-level package under zps/ (a link, as pyproject's packages.find installs them) has its place here."""
    linked = {p.name for p in (ROOT / "zps").iterdir() if p.is_symlink()}
    assert linked == set(PACKAGES)
