"""Against the real engine: a real-mode run (worker container + Gemini stand-in container) where a
client of the worker tries to take what belongs to the run — the endpoint and key, the budget, the
worker-wide commands (issue 14, items 1-3) — and the run's controller, with the token from the env
file, still has the worker."""

from __future__ import annotations

import json
import shlex
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from provisioner.bridge.client import BridgeClient
from provisioner.bridge.protocol import CONTROL_TOKEN_ENV
from provisioner.errors import BridgeError
from provisioner.lm.limits import RUN_LIMITS_FILE, RunLimits
from provisioner.runtime.lifecycle import UpOptions, down, up
from provisioner.runtime.state import run_dir_of
from provisioner.settings import Settings

from .conftest import leftovers, scratch_settings

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(900)]
QA = {"inputs": [{"name": "question"}], "outputs": [{"name": "answer"}]}
LIMIT_USD = 0.001


def _settings(folder: Path) -> Settings:
    return scratch_settings(folder, 60.0, **{"lm.cost_limit_usd": LIMIT_USD, "lm.rate_limit_rpm": 1000})


@pytest.fixture(scope="module")
def real_run(
    docker_engine: Any, worker_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    settings = _settings(tmp_path_factory.mktemp("accessrun"))
    env = up(settings, UpOptions(layer="e2e", workers=1, image=worker_image, persistent=False))
    try:
        assert env.plan.uses_standin and env.plan.lm_mode == "real"
        yield settings, env
    finally:
        down(settings, run_id=env.plan.run_id)
        assert leftovers(docker_engine, env.plan.run_id) == []


class Frames:
    """One connection speaking raw frames, as a controller in another language would."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        self.reader = self.sock.makefile("rb")
        self.ids = 0

    def call(self, command: str, **args: Any) -> dict[str, Any]:
        self.ids += 1
        body = json.dumps({"id": self.ids, "command": command, "args": args}).encode()
        self.sock.sendall(struct.pack(">I", len(body)) + body)
        (size,) = struct.unpack(">I", self.reader.read(4))
        return dict(json.loads(self.reader.read(size)))

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def _token_from_env_file(settings: Settings, run_id: str) -> str:
    env_file = run_dir_of(settings, run_id).env_file
    assert env_file.stat().st_mode & 0o777 == 0o600
    shell = subprocess.run(
        ["bash", "-c", f"source {shlex.quote(str(env_file))} && echo ${CONTROL_TOKEN_ENV}"],
        capture_output=True, text=True, check=True,
    )
    return shell.stdout.strip()


def test_a_client_cannot_repoint_the_key_lift_the_budget_or_take_the_worker(
    docker_engine: Any, real_run: Any
) -> None:
    settings, env = real_run
    address = env.addresses()[0]
    token = _token_from_env_file(settings, env.plan.run_id)
    assert token == env.control_token and len(token) >= 40

    # The token is a secret: not in the state file, the container's labels, command or logs.
    state_text = run_dir_of(settings, env.plan.run_id).state_file.read_text()
    info = docker_engine.api.inspect_container(env.workers[0].container_id)
    logs = docker_engine.containers.get(env.workers[0].container_id).logs().decode(errors="replace")
    for where in (state_text, json.dumps(info["Config"]["Labels"]), json.dumps(info["Config"]["Cmd"]), logs):
        assert token not in where

    anyone = Frames(address)
    try:
        # 1. The endpoint and the key are the run's.
        elsewhere = "http://203.0.113.7:8080/"
        reply = anyone.call("configure_lm", session_id="e", base_url=elsewhere, max_retries=0)
        assert not reply["success"] and reply["error_type"] == "InvalidLMConfig"
        assert "'base_url'" in reply["error"]
        # 2. So is the budget.
        reply = anyone.call("configure_lm", session_id="greedy", cost_limit_usd=1000)
        assert not reply["success"] and "'cost_limit_usd'" in reply["error"]
        # 3. Worker-wide commands need the token; session commands do not.
        worker_wide: tuple[tuple[str, dict[str, Any]], ...] = (
            ("reset_state", {}), ("shutdown", {}), ("list_programs", {"all_sessions": True}),
            ("configure_lm", {"mode": "mock"}),
        )
        for command, args in worker_wide:
            reply = anyone.call(command, **args)
            assert not reply["success"] and reply["error_type"] == "Unauthorized", (command, reply)
        assert anyone.call("create_program", session_id="greedy", program_id="qa", signature=QA)["success"]
        stats = anyone.call("get_stats")["result"]
        assert stats["scope"] == "aggregate" and "sessions" not in stats
    finally:
        anyone.close()

    # The budget holds for the greedy session: calls are refused once the run's $0.001 is spent.
    host, port = address.rsplit(":", 1)
    with BridgeClient(host, int(port), request_timeout=60) as c:
        greedy = c.session("greedy")
        refused = None
        for n in range(300):
            try:
                greedy.execute_program("qa", {"question": f"spend {n}"})
            except BridgeError as exc:
                refused = exc
                break
        assert refused is not None and refused.error_type == "CostLimitExceeded", refused
    assert env.state is not None and env.state.lm_run_dir is not None
    lm_dir = Path(env.state.lm_run_dir)
    assert json.loads((lm_dir / RUN_LIMITS_FILE).read_text())["cost_limit_usd"] == LIMIT_USD
    spent = RunLimits(lm_dir, rpm=1, cost_limit_usd=0).snapshot()
    assert 0 < spent.spent_usd <= LIMIT_USD

    # The controller, with the token from the env file, has the whole worker.
    controller = Frames(address)
    try:
        hello = controller.call("hello", token=token)["result"]
        assert hello["capabilities"] == ["session", "control"]
        stats = controller.call("get_stats")["result"]
        assert stats["scope"] == "worker" and "greedy" in stats["sessions"]
        # One thread per connection: the worker read its pids limit (256) and stays below it.
        assert info["HostConfig"]["PidsLimit"] == 256 and stats["max_connections"] == 256 - 8 - 48
        reset = controller.call("reset_state")
        assert reset["success"] and reset["result"]["sessions_removed"] >= 1
    finally:
        controller.close()
