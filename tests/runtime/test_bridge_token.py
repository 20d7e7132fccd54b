"""A run published off loopback: its workers demand a hello with the run's bridge token on every
connection, and everything of provisioner's own (readiness, status, pooled clients, the env file)
presents it. FakeRuntime(serve=True) runs real bridge servers on loopback, so the off-loopback
decision (:func:`bridge_token_for`) is forced here."""

from __future__ import annotations

import json
import socket
from pathlib import Path

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

from .._helpers import clear_settings
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


def test_a_session_attached_to_an_off_loopback_up_run_says_hello_with_its_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attach path (what a pytest session after `provision up` on a remote engine takes, here
    through the Python API, which shares it): the up run's PROVISION_BRIDGE_TOKEN from its env file
    (state.bridge_token_of) goes with every connection of the attached pool — without it each
    session's first request is refused (Unauthorized) and the connection closed."""
    from provisioner import api
    from provisioner.settings import load_settings

    clear_settings(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text(
        f'[tool.provisioner]\nlm.cached_inner = "mock"\ncontainer.image = "{FAKE_IMAGE}"\n'
    )
    monkeypatch.setattr(lifecycle, "bridge_token_for", lambda host: TOKEN)
    settings = load_settings(project_dir=tmp_path)
    served = FakeRuntime(images=(FAKE_IMAGE,), serve=True)
    up_id = ""
    try:
        options = lifecycle.UpOptions(layer="integration", watchdog=False, workers=1)
        deployment = lifecycle.up(settings, options, runtime=served)
        assert deployment.state is not None
        up_id = deployment.state.run_id
        with api.environment("integration", project_dir=tmp_path, runtime=served) as env:
            assert env.up_run is not None and env.up_run.run_id == up_id
            with env.session("attached") as test:
                test.adapter.create_program("question -> answer", "qa")
                assert test.adapter.execute_program("qa", {"question": "?"})["outputs"]["answer"]
        worker = deployment.workers[0]
        assert _first_frame(worker.host, worker.port, {"id": 1, "command": "ping"},
                            then_closed=True)["error_type"] == "Unauthorized"  # the token was needed
    finally:
        if up_id:
            lifecycle.down(settings, run_id=up_id, runtime=served)
        served.close()


def test_processes_attaching_to_a_run_s_pool_get_its_token_from_a_0600_file(
    settings: Settings, tmp_path: Path
) -> None:
    """xdist: the process that deploys the run's pool off loopback writes the bridge token beside
    pool.json (0600, never into pool.json); a process that attaches reads it, its sessions work;
    the file goes with the pool."""
    from provisioner.layers import get_layer
    from provisioner.runtime import shared_pool as sp
    from provisioner.runtime.deployment import Deployment
    from provisioner.runtime.recipes import Owner, PlanOptions, RunTarget, plan_run

    served = FakeRuntime(images=(FAKE_IMAGE,), serve=True)
    run_dir = tmp_path / "run"

    def deploy() -> Deployment:
        layer = get_layer(settings, "integration")
        target = RunTarget("tok1", Owner.this_process(), instance=sp.POOL_INSTANCE)
        plan = plan_run(settings, layer, layer.lm_config(settings.lm, "mock"), target, FAKE_IMAGE,
                        PlanOptions(workers=1, bridge_token=TOKEN))
        return Deployment(plan, served, ready_timeout_s=30).start()

    pools: list[WorkerPool] = []
    try:
        first = sp.obtain_pool(run_dir, "tok1", runtime=served, deploy=deploy,
                               make_pool=lambda env, _d: WorkerPool(env), ready_timeout_s=30)
        pools.append(first.pool)
        token_file = run_dir / sp.BRIDGE_TOKEN_FILE
        assert token_file.read_text() == TOKEN and (token_file.stat().st_mode & 0o777) == 0o600
        assert TOKEN not in (run_dir / sp.POOL_FILE).read_text()
        second = sp.obtain_pool(run_dir, "tok1", runtime=served, deploy=deploy,
                                make_pool=lambda env, _d: WorkerPool(env), ready_timeout_s=30)
        pools.append(second.pool)
        assert not second.deployed and second.environment.bridge_token == TOKEN
        second.pool.open_session("s2")
        assert second.pool.client("s2").ping()["status"] == "ok"
    finally:
        for pool in pools:
            pool.close()
        sp.remove_shared_pool(run_dir, "tok1", served)
        served.close()
    assert not (run_dir / sp.BRIDGE_TOKEN_FILE).exists()
