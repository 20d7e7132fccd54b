"""Dependencies point one way (docs/architecture.md). Checked on every import statement, including
the lazy ones inside functions, which a sys.modules check would miss."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "provisioner"

_ABOVE_THE_BOTTOM = ("provisioner.lm", "provisioner.bridge", "provisioner.runtime", "dspy", "docker")

# module prefix -> what it must never import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    # Bottom: settings, layers, LM config and errors know nothing above them.
    "provisioner.errors": ("provisioner.", "dspy", "docker", "pytest"),
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
    "provisioner.api": ("provisioner.cli", "provisioner.pytest_plugin", "pytest"),
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


def test_dependencies_point_one_way() -> None:
    assert _violations() == []


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
