"""A run published off loopback: its workers demand a hello with the run's bridge token on every
connection, and everything of provisioner's own (readiness, status, pooled clients, the env file)
presents it. FakeRuntime(serve=True) runs real bridge servers on loopback, so the off-loopback
decision (:func:`bridge_token_for`) is forced here."""

from __future__ import annotations

import json
import socket

import pytest
from dotenv import dotenv_values

from provisioner.bridge import BridgeClient
from provisioner.bridge.protocol import BRIDGE_TOKEN_ENV, decode_reply, dumps, encode_frame, read_frame
from provisioner.runtime import lifecycle
from provisioner.runtime.engine import FakeRuntime
from provisioner.runtime.pool import WorkerPool
from provisioner.runtime.recipes import bridge_token_for
from provisioner.runtime.state import run_dir_of
from provisioner.settings import Settings

from .conftest import FAKE_IMAGE

TOKEN = "bridge-token-of-the-test-4d2a9e"


def test_a_bridge_token_only_off_loopback() -> None:
    assert bridge_token_for("127.0.0.1") is None and bridge_token_for("::1") is None
    made = bridge_token_for("10.213.7.2")
    assert made is not None and len(made) >= 40 and made != bridge_token_for("10.213.7.2")


def _first_frame(host: str, port: int, message: dict[str, object], *, then_closed: bool) -> dict[str, object]:
    """Send one first frame over a raw socket; the reply, and whether the worker then hangs up."""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(encode_frame(dumps(message)))
        reader = sock.makefile("rb")
        payload = read_frame(reader)
        assert payload is not None
        decode_reply(payload)
        if then_closed:
            assert reader.read(1) == b"", "the connection stays open"
        else:
            sock.sendall(encode_frame(dumps({"id": 2, "command": "ping"})))
            second = read_frame(reader)
            assert second is not None and json.loads(second)["success"] is True
        reply: dict[str, object] = json.loads(payload)
        return reply


def test_an_off_loopback_run_demands_the_token_and_provisioner_presents_it(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lifecycle, "bridge_token_for", lambda host: TOKEN)
    served = FakeRuntime(images=(FAKE_IMAGE,), serve=True)
    try:
        env = lifecycle.up(
            settings,
            lifecycle.UpOptions(image=FAKE_IMAGE, watchdog=False, layer="integration", lm_mode="mock",
                                workers=1, persistent=False),
            runtime=served,
        )  # readiness pinged with the token
        assert env.state is not None
        run_dir = run_dir_of(settings, env.state.run_id)
        assert dotenv_values(run_dir.env_file)[BRIDGE_TOKEN_ENV] == TOKEN
        assert TOKEN not in run_dir.state_file.read_text()
        worker = env.workers[0]
        reply = _first_frame(worker.host, worker.port, {"id": 1, "command": "ping"}, then_closed=True)
        assert reply["error_type"] == "Unauthorized"
        hello = {"id": 1, "command": "hello", "args": {"token": TOKEN}}
        reply = _first_frame(worker.host, worker.port, hello, then_closed=False)
        assert reply["success"] is True
        with BridgeClient(worker.host, worker.port, token=TOKEN) as client:
            assert client.ping()["status"] == "ok"
        report = lifecycle.status(settings, run_id=env.state.run_id, runtime=served)
        assert [w.ping_ok for w in report.workers] == [True]
        with WorkerPool(env, owns_environment=True) as pool:
            pool.open_session("s")
            session = pool.client("s")
            session.configure_lm(mode="mock", mock_default="x")
            session.create_program("question -> answer", "qa")
            assert session.execute_program("qa", {"question": "q"})["outputs"] == {"answer": "x"}
            session.close()
    finally:
        served.close()
