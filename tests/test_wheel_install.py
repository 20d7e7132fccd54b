"""The distribution as a user gets it: the built ``dspy-provisioner`` wheel installed NON-editably into
a fresh venv outside the checkout, a small project there with one integration-layer test, and
``provision doctor`` reporting failed checks (not crashing) when something is missing.

Before the recipe became package data, the first container test failed here with ``ImageError: the
worker image is built from provisioner's source tree …`` and ``provision doctor`` crashed with it.

Timings of each phase are printed (run with ``-s`` to see them). Everything made is removed: the
venv and project (temporary folders), the project's image tag, a worker image built only for this
test, and every container or network labelled with the project.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1800)]
REPO = Path(__file__).resolve().parents[1]

PROJECT_TOML = """\
[project]
name = "wheel-user"
version = "0.0.0"
requires-python = ">=3.11"

[tool.pytest.ini_options]
addopts = "-p no:cacheprovider"

[tool.provisioner.lm]
cached_inner = "mock"   # cassette misses are recorded from the mock: no key, no network

[[tool.provisioner.lm.mock_rules]]
match = { question = "capital" }
outputs = { answer = "Paris" }

[tool.provisioner.layers.integration]
workers = 1
timeout_s = 900         # the first test may build the worker image
"""

TEST_FILE = """\
import pytest

pytestmark = pytest.mark.integration


def test_a_program_on_a_worker(bridge):
    bridge.create_program(program_id="qa", signature="question -> answer")
    outputs = bridge.execute_program("qa", {"question": "the capital of France?"})["outputs"]
    assert outputs == {"answer": "Paris"}


def test_the_run_is_labelled_with_this_project(bridge, provision_settings):
    import docker

    from provisioner.runtime.labels import PROJECT, project_id

    label = f"{PROJECT}={project_id(provision_settings.project_dir)}"
    assert docker.from_env().containers.list(filters={"label": label})
"""


@dataclass
class UserVenv:
    root: Path
    venv: Path
    project: Path
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """The user's shell: the venv first on PATH, none of this checkout's settings."""
        drop = ("PROVISION_", "PYTEST_", "VIRTUAL_ENV", "PYTHONPATH", "TEST_MODE", "LM_CACHE_DIR")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop) and k != "GEMINI_TEST_API_KEY"}
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.venv)
        return env

    def run(self, *args: str, timeout: float = 1200, extra: dict[str, str] | None = None) -> Any:
        return subprocess.run(
            list(args),
            cwd=self.project,
            env={**self.env, **(extra or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def _timed(timings: dict[str, float], name: str, fn: Any) -> Any:
    start = time.perf_counter()
    result = fn()
    timings[name] = round(time.perf_counter() - start, 1)
    return result


def _check(done: Any, what: str) -> Any:
    tail = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert done.returncode == 0, f"{what} failed ({done.returncode}):\n{tail}"
    return done


@pytest.fixture(scope="module")
def user_venv(tmp_path_factory: pytest.TempPathFactory, docker_engine: Any) -> Iterator[UserVenv]:
    root = tmp_path_factory.mktemp("wheel-user")
    timings: dict[str, float] = {}
    try:
        # 1. The wheel, built from a copy of the sources (the checkout gets no build/ or .egg-info).
        source = root / "source"
        source.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO / name, source / name)
        shutil.copytree(REPO / "provisioner", source / "provisioner",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        dist = root / "dist"
        _timed(timings, "wheel build", lambda: _check(subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dist),
             str(source)], capture_output=True, text=True, timeout=600), "pip wheel"))
        [wheel] = dist.glob("dspy_provisioner-*-py3-none-any.whl")
        shutil.rmtree(source)

        # 2. A fresh venv outside the checkout; the wheel installed as a user would (not editable).
        #    Dependencies come from pip's own configuration and cache; no byte-compiling saves half.
        venv = root / "venv"
        project = root / "project"
        project.mkdir()
        user = UserVenv(root, venv, project, timings)

        def install() -> None:
            _check(subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True,
                                  timeout=300), "venv")
            _check(user.run(str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
                            "--no-compile", str(wheel), "pytest>=8.3,<10", "pytest-timeout>=2.3,<3",
                            timeout=1500), "pip install of the wheel")

        _timed(timings, "fresh-venv install", install)
        (project / "pyproject.toml").write_text(PROJECT_TOML)
        (project / "tests").mkdir()
        (project / "tests" / "test_on_a_worker.py").write_text(TEST_FILE)
        yield user
    finally:
        print(f"\nwheel install timings (s): {json.dumps(timings)}")
        _remove_engine_leftovers(docker_engine, root / "project")
        shutil.rmtree(root, ignore_errors=True)


def _remove_engine_leftovers(docker_engine: Any, project: Path) -> None:
    """The project's tag, an image built only for it, and anything labelled with the project."""
    import docker.errors

    from provisioner.runtime import images
    from provisioner.runtime.labels import PROJECT, project_id

    pid = project_id(project)
    for container in docker_engine.containers.list(all=True, filters={"label": f"{PROJECT}={pid}"}):
        container.remove(force=True)
    for network in docker_engine.networks.list(filters={"label": f"{PROJECT}={pid}"}):
        network.remove()
    tag = images.project_tag(pid)
    try:
        image = docker_engine.images.get(tag)
    except docker.errors.ImageNotFound:
        return
    docker_engine.images.remove(tag)  # untag; the image stays when another tag names it
    others = [t for t in image.tags if t != tag]
    from provisioner.runtime.engine import DockerRuntime

    ours = images.worker_tag(DockerRuntime(docker_engine))  # the checkout's image: not ours to remove
    in_use = docker_engine.containers.list(all=True, filters={"ancestor": image.id})
    for other in others:
        if other != ours and not in_use:
            with contextlib.suppress(docker.errors.APIError):
                docker_engine.images.remove(other)


def test_the_installed_package_is_the_wheel_not_the_checkout(user_venv: UserVenv) -> None:
    code = (
        "import importlib.metadata as md, json, provisioner; "
        "d = md.distribution('dspy-provisioner'); "
        "print(json.dumps([provisioner.__file__, d.read_text('direct_url.json') or '']))"
    )
    done = _check(user_venv.run(str(user_venv.venv / "bin" / "python"), "-c", code), "import")
    location, direct_url = json.loads(done.stdout)
    assert Path(location).is_relative_to(user_venv.venv) and not Path(location).is_relative_to(REPO)
    assert not json.loads(direct_url or "{}").get("dir_info", {}).get("editable")  # a plain install


def test_an_integration_layer_test_passes_from_the_installed_wheel(
    user_venv: UserVenv, docker_engine: Any
) -> None:
    from provisioner.runtime.labels import PROJECT, project_id

    pytest_cmd = (str(user_venv.venv / "bin" / "python"), "-m", "pytest", "-q", "--layer", "integration")
    first = _timed(user_venv.timings, "first integration test (incl. image build from the wheel)",
                   lambda: user_venv.run(*pytest_cmd))
    _check(first, "pytest --layer integration (first run)")
    assert "2 passed" in first.stdout
    warm = _timed(user_venv.timings, "warm run", lambda: user_venv.run(*pytest_cmd))
    _check(warm, "pytest --layer integration (warm run)")
    assert "2 passed" in warm.stdout
    # The image is this installation's: `images build` from the venv finds it up to date, and the
    # project's own tag points at it.
    built = json.loads(_check(user_venv.run(str(user_venv.venv / "bin" / "provision"), "images", "build",
                                            "--json"), "images build").stdout)
    assert built["built"] is False
    assert built["project_tag"] == f"provisioner-worker:{project_id(user_venv.project)}"
    labels = docker_engine.images.get(built["tag"]).labels
    assert labels["provisioner.version"] and labels["provisioner.package.hash"]
    # The test session cleaned up after itself.
    label = f"{PROJECT}={project_id(user_venv.project)}"
    assert docker_engine.containers.list(all=True, filters={"label": label}) == []
    assert docker_engine.networks.list(filters={"label": label}) == []


def test_doctor_reports_failed_checks_instead_of_crashing(user_venv: UserVenv) -> None:
    provision = str(user_venv.venv / "bin" / "provision")
    healthy = user_venv.run(provision, "doctor", "--json")
    assert "Traceback" not in healthy.stderr, healthy.stderr
    checks = {c["name"]: c for c in json.loads(healthy.stdout)}
    assert checks["provisioner installation"]["status"] == "ok"
    assert str(user_venv.venv) in checks["provisioner installation"]["detail"]
    assert checks["docker engine"]["status"] == "ok"

    missing_image = user_venv.run(provision, "doctor", "--json",
                                  extra={"PROVISION_CONTAINER__IMAGE": "team/not-built-here:1"})
    assert missing_image.returncode == 1 and "Traceback" not in missing_image.stderr
    image_check = {c["name"]: c for c in json.loads(missing_image.stdout)}["worker image"]
    assert image_check["status"] == "fail" and "yourself" in image_check["detail"]
    assert "team/not-built-here:1" in image_check["detail"]

    no_engine = user_venv.run(provision, "doctor", "--json",
                              extra={"DOCKER_HOST": f"unix://{user_venv.root}/no-such-docker.sock"})
    assert no_engine.returncode == 1 and "Traceback" not in no_engine.stderr
    statuses = {c["name"]: c["status"] for c in json.loads(no_engine.stdout)}
    assert statuses["docker engine"] == "fail" and statuses["provisioner installation"] == "ok"
