"""A pytest session that runs nothing — ``--collect-only``, ``--setup-plan``, ``--fixtures`` — starts
no container, builds no image and prints no summary block, also under xdist (it used to warm the
pool for a run that executed nothing, and sum up its zero tests). Checked on the real engine's
event stream: no container of the project was created in the window."""

from __future__ import annotations

import time
from typing import Any

import pytest

from provisioner.runtime import labels as L

pytest_plugins = ["pytester"]

SUITE = '''
import pytest


@pytest.mark.e2e
def test_one(isolated):
    assert isolated.adapter is not None


@pytest.mark.e2e
def test_two(bridge_pool):
    assert bridge_pool is not None
'''


pytestmark = pytest.mark.usefixtures("no_settings_env")


@pytest.mark.docker
@pytest.mark.parametrize("args", [
    pytest.param(["--collect-only"], id="collect-only"),
    pytest.param(["--setup-plan"], id="setup-plan"),
    # Second ways through the same check (slow tier): an xdist worker's own warm-up, --fixtures.
    pytest.param(["--setup-plan", "-n", "2"], id="setup-plan-xdist", marks=pytest.mark.slow),
    pytest.param(["--fixtures"], id="fixtures", marks=pytest.mark.slow),
])
def test_a_session_that_runs_nothing_starts_no_container(
    pytester: pytest.Pytester, docker_engine: Any, args: list[str]
) -> None:
    pytester.makepyprojecttoml("[project]\nname = 'nothing'\n")
    pytester.makepyfile(test_suite=SUITE)
    project = {"label": [f"{L.PROJECT}={L.project_id(pytester.path)}"]}
    since = int(time.time()) - 1
    result = pytester.runpytest_subprocess("--layer", "e2e", "--lm", "mock", "-p", "no:cacheprovider", *args,
                                           timeout=400)
    assert result.ret == 0, result.stdout.str()
    until = int(time.time()) + 1
    events = list(docker_engine.events(since=since, until=until, filters={**project, "type": "container"},
                                       decode=True))
    assert events == [], [(e.get("Action"), e.get("Actor", {}).get("Attributes", {})) for e in events]
    output = result.stdout.str()
    assert "provisioner: warm pool" not in output and "provisioner: worker image" not in output
    # Nothing ran: no summary block ("layer e2e: 0 tests (none run)", workers, LM calls, cost) either.
    assert "= provisioner =" not in output and "LM calls:" not in output, output
    if args == ["--setup-plan"]:  # (xdist does not show its workers' plan)
        result.stdout.fnmatch_lines(["*SETUP*isolated*"])  # the plan names the fixtures it would set up
