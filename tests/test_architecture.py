"""Dependencies point one way (docs/architecture.md). Checked on every import statement, including
the lazy ones inside functions, which a sys.modules check would miss.

Two kinds of check:

* **rules** (:data:`FORBIDDEN`, :data:`ONLY_IMPORTED_BY`): what a module may import, on every import
  statement, ``if TYPE_CHECKING:`` blocks included (a type annotation is a dependency too);
* **no cycles** (:func:`import_cycles`): the import graph — top-level and function-local imports,
  ``if TYPE_CHECKING:`` blocks excluded, built by grimp (import-linter's graph builder) — has no
  cycle, neither between modules nor between subpackages (``provisioner.runtime`` as one node,
  ``provisioner.lm`` as another, each top-level module its own node). A lazy import inside a
  function hides a cycle from Python but not from this check.
"""

from __future__ import annotations

import ast
import uuid
from collections.abc import Mapping
from pathlib import Path

import grimp
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "provisioner"

_ABOVE_THE_BOTTOM = ("provisioner.lm", "provisioner.bridge", "provisioner.runtime", "dspy", "docker")

# module prefix -> what it must never import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    # Bottom: settings, layers, LM config and errors know nothing above them.
    "provisioner.errors": ("provisioner.", "dspy", "docker", "pytest"),
    # Shared file helpers (atomic writes, flock): stdlib only, below everything.
    "provisioner._files": ("provisioner.", "dspy", "docker", "pytest"),
    # Surviving accept() failures (bridge servers, Gemini stand-in, fake relay): stdlib only.
    "provisioner._accept": ("provisioner.", "dspy", "docker", "pytest"),
    "provisioner.lmconfig": _ABOVE_THE_BOTTOM,
    "provisioner.settings": _ABOVE_THE_BOTTOM,
    "provisioner.layers": _ABOVE_THE_BOTTOM,
    # Code that runs inside worker containers.
    "provisioner.lm": (
        "provisioner.bridge", "provisioner.runtime", "provisioner.cli", "provisioner.testing",
        "provisioner.api", "provisioner.pytest_plugin", "provisioner.factories",
        "docker", "testcontainers", "pytest", "polyfactory", "rich",
    ),
    "provisioner.bridge": (
        "provisioner.runtime", "provisioner.cli", "provisioner.testing", "provisioner.api",
        "provisioner.pytest_plugin", "provisioner.factories", "docker", "testcontainers", "pytest",
        "polyfactory", "rich",
    ),
    # Host runtime: no pytest, no edges.
    "provisioner.runtime": (
        "provisioner.cli", "provisioner.testing", "provisioner.api", "provisioner.pytest_plugin", "pytest",
    ),
    # Run history and its views: imported by the plugin and the CLI, importing nothing above the LM.
    "provisioner.history": (
        "provisioner.cli", "provisioner.testing", "provisioner.api", "provisioner.pytest_plugin",
        "provisioner.runtime", "provisioner.bridge", "provisioner.reporting", "pytest", "docker",
    ),
    "provisioner.reporting": (
        "provisioner.cli", "provisioner.testing", "provisioner.api", "provisioner.pytest_plugin",
        "provisioner.runtime", "provisioner.bridge", "pytest", "docker",
    ),
    # The plain Python API under both edges.
    "provisioner.api": ("provisioner.cli", "provisioner.pytest_plugin", "pytest", "provisioner.factories",
                        "polyfactory"),
    # A run's options, identity and per-process report, the isolated test and the factories: below the
    # runtime (which is built from them), above the LM.
    "provisioner.run": (
        "provisioner.runtime", "provisioner.api", "provisioner.testing", "provisioner.cli",
        "provisioner.pytest_plugin", "pytest", "docker", "testcontainers",
    ),
    "provisioner.isolated": (
        "provisioner.runtime", "provisioner.api", "provisioner.testing", "provisioner.cli",
        "provisioner.pytest_plugin", "pytest", "docker", "testcontainers", "provisioner.factories",
        "polyfactory",
    ),
    "provisioner.factories": (
        "provisioner.runtime", "provisioner.api", "provisioner.testing", "provisioner.cli",
        "provisioner.pytest_plugin", "pytest", "docker", "testcontainers",
    ),
    # The specs (models, unique ids, a session's identity) that the API and the plugin use: pydantic
    # only, so neither pays polyfactory's and Faker's import (≈ 1 s) at every pytest start.
    "provisioner.specs": (
        "provisioner.runtime", "provisioner.api", "provisioner.testing", "provisioner.cli",
        "provisioner.pytest_plugin", "provisioner.factories", "pytest", "docker", "testcontainers",
        "polyfactory", "faker",
    ),
}

# module prefix -> the only modules (prefixes) that may import it. ``provisioner`` alone is the root
# package's facade (it re-exports ``environment`` lazily).
ONLY_IMPORTED_BY: dict[str, tuple[str, ...]] = {
    # The pytest plumbing: the plugin and the CLI drive it; nothing below knows it.
    "provisioner.testing": ("provisioner.testing", "provisioner.pytest_plugin", "provisioner.cli"),
    # The Python API: the edges, the pytest plumbing and the root facade only.
    "provisioner.api": (
        "provisioner.api", "provisioner.testing", "provisioner.pytest_plugin", "provisioner.cli",
        "provisioner",
    ),
}


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _violations(package: Path = PACKAGE) -> list[str]:
    out = []
    for path in sorted(package.rglob("*.py")):
        module = _module_name(path, package)
        for prefix, banned in FORBIDDEN.items():
            if module != prefix and not module.startswith(prefix + "."):
                continue
            for imported in _imports(path):
                for ban in banned:
                    stem = ban.rstrip(".")
                    if imported == stem or imported.startswith(stem + "."):
                        out.append(f"{module} imports {imported}")
    return out


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _importer_violations(package: Path = PACKAGE) -> list[str]:
    out = []
    for path in sorted(package.rglob("*.py")):
        module = _module_name(path, package)
        for imported in _imports(path):
            for target, allowed in ONLY_IMPORTED_BY.items():
                if not _within(imported, target):
                    continue
                # ``provisioner`` in ``allowed`` is the root package itself, not every module in it.
                if not any(module == a if a == package.name else _within(module, a) for a in allowed):
                    out.append(f"{module} imports {imported} (only {', '.join(allowed)} may)")
    return out


def test_dependencies_point_one_way() -> None:
    assert _violations() == []


def test_only_the_edges_and_the_pytest_plumbing_import_the_api() -> None:
    assert _importer_violations() == []


# Exceptions that may live outside errors.py: never raised to a caller of provisioner.
EXCEPTIONS_ELSEWHERE = {
    "provisioner.cli.UsageProblem",  # click's own exception type for a usage error (exit 2)
    # The server's control flow: answered on the wire, never raised out of the server.
    "provisioner.bridge.server.FrameTimeout",
}


def _exception_classes(package: Path = PACKAGE) -> list[str]:
    """Public classes deriving (by name) from an exception, outside ``errors.py``."""
    out = []
    for path in sorted(package.rglob("*.py")):
        module = _module_name(path, package)
        if module == f"{package.name}.errors":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.ClassDef) or node.name.startswith("_"):
                continue
            bases = [ast.unparse(base).rsplit(".", 1)[-1] for base in node.bases]
            if any(b in ("Exception", "BaseException") or b.endswith(("Error", "Exceeded", "Problem"))
                   for b in bases):
                out.append(f"{module}.{node.name}")
    return out


def test_every_exception_is_defined_in_errors_py() -> None:
    assert sorted(set(_exception_classes()) - EXCEPTIONS_ELSEWHERE) == []


def test_the_exception_check_sees_one_defined_elsewhere(tmp_path: Path) -> None:
    fake = tmp_path / "provisioner"
    (fake / "runtime").mkdir(parents=True)
    (fake / "errors.py").write_text("class ProvisionerError(Exception):\n    pass\n")
    (fake / "runtime" / "state.py").write_text(
        "from provisioner import errors\n\n\nclass StateError(errors.ProvisionerError):\n    pass\n\n\n"
        "class _Private(Exception):\n    pass\n\n\nclass Plain:\n    pass\n"
    )
    assert _exception_classes(fake) == ["provisioner.runtime.state.StateError"]


# -- cycles -------------------------------------------------------------------------------------------


def import_graph(package: str) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}`` for an importable ``package``: top-level and
    function-local imports, ``if TYPE_CHECKING:`` blocks left out (they never run)."""
    graph = grimp.build_graph(
        package, include_external_packages=False, exclude_type_checking_imports=True, cache_dir=None
    )
    return {module: set(graph.find_modules_directly_imported_by(module)) for module in graph.modules}


def subpackage_graph(modules: Mapping[str, set[str]], package: str) -> dict[str, set[str]]:
    """The same graph with each subpackage as one node (``provisioner.lm.cached`` → ``provisioner.lm``);
    top-level modules and the root package stay nodes of their own; imports inside a node are dropped."""
    subpackages = {m.split(".")[1] for m in modules if m.count(".") >= 2}

    def node(module: str) -> str:
        parts = module.split(".")
        return ".".join(parts[:2]) if len(parts) >= 2 and parts[1] in subpackages else module

    out: dict[str, set[str]] = {node(m): set() for m in modules}
    for module, imported in modules.items():
        out[node(module)].update(node(i) for i in imported if node(i) != node(module))
    return out


def import_cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One shortest cycle (``[a, b, a]``) through each group of mutually importing nodes (each strongly
    connected component with more than one node, or a node importing itself), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm; the graphs here are a few hundred nodes
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(_shortest_cycle(graph, min(c), c) for c in components)


def _shortest_cycle(graph: Mapping[str, set[str]], start: str, within: set[str]) -> list[str]:
    """Breadth-first from ``start`` back to it, staying inside its component."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if nxt in within and nxt not in came_from:
                    came_from[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{start} is in a cycle but no path leads back to it")


def cycle_problems(package: str) -> list[str]:
    """Every cycle of the package's import graph, between modules and between subpackages, in words."""
    modules = import_graph(package)
    out = [f"modules: {' -> '.join(c)}" for c in import_cycles(modules)]
    subpackages = {m for m in modules if any(other.startswith(m + ".") for other in modules)} - {package}
    # A cycle through top-level modules only is a module cycle, named above already.
    out += [
        f"subpackages: {' -> '.join(c)}"
        for c in import_cycles(subpackage_graph(modules, package)) if set(c) & subpackages
    ]
    return out


def test_the_import_graph_has_no_cycle() -> None:
    assert cycle_problems("provisioner") == []


def _synthetic_package(root: Path, files: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """A package under ``root`` (importable for the test's duration); ``{p}`` in a file is its name."""
    name = f"archcheck_{uuid.uuid4().hex[:8]}"
    for relative, text in {"__init__.py": "", **files}.items():
        path = root / name / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.replace("{p}", name))
    monkeypatch.syspath_prepend(str(root))
    return name


def test_the_cycle_check_names_module_and_subpackage_cycles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = _synthetic_package(tmp_path, {
        # A module cycle hidden in a lazy import (the old Settings.lm_for <-> layers).
        "settings.py": "def lm_for():\n    from {p}.layers import get\n    return get()\n",
        "layers.py": "from {p}.settings import lm_for\n\n\ndef get():\n    return lm_for\n",
        # A subpackage cycle that is no module cycle (the old api <-> testing).
        "api.py": "from {p}.testing import options\n",
        "testing/__init__.py": "",
        "testing/options.py": "X = 1\n",
        "testing/state.py": "from {p} import api\n",
        # Imports for type checkers only never run: no cycle.
        "typed.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from {p} import back\n",
        "back.py": "from {p} import typed\n",
    }, monkeypatch)
    assert cycle_problems(package) == [
        f"modules: {package}.layers -> {package}.settings -> {package}.layers",
        f"subpackages: {package}.api -> {package}.testing -> {package}.api",
    ]
    with pytest.raises(AssertionError, match=r"settings -> .*layers"):
        assert cycle_problems(package) == []


def test_the_cycle_check_passes_a_package_without_cycles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = _synthetic_package(tmp_path, {
        "errors.py": "class Error(Exception):\n    pass\n",
        "settings.py": "from {p}.errors import Error\n",
        "runtime/__init__.py": "",
        "runtime/engine.py": "def f():\n    from {p}.settings import Error\n    return Error\n",
        "api.py": "from {p}.runtime import engine\nfrom {p}.settings import Error\n",
        "typed.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from {p} import back\n",
        "back.py": "from {p} import typed\n",
    }, monkeypatch)
    modules = import_graph(package)
    assert modules[f"{package}.runtime.engine"] == {f"{package}.settings"}  # the lazy import is seen
    assert modules[f"{package}.typed"] == set()  # the TYPE_CHECKING one is not
    assert cycle_problems(package) == []


def test_the_check_sees_lazy_imports(tmp_path: Path) -> None:
    fake = tmp_path / "provisioner" / "lm"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    import docker\n    from provisioner.runtime import engine\n")
    assert sorted(_violations(tmp_path / "provisioner")) == [
        "provisioner.lm.bad imports docker",
        "provisioner.lm.bad imports provisioner.runtime",
    ]


def test_only_the_docker_adapter_imports_docker_py() -> None:
    """The runtime interface is the only door to the engine: everything else asks a ContainerRuntime
    (docs/architecture.md, "runtime"), so it runs on the fake runtime too."""
    importers = sorted(
        _module_name(path, PACKAGE)
        for path in PACKAGE.rglob("*.py")
        if any(name == "docker" or name.startswith("docker.") for name in _imports(path))
    )
    assert importers == ["provisioner.runtime.engine.docker"]


def _constructs(path: Path, name: str) -> bool:
    tree = ast.parse(path.read_text(), filename=str(path))
    return any(
        isinstance(node, ast.Call)
        and (getattr(node.func, "id", None) == name or getattr(node.func, "attr", None) == name)
        for node in ast.walk(tree)
    )


def test_the_real_engine_is_opened_in_one_place() -> None:
    """``open_runtime`` is the one factory for the real engine (engine settings such as remote engines
    change it alone): nothing else in the package constructs a ``DockerRuntime``."""
    constructors = sorted(
        _module_name(path, PACKAGE) for path in PACKAGE.rglob("*.py") if _constructs(path, "DockerRuntime")
    )
    assert constructors == ["provisioner.runtime.engine"]


def test_the_one_place_check_sees_attribute_calls(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from provisioner.runtime import engine\n\ndef f():\n    return engine.DockerRuntime()\n")
    assert _constructs(bad, "DockerRuntime") and not _constructs(bad, "FakeRuntime")
