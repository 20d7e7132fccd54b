"""What the plugin costs every pytest start: it must not import the heavy packages a run may never need.

The plugin is loaded by every ``pytest`` in every project that has provisioner installed (and by each
xdist worker, and by every inner pytest run of this suite). Faker (through polyfactory), docker-py
and DSPy took ≈ 1 s of each start before they were imported on first use (docs/benchmarks.md,
"pytest start-up with the plugin"). These tests fail when someone adds an eager import back: each
runs a fresh interpreter (this process has imported everything already) and lists what it loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Loaded only when a run needs them: polyfactory/Faker by the factories a test imports itself,
# docker-py by the first engine call, DSPy by a layer's LM or a bridge, the fake engine (tarfile and
# its compressors) by tests that ask for it.
HEAVY = ("faker", "polyfactory", "provisioner.factories._polyfactory", "docker", "dspy", "litellm",
         "testcontainers", "rich", "provisioner.runtime.engine.fake")

REPORT = """
import json, os, sys
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PROVISION_", "PYTEST_")) and k not in ("TEST_MODE", "DOCKER_CONTEXT")}
    env["HOME"] = str(tmp_path / "home")  # no docker CLI config naming a context
    env.pop("DOCKER_CONFIG", None)
    return env


def _loaded(code: str, tmp_path: Path) -> list[str]:
    done = subprocess.run([sys.executable, "-c", code + REPORT.format(heavy=HEAVY)], cwd=tmp_path,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    loaded: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return loaded


@pytest.mark.parametrize(
    "code",
    [
        "import provisioner.pytest_plugin",
        "import provisioner",
        "import provisioner.api",  # the Python API: provisioner.environment()
        "from provisioner.runtime import engine, resources, logs, workers",
        "from provisioner.specs import new_session; new_session()",
        # The specs through provisioner.factories: its factory classes load on first use only.
        "from provisioner.factories import FieldSpec, ProgramSpec, new_session; new_session()",
    ],
)
def test_importing_the_plugin_and_the_api_loads_no_heavy_package(code: str, tmp_path: Path) -> None:
    assert _loaded(code, tmp_path) == []


def test_the_factories_still_load_polyfactory(tmp_path: Path) -> None:
    """The control: the check sees an import (the factories are built on polyfactory)."""
    assert "polyfactory" in _loaded("from provisioner.factories import ProgramFactory", tmp_path)


TEST_FILE = """
import json, os, sys
import pytest

{mark}
def test_it():
    with open(os.environ["STARTUP_MODULES_OUT"], "w") as f:
        json.dump(sorted(m for m in {heavy!r} if m in sys.modules), f)
"""


@pytest.mark.parametrize(
    ("pyproject", "mark", "allowed"),
    [
        # The plugin installed, the project not using it: a plain suite.
        ("[tool.pytest.ini_options]\n", "", ()),
        # The unit layer: in-process, the mock LM preloaded (DSPy) before the first test; no engine.
        ('[tool.provisioner]\nlayer = "unit"\n', "@pytest.mark.unit", ("dspy", "litellm")),
    ],
    ids=["plain project", "unit layer"],
)
def test_a_pytest_run_with_the_plugin_loads_only_what_its_layer_needs(
    tmp_path: Path, pyproject: str, mark: str, allowed: tuple[str, ...]
) -> None:
    """A whole run (configure, collection, session start, the test, its guard): Faker's own pytest
    plugin is left out (``-p no:faker``: it imports Faker itself, in every project where Faker is
    installed), so what is left is ours."""
    (tmp_path / "pyproject.toml").write_text(pyproject)
    (tmp_path / "test_it.py").write_text(TEST_FILE.format(mark=mark, heavy=HEAVY))
    out = tmp_path / "modules.json"
    env = {**_env(tmp_path), "STARTUP_MODULES_OUT": str(out)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:faker", "-p", "no:cacheprovider"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    loaded = json.loads(out.read_text())
    assert [m for m in loaded if m not in allowed] == []
