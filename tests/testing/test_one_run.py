"""One run, shared (issue 10, item 4), against the real engine through pytester: a pytest session
attaches to a running `provision up` environment (no new container, with and without xdist), and
the xdist processes of one session share one pool (no more workers than one process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from provisioner.runtime import labels as L

pytest_plugins = ["pytester"]

PROVISION = [sys.executable, "-m", "provisioner.cli"]

SUITE = '''
import json
import os
import time

import docker
import pytest

from provisioner.factories import ProgramFactory
from provisioner.pytest_plugin import RUN_KEY

OUT = {out!r}


_GROWN = []


@pytest.fixture
def grown(request, isolated):
    """A pooled layer's pool starts one worker and grows on demand: with a session open in each
    xdist process (isolated, set up first), the run's demand is two sessions at once, so the pool
    grows to its two workers. Wait for that (with a deadline) once per process, so the sessions
    below spread over the whole pool."""
    if request.config.getoption("provision_layer") != "e2e" or _GROWN:
        return
    pool = request.getfixturevalue("bridge_pool")
    deadline = time.monotonic() + 240
    while len(pool.stats()["workers"]) < 2:  # stats() also reads workers another process added
        assert time.monotonic() < deadline, pool.stats()
        time.sleep(0.2)
    _GROWN.append(True)


@pytest.mark.{layer}
@pytest.mark.parametrize("n", range({tests}))
def test_isolated_session(isolated, grown, request, n):
    client = isolated.adapter
    client.create_program(**ProgramFactory.build(id="qa").create_args())  # the same id in every test
    assert "answer" in client.execute_program("qa", {{"question": "same"}})["outputs"]
    run = request.config.stash[RUN_KEY]
    engine = docker.from_env()
    mine = {{"label": ["provisioner.project={project}"]}}
    ours = {{"label": [f"provisioner.run={{run.identity.run_id}}"]}}
    row = {{
        "xdist": os.environ.get("PYTEST_XDIST_WORKER", "main"),
        "port": client.bridge.port,
        "project_containers": sorted(c.id for c in engine.containers.list(all=True, filters=mine)),
        "run_workers": sorted(c.name for c in engine.containers.list(all=True, filters=ours)
                              if c.labels.get("provisioner.role") == "worker"),
    }}
    with open(os.path.join(OUT, f"{{row['xdist']}}-{{n}}.json"), "w") as fh:
        json.dump(row, fh)
'''


pytestmark = pytest.mark.usefixtures("no_settings_env")


def _project(pytester: pytest.Pytester, layer: str, tests: int) -> Path:
    out = pytester.path / "out"
    out.mkdir()
    pytester.makepyprojecttoml('[tool.provisioner]\nlm.cached_inner = "mock"\n')
    project = L.project_id(pytester.path)
    pytester.makepyfile(test_suite=SUITE.format(out=str(out), layer=layer, tests=tests, project=project))
    return out


def _rows(out: Path) -> list[dict[str, Any]]:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    for p in out.glob("*.json"):
        p.unlink()
    return rows


def _provision(pytester: pytest.Pytester, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PROVISION, *args], cwd=pytester.path, capture_output=True, text=True, timeout=600,
                          check=False)


@pytest.mark.docker
def test_pytest_attaches_to_provision_up_and_starts_no_container(pytester: pytest.Pytester, docker_engine: Any
                                                                 ) -> None:
    out = _project(pytester, "integration", tests=4)
    up = _provision(pytester, "up", "--layer", "integration")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        project = {"label": [f"{L.PROJECT}={L.project_id(pytester.path)}"]}
        before = sorted(c.id for c in docker_engine.containers.list(all=True, filters=project))
        assert before  # the up run's relay and workers

        one = pytester.runpytest_subprocess("--layer", "integration", "-p", "no:cacheprovider", timeout=400)
        one.assert_outcomes(passed=4)
        one.stdout.fnmatch_lines(["provisioner: attached to run * (2 worker(s), started by `provision up`)*"])
        one.stdout.fnmatch_lines(["*workers started: 0*"])
        rows = _rows(out)
        assert rows and all(r["project_containers"] == before for r in rows)  # not one new container

        two = pytester.runpytest_subprocess("--layer", "integration", "-n", "2", "-p", "no:cacheprovider",
                                            timeout=400)
        two.assert_outcomes(passed=4)
        rows = _rows(out)
        assert {r["xdist"] for r in rows} == {"gw0", "gw1"}
        assert all(r["project_containers"] == before for r in rows)
        # The attached run is left running: the session removed nothing of it.
        assert sorted(c.id for c in docker_engine.containers.list(all=True, filters=project)) == before

        # A user's trial: with a worker of the up run killed, the header, the attach line and the
        # summary said "attached" while the session started its own workers (a raw UserWarning with
        # a file path, twice under -n 2, said so mid-line). Now the one decision is said everywhere.
        (w0,) = [c for c in docker_engine.containers.list(filters=project) if c.name.endswith("-w0")]
        w0.kill()
        dead = pytester.runpytest_subprocess("--layer", "integration", "-n", "2", "-v",
                                             "-p", "no:cacheprovider", timeout=400)
        dead.assert_outcomes(passed=4)
        not_attached = ("*own run for this session, not attaching: `provision up` run * has a worker that no "
                        "longer runs (repair it: `provision status --repair`, or `provision down` and "
                        "`provision up`)")
        dead.stdout.fnmatch_lines([f"provisioner: {not_attached[1:]}", not_attached, "*workers started: 1*"])
        text = dead.stdout.str() + dead.stderr.str()
        assert "attach to run" not in text and "attached to run" not in text, text
        assert "UserWarning" not in text and "workers.py" not in text, text
    finally:
        down = _provision(pytester, "down")
        assert down.returncode == 0, down.stdout + down.stderr
    assert docker_engine.containers.list(all=True, filters=project) == []


@pytest.mark.slow  # the fast tier takes this path on the fake runtime: tests/test_api.py, "did not attach"
@pytest.mark.docker
def test_a_session_whose_record_mode_differs_starts_its_own_run_and_says_why(
    pytester: pytest.Pytester, docker_engine: Any
) -> None:
    _project(pytester, "integration", tests=1)
    up = _provision(pytester, "up", "--layer", "integration")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        project = {"label": [f"{L.PROJECT}={L.project_id(pytester.path)}"]}
        before = sorted(c.id for c in docker_engine.containers.list(all=True, filters=project))
        other = pytester.runpytest_subprocess("--layer", "integration", "--record-mode", "none",
                                              "-p", "no:cacheprovider", timeout=400)
        other.stdout.fnmatch_lines(["provisioner: own run for this session, not attaching: `provision up` "
                                    "run * differs: record mode *", "*workers started: 1*"])
        # Its own run is gone after it; the `provision up` run stays.
        assert sorted(c.id for c in docker_engine.containers.list(all=True, filters=project)) == before
    finally:
        down = _provision(pytester, "down")
        assert down.returncode == 0, down.stdout + down.stderr


@pytest.mark.slow
@pytest.mark.docker
def test_xdist_processes_share_one_pool(pytester: pytest.Pytester, docker_engine: Any) -> None:
    """`pytest -n 2 --layer e2e` starts the layer's pool once (2 workers, as `-n 1`), and both xdist
    processes spread their sessions over it; the run's containers are gone afterwards."""
    out = _project(pytester, "e2e", tests=6)
    result = pytester.runpytest_subprocess("--layer", "e2e", "--lm", "mock", "-n", "2",
                                           "-p", "no:cacheprovider", "--provision-report", "report.json",
                                           timeout=400)
    result.assert_outcomes(passed=6)
    rows = _rows(out)
    workers = {name for r in rows for name in r["run_workers"]}
    assert len(workers) == 2, workers  # the e2e layer's max_pool_size, not 2 per xdist process
    assert all("-pool-" in name for name in workers)
    assert {r["xdist"] for r in rows} == {"gw0", "gw1"}
    assert len({r["port"] for r in rows}) == 2  # sessions spread over both workers
    report = json.loads((pytester.path / "report.json").read_text())
    assert report["layers"]["e2e"]["workers_started"] == 2  # grown on demand: one session per process
    # Every test's execute_program made one mock call inside a worker container: the report counts
    # them (the replies' lm_usage, summed over both xdist processes), not 0.
    assert report["layers"]["e2e"]["lm_calls"]["mock"] == 6
    run_id = report["run_id"]
    labels = {"label": [f"{L.RUN}={run_id}"]}
    assert docker_engine.containers.list(all=True, filters=labels) == []
    assert docker_engine.networks.list(filters=labels) == []
