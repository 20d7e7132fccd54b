"""`provision up` heals (issue 14, item 6): a worker of a persistent run killed by the engine shows
how it ended in `provision status`, and `provision status --repair` restarts it behind the same
published address. Real engine, through the CLI as a user would run it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from provisioner.bridge.client import BridgeClient
from provisioner.runtime import labels as L
from provisioner.runtime.engine import DockerRuntime, remove_by_selector

from .._helpers import scratch_env
from .conftest import leftovers

pytestmark = [pytest.mark.docker, pytest.mark.timeout(600)]
PROVISION = [sys.executable, "-m", "provisioner.cli"]


def _provision(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PROVISION, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )


def test_status_names_a_killed_worker_and_repair_restarts_it_in_place(
    docker_engine: Any, worker_image: str, tmp_path: Path
) -> None:
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'repair'\n")
    env = scratch_env(tmp_path)
    env["COLUMNS"] = "240"  # the table's cells unwrapped
    run_id = f"repair{os.getpid()}"
    try:
        up = _provision(tmp_path, env, "up", "--layer", "integration", "--lm", "mock", "--workers", "2",
                        "--run-id", run_id, "--json")
        assert up.returncode == 0, up.stdout + up.stderr
        workers = json.loads(up.stdout)["workers"]
        victim = workers[0]
        docker_engine.api.kill(victim["container_id"])
        docker_engine.api.wait(victim["container_id"], timeout=60)

        # When, as the engine says (State.FinishedAt), in UTC like the rest of the CLI's output.
        finished = docker_engine.api.inspect_container(victim["container_id"])["State"]["FinishedAt"]
        died = f"exited with code 137 (SIGKILL) at {finished[:19].replace('T', ' ')} UTC"
        seen = _provision(tmp_path, env, "status")
        assert seen.returncode == 1, seen.stdout + seen.stderr
        assert died in seen.stdout and "--repair" in seen.stdout, seen.stdout

        repaired = _provision(tmp_path, env, "status", "--repair", "--json")
        assert repaired.returncode == 0, repaired.stdout + repaired.stderr
        report = json.loads(repaired.stdout)
        assert report["healthy"]
        by_name = {w["name"]: w for w in report["workers"]}
        done = by_name[victim["name"]]["repaired"]
        back = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC: down \d+\.\d s, the restart took \d+\.\d s"
        assert re.fullmatch(re.escape(f"restarted: the worker {died}; back at ") + back, done), done
        assert by_name[workers[1]["name"]]["repaired"] == ""  # the live one was left alone
        # The same container and the same published address answer again, still cut off from the host.
        assert docker_engine.api.inspect_container(victim["container_id"])["State"]["Status"] == "running"
        host, port = victim["address"].rsplit(":", 1)
        with BridgeClient(host, int(port), request_timeout=60) as client:
            session = client.session("after-repair")
            session.create_program("question -> answer", "p")
            assert "answer" in session.execute_program("p", {"question": "q"})["outputs"]
        code, out = DockerRuntime(docker_engine).exec(victim["container_id"], ["cat", "/proc/net/route"])
        assert code == 0, out
        # The guard ran again: no default route (destination 00000000) in the restarted namespace.
        assert all(line.split("\t")[1] != "00000000" for line in out.splitlines()[1:] if line.strip()), out
    finally:
        _provision(tmp_path, env, "down", "--run", run_id)
        remove_by_selector(DockerRuntime(docker_engine), L.selector(run_id))
    assert leftovers(docker_engine, run_id) == []
