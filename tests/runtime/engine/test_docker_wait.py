"""DockerRuntime.wait_exit: the engine's wait for a container to stop (the egress guard's wait)."""

from __future__ import annotations

import os
from typing import Any

import pytest

from provisioner.runtime import labels as L
from provisioner.runtime.engine import DockerRuntime, ExitWaiter

pytestmark = [pytest.mark.docker, pytest.mark.timeout(300)]


def test_wait_exit_returns_false_while_running_and_true_once_stopped_or_gone(
    docker_engine: Any, worker_image: str
) -> None:
    rt = DockerRuntime(docker_engine)
    assert isinstance(rt, ExitWaiter)
    run = f"waitexit{os.getpid()}"
    api = docker_engine.api
    # Runs until its stdin closes (no sleep as the thing waited for: the test decides when it ends).
    cid = api.create_container(worker_image, command=["python3", "-c", "import sys; sys.stdin.read()"],
                               stdin_open=True, labels={L.RUN: run}, network_disabled=True)["Id"]
    try:
        api.start(cid)
        assert rt.wait_exit(cid, 0.3) is False  # still running: the slice ran out
        api.kill(cid)
        assert rt.wait_exit(cid, 60) is True
        state = rt.container_state(cid)
        assert state is not None and not state.running
        assert rt.wait_exit(cid, 60) is True  # already stopped: at once
    finally:
        api.remove_container(cid, force=True)
    assert rt.wait_exit(cid, 5) is True  # gone
