"""Test-suite hygiene: a run a test makes on the engine itself leaves nothing when its process dies.

Tests that make a run outside ``up``, the plugin and the Python API (``plan_run`` + ``Deployment``,
or resources labelled by hand: tests/runtime/test_docker_isolation.py's ``gate<pid>`` runs and the
like) remove it in a ``finally``. A test process SIGKILLed (xdist kills a worker that has not ended
10 s after Ctrl-C) or SIGTERMed (pytest runs no ``finally`` then) never gets there; the
``watched_run`` fixture puts such runs under the product's watchdog, which removes them. Here a
child process plays that test: it makes a labelled network under :func:`tests._helpers.watched_run`,
says so, and is killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from provisioner.runtime import labels as L
from provisioner.runtime import watchdog as wd

pytestmark = pytest.mark.docker
REPO = Path(__file__).resolve().parents[1]

CHILD = """
import sys
from pathlib import Path

import docker

sys.path.insert(0, {repo!r})
from tests._helpers import watched_run
from provisioner.runtime import labels as L

client = docker.from_env()
with watched_run({run_id!r}, Path({folder!r})):
    client.api.create_network({name!r}, internal=True, labels=L.run_labels({run_id!r}, "integration", "main"))
    print("made", flush=True)
    sys.stdin.read()  # held here until the test kills this process
    client.api.remove_network({name!r})
"""


def _run_networks(docker_engine: Any, run_id: str) -> list[str]:
    return [n.name for n in docker_engine.networks.list(filters={"label": f"{L.RUN}={run_id}"})]


def _poll(check: Callable[[], bool], deadline_s: float = 120.0) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return check()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_test_process_s_run_is_removed_by_the_watchdog(
    docker_engine: Any, tmp_path: Path, sig: signal.Signals
) -> None:
    run_id = f"watched{os.getpid()}{sig.name.lower()}"
    name = f"prov-{run_id}-net"
    code = CHILD.format(repo=str(REPO), run_id=run_id, folder=str(tmp_path), name=name)
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "made\n", child.communicate()[1]
        assert _run_networks(docker_engine, run_id) == [name]
        child.send_signal(sig)
        child.wait(timeout=60)
        log = tmp_path / "runs" / run_id / wd.LOG_FILE
        # The watchdog did it: its log names what it removed (written once the removal is done).
        assert _poll(lambda: f"network {name}" in log.read_text()), log.read_text()
        assert "every owner is gone" in log.read_text() and _run_networks(docker_engine, run_id) == []
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=60)
        for net in docker_engine.networks.list(filters={"label": f"{L.RUN}={run_id}"}):
            net.remove()


def test_a_test_that_ends_normally_stands_its_watchdog_down(
    docker_engine: Any, tmp_path: Path, watched_run: Callable[[str], Path]
) -> None:
    """The fixture's teardown path, in this process: the test removed its run itself, and the watchdog
    exits without waiting for this (long-lived xdist) process to end."""
    from tests._helpers import watched_run as watch

    run_id = f"ended{os.getpid()}"
    with watch(run_id, tmp_path) as run_dir:
        net = docker_engine.networks.create(f"prov-{run_id}", internal=True,
                                            labels=L.run_labels(run_id, "integration", "main"))
        net.remove()
        wd.wait_watching(run_dir, timeout_s=120)
    assert _poll(lambda: not wd.watchdog_alive(run_dir)), (run_dir / wd.LOG_FILE).read_text()
    assert "stopped marker found; exiting without cleanup" in (run_dir / wd.LOG_FILE).read_text()
    assert watched_run(f"{run_id}b").name == f"{run_id}b"  # the fixture's run folder
