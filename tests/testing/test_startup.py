"""First run in pytest (issue 8, item 2): the worker image and the warm pool are prepared at session
start, outside every test's timeout, with one progress line per phase; xdist workers never build."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pytest

from provisioner.testing.progress import Phases

pytest_plugins = ["pytester"]


pytestmark = pytest.mark.usefixtures("no_settings_env")


def test_plain_phase_is_one_line_written_before_and_after() -> None:
    out = io.StringIO()
    phases = Phases(out.write)
    with phases.phase("worker image") as update:
        assert out.getvalue() == "provisioner: worker image … "  # visible while the phase runs
        update("step 3/9")  # sub-steps only on a terminal
    assert out.getvalue().startswith("provisioner: worker image … done in ")
    assert out.getvalue().count("\n") == 1


def test_failed_phase_says_so_on_its_line_and_raises() -> None:
    out = io.StringIO()
    with pytest.raises(RuntimeError), Phases(out.write).phase("warm pool") as _:
        raise RuntimeError("worker did not start")
    assert out.getvalue() == "provisioner: warm pool … failed: worker did not start\n"


def test_terminal_phase_uses_rich() -> None:
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=100)
    with Phases(lambda text: None, console=console).phase("worker image") as update:
        update("building base")
    text = buffer.getvalue()
    assert "\x1b[" in text and "building base" in text  # a live (ANSI) spinner with the sub-step
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    assert "provisioner: worker image: ✓ " in plain


def test_terminal_phase_stays_on_one_line_with_long_messages() -> None:
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=60)
    with Phases(lambda text: None, console=console).phase("worker image") as update:
        update("building provisioner-worker:50b731e09e10 on provisioner-base:bookworm-16c9e52b372e ...")
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buffer.getvalue()).replace("\r", "\n")
    assert all(len(line) <= 60 for line in plain.splitlines()), plain
    assert "…" in plain  # cut, not wrapped


class _FakeEnv:
    def __init__(self, prepared: str | None, problem: str | None = None) -> None:
        from provisioner.settings import load_settings

        self.prepared_image = prepared
        self.image_problem = problem
        self.settings = load_settings(project_dir=Path("/nonexistent-project"))


def _images_module() -> Any:
    # The module the lazy import inside ProcessContainers will find (in-process pytester runs of
    # other test files restore sys.modules, so the package attribute can be a stale copy).
    import importlib

    return importlib.import_module("provisioner.runtime.images")


def test_a_prepared_image_is_used_without_building(monkeypatch: pytest.MonkeyPatch) -> None:
    from provisioner.runtime.workers import ProcessContainers

    images = _images_module()

    def no_build(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("an xdist worker must not check or build the image")

    monkeypatch.setattr(images, "ensure_worker_image", no_build)
    containers = ProcessContainers(_FakeEnv("provisioner-worker:abc"))  # type: ignore[arg-type]
    assert containers.image == "provisioner-worker:abc"


def test_an_xdist_worker_reports_the_controllers_failure_without_building(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from provisioner.errors import ImageError
    from provisioner.runtime.workers import ProcessContainers

    def no_build(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("an xdist worker must not build after the controller failed")

    monkeypatch.setattr(_images_module(), "ensure_worker_image", no_build)
    containers = ProcessContainers(_FakeEnv(None, "base image missing"))  # type: ignore[arg-type]
    with pytest.raises(ImageError, match="controller could not prepare the worker image: base image missing"):
        containers.image  # noqa: B018


def test_a_failed_image_build_is_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    from provisioner.errors import ImageError
    from provisioner.runtime.workers import ProcessContainers

    images = _images_module()

    calls = []

    def failing(*args: Any, **kwargs: Any) -> str:
        calls.append(1)
        raise ImageError("base image missing")

    monkeypatch.setattr(images, "ensure_worker_image", failing)
    containers = ProcessContainers(_FakeEnv(None))  # type: ignore[arg-type]
    monkeypatch.setattr(ProcessContainers, "runtime", property(lambda self: object()))
    for _ in range(3):
        with pytest.raises(ImageError, match="base image missing"):
            containers.image  # noqa: B018
    assert calls == [1]  # later tests get the error at once, not a second build


def test_xdist_workers_receive_the_controllers_image(tmp_path: Path) -> None:
    from provisioner.testing.plugin_state import ProvisionRun

    controller = ProvisionRun.from_pytest(layer="integration", lm_mode=None, record_mode=None,
                                          report_path=None, project_dir=tmp_path, invocation_dir=tmp_path,
                                          workerinput=None)
    controller.environment.prepared_image = "provisioner-worker:abc"
    controller.environment.image_problem = "not built"
    handed = controller.workerinput()
    worker = ProvisionRun.from_pytest(layer="integration", lm_mode=None, record_mode=None, report_path=None,
                                      project_dir=tmp_path, invocation_dir=tmp_path, workerinput=handed)
    assert worker.environment.prepared_image == "provisioner-worker:abc"
    assert worker.environment.image_problem == "not built"
    assert worker.identity.run_id == controller.identity.run_id


QUICK_LAYER = """
[tool.pytest.ini_options]
addopts = "-p no:cacheprovider"

[tool.provisioner.layers.quick]
adapter = "bridge"
python = true
lm_mode = "mock"
isolation = "namespace"
timeout_s = 60.0
"""

# The first test is not charged for the pool: when its setup begins (inside pytest-timeout's timer),
# the pool is already warm. Checked by state, not by a short timeout: a 1 s layer timeout failed a
# ping's setup on a loaded machine once, and any short limit would be a wall-clock assert.
QUICK_CONFTEST = """
import pytest

from provisioner.pytest_plugin import RUN_KEY


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    assert item.config.stash[RUN_KEY].pool_warmed, "the pool was not warm when the test's setup began"
"""

QUICK_TESTS = """
import pytest

@pytest.mark.quick
def test_first(bridge):
    assert bridge.request("ping")

@pytest.mark.quick
def test_second(bridge):
    assert bridge.request("ping")
"""


@pytest.mark.docker
@pytest.mark.parametrize("workers", [None, pytest.param("2", marks=pytest.mark.slow)])
def test_first_test_is_not_charged_for_image_and_pool(pytester: pytest.Pytester, workers: str | None) -> None:
    # Before the fix the image check and the pool start ran inside the first test's setup (and its
    # layer timeout); QUICK_CONFTEST fails a test whose setup begins before the pool is warm.
    pytester.makefile(".toml", pyproject=QUICK_LAYER)
    pytester.makepyfile(test_quick=QUICK_TESTS)
    pytester.makeconftest(QUICK_CONFTEST)
    args = ["--layer", "quick", *(["-n", workers] if workers else [])]
    result = pytester.runpytest_subprocess(*args, timeout=600)
    out = result.stdout.str()
    result.assert_outcomes(passed=2)
    assert "Timeout" not in out
    assert out.count("provisioner: worker image … done in ") == 1  # once, in the controller
    if workers is None:
        assert "provisioner: warm pool of layer quick: 1 worker … done in " in out
        assert out.index("warm pool") < out.index("test_quick.py ")


@pytest.mark.parametrize("process", [None, "gw0"])
def test_a_phase_cut_off_by_ctrl_c_says_interrupted_not_an_empty_failure(process: str | None) -> None:
    # A trial's Ctrl-C of `pytest -n 2` while the pool warmed printed "…: failed: " with no reason.
    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt), Phases(out.write, process=process).phase("warm pool") as _:
        raise KeyboardInterrupt
    assert "interrupted (Ctrl-C)" in out.getvalue() and "failed" not in out.getvalue()
