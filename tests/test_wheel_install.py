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
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ._helpers import without_settings

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(1800)]
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


def _quickstart_install_lines() -> list[str]:
    """The README quick start's shell lines before its first pytest (venv, wheel, install)."""
    import re

    section = (REPO / "README.md").read_text().split("## Use provisioner in your project\n", 1)[1]
    [commands] = re.findall(r"```sh\n(.+?)```", section.split("\n## ", 1)[0], flags=re.S)
    lines = []
    for line in commands.splitlines():
        if line.startswith("pytest"):
            break
        lines.append(line)
    assert lines and "pip install" in "\n".join(lines), commands
    return lines


@dataclass
class UserVenv:
    root: Path
    venv: Path
    project: Path
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """The user's shell: the venv first on PATH, none of this checkout's settings."""
        env = without_settings(also=lambda name: name.startswith(("PYTEST_", "VIRTUAL_ENV", "PYTHONPATH")))
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
        # 1-2. README's quick start install lines, verbatim (bash, in a fresh project folder next to the
        #      provisioner checkout, here a copy of the sources: the checkout gets no build/ or .egg-info):
        #      a venv, the wheel built with `pip wheel` (no `build` needed), installed NON-editably.
        source = root / "provisioner"
        source.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO / name, source / name)
        shutil.copytree(REPO / "provisioner", source / "provisioner",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        project = root / "project"
        project.mkdir()
        venv = project / ".venv"
        user = UserVenv(root, venv, project, timings)
        install_lines = _quickstart_install_lines()

        def install() -> None:
            shell = {k: v for k, v in user.env.items() if k not in ("VIRTUAL_ENV",)}
            shell["PATH"] = os.pathsep.join(p for p in shell["PATH"].split(os.pathsep)
                                            if p != str(venv / "bin") and not p.startswith(str(REPO)))
            shell["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
            shell["PIP_NO_COMPILE"] = "1"  # no byte-compiling saves half the install
            script = "\n".join(install_lines)
            _check(subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=project, env=shell,
                                  capture_output=True, text=True, timeout=1800), "quick start install")

        _timed(timings, "fresh-venv install (README's lines)", install)
        [_wheel] = (source / "dist").glob("dspy_provisioner-*-py3-none-any.whl")
        assert (venv / "bin" / "pytest").exists() and list(venv.glob("lib/python*/site-packages/xdist"))
        assert ".provision/" in (project / ".gitignore").read_text().splitlines()
        shutil.rmtree(source)
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


def test_the_base_install_has_no_faker_and_a_factory_names_the_extra(user_venv: UserVenv) -> None:
    """The README's install (no extra): neither polyfactory nor Faker, so Faker's pytest plugin does not
    load at every pytest start; the specs import, and a factory says which extra it needs."""
    python = str(user_venv.venv / "bin" / "python")
    code = ("import importlib.util as u, json; from provisioner.factories import FieldSpec, ProgramSpec; "
            "print(json.dumps([u.find_spec(m) is not None for m in ('faker', 'polyfactory')]))")
    assert json.loads(_check(user_venv.run(python, "-c", code), "import the specs").stdout) == [False, False]
    done = user_venv.run(python, "-c", "from provisioner.factories import ProgramFactory")
    assert done.returncode == 1
    assert "pip install 'dspy-provisioner[factories]'" in done.stderr, done.stderr
    assert "ImportError: provisioner.factories.ProgramFactory is built on polyfactory" in done.stderr


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


FLAKY_PROJECT_TOML = """\
[tool.pytest.ini_options]
addopts = "-p no:cacheprovider"

[tool.provisioner]
layer = "unit"
"""

FLAKY_TESTS = """\
from pathlib import Path

import pytest

COUNTER = Path(__file__).with_name("counter.txt")


@pytest.mark.unit
def test_flaky():
    runs = int(COUNTER.read_text()) + 1 if COUNTER.exists() else 1
    COUNTER.write_text(str(runs))
    assert runs % 2 == 1, f"even run {runs}"


@pytest.mark.unit
def test_broken():
    assert 1 + 1 == 3


@pytest.mark.unit
def test_answers(lm):
    assert lm("What is 2+2?")[0]
"""


def test_the_installed_wheel_flags_the_flaky_test_and_only_it(user_venv: UserVenv) -> None:
    """The issue's test from a user's project: a test whose outcome flips between runs (a counter file)
    run three times; the wheel's history and page flag it as flaky, and only it (test_broken always
    fails: not flaky). Real mode without a key: the calls go to the Gemini stand-in, billed $0."""
    import re

    project = user_venv.root / "flaky-project"
    project.mkdir()
    (project / "pyproject.toml").write_text(FLAKY_PROJECT_TOML)
    (project / "test_flaky.py").write_text(FLAKY_TESTS)
    (project / ".gitignore").write_text(".provision/\ncounter.txt\npage/\n")
    git = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.invalid"}
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "suite"]):
        subprocess.run(["git", *args], cwd=project, env={**user_venv.env, **git}, check=True,
                       capture_output=True)

    def run(*args: str) -> Any:
        return subprocess.run(list(args), cwd=project, env=user_venv.env, capture_output=True, text=True,
                              timeout=600)

    python, provision = str(user_venv.venv / "bin" / "python"), str(user_venv.venv / "bin" / "provision")
    for i in range(3):
        done = run(python, "-m", "pytest", "-q", "--lm", "real")
        assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
        assert ("2 failed" if i == 1 else "1 failed") in done.stdout, done.stdout[-3000:]
    runs = json.loads(_check(run(provision, "history", "list", "--json"), "history list").stdout)
    assert len(runs) == 3 and len({r["revision"] for r in runs}) == 1
    assert all(r["standin_calls"] == 1 and r["cost_usd"] == 0 and r["list_cost_usd"] > 0 for r in runs)
    _check(run(provision, "report", "html", "--out", "page"), "report html")
    page = (project / "page" / "index.html").read_text()
    flaky = page.split('id="flaky"', 1)[1].split("</table>", 1)[0]
    assert re.findall(r'data-node-id="([^"]+)"', flaky) == ["test_flaky.py::test_flaky"]
    markdown = _check(run(provision, "report", "markdown"), "report markdown").stdout
    assert "### Flaky tests (1, last 3 runs)" in markdown and "`test_flaky.py::test_flaky`" in markdown
    assert "1 LM call was answered by the Gemini stand-in: billed $0" in markdown
