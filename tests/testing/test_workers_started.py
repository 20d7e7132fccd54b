""""workers started" counts every worker container the run started — in a `process` layer too,
where the pool starts two fork-mode workers and the second joins when it is ready, or is still
starting when a short suite ends (Deployment's ``ready_slots``). A new-user trial saw -w0 and -w1
in ``docker ps`` while the summary and the JSON report said ``workers started: 1``."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from provisioner.runtime import labels as L

pytest_plugins = ["pytester"]

PROJECT = """
[project]
name = "procs"

[tool.provisioner.layers.procs]
adapter = "bridge"
python = true
pooling_enabled = true
lm_mode = "mock"
isolation = "process"
workers = 2
"""

SUITE = """
import pytest

@pytest.mark.procs
@pytest.mark.parametrize("n", [0, 1, 2])
def test_ping(n, isolated):
    assert isolated.adapter.ping()["status"] == "ok"
"""


pytestmark = pytest.mark.usefixtures("no_settings_env")


@pytest.mark.docker
@pytest.mark.slow
def test_a_process_layer_under_xdist_counts_both_fork_mode_workers(
    pytester: pytest.Pytester, docker_engine: Any
) -> None:
    pytester.makefile(".toml", pyproject=PROJECT)
    pytester.makepyfile(test_procs=SUITE)
    project = {"label": [f"{L.PROJECT}={L.project_id(pytester.path)}", f"{L.ROLE}={L.ROLE_WORKER}"]}
    since = int(time.time()) - 1
    result = pytester.runpytest_subprocess("--layer", "procs", "-n", "2", "-p", "no:cacheprovider",
                                           "--provision-report", "r.json", timeout=400)
    result.assert_outcomes(passed=3)
    until = int(time.time()) + 1
    created = {e["Actor"]["Attributes"]["name"] for e in docker_engine.events(
        since=since, until=until, filters={**project, "type": "container", "event": "create"}, decode=True)}
    report = json.loads((pytester.path / "r.json").read_text())
    assert len(created) == 2, created  # the pool's two fork-mode workers (-w0, -w1)
    assert report["layers"]["procs"]["workers_started"] == len(created), (created, report)
    result.stdout.fnmatch_lines([f"*workers started: {len(created)}*"])
