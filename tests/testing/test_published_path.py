"""The pytest plugin's pool heals a dead published port (issue 14, item 7, host side): a test kills
the engine's forwarder of its worker's 127.0.0.1 port (tests/runtime/forwarder.py) while the relay
and the worker run; its own next request and every later test still pass, on the same worker.
Real engine, a user's project run by pytest in a subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .._helpers import without_settings

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(600)]

FORWARDER = Path(__file__).parents[1] / "runtime" / "forwarder.py"

SUITE = '''
import json
import os

import pytest

from forwarder import forwarder_pid, kill_forwarder

OUT = {out!r}


def _use(bridge):
    bridge.create_program("question -> answer", "p")
    assert "answer" in bridge.execute_program("p", {{"question": "q"}})["outputs"]


@pytest.mark.e2e
def test_before(bridge):
    _use(bridge)


@pytest.mark.e2e
def test_kills_the_forwarder_of_its_port(bridge, bridge_pool):
    pinned = bridge_pool.session(bridge.session_id)
    bridge.create_program("question -> answer", "p")
    kill_forwarder(pinned.port)
    # Refused, healed (the relay re-created on the same ports), sent again: answered.
    assert "answer" in bridge.execute_program("p", {{"question": "q"}})["outputs"]
    assert forwarder_pid(pinned.port) is not None


@pytest.mark.e2e
@pytest.mark.parametrize("n", range(3))
def test_after(bridge, bridge_pool, n):
    _use(bridge)
    if n == 2:
        with open(os.path.join(OUT, "stats.json"), "w") as fh:
            json.dump(bridge_pool.stats(), fh)
'''


def test_a_dead_published_port_is_healed_and_the_tests_go_on(docker_engine: Any, tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'dead-port'\n")
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "test_dead_port.py").write_text(SUITE.format(out=str(out)))
    shutil.copy(FORWARDER, tmp_path / "forwarder.py")
    env = without_settings()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "--layer", "e2e", "--lm", "mock",
         "-p", "no:cacheprovider", "-o", "log_level=WARNING", "test_dead_port.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500,
    )
    summary = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 0 and "5 passed" in summary, done.stdout + done.stderr
    assert "error" not in summary, done.stdout
    stats = json.loads((out / "stats.json").read_text())
    assert stats["replaced"] == 0 and stats["lost_sessions"] == 0, stats  # the workers were never touched
    healed = [n for n in stats["notes"] if "forwarder for it is gone" in n and "re-created the relay" in n]
    assert healed, stats
    run_id = next((tmp_path / ".provision" / "runs").iterdir()).name
    labels = {"label": [f"provisioner.run={run_id}"]}
    assert docker_engine.api.containers(all=True, filters=labels) == []
    assert docker_engine.api.networks(filters=labels) == []
