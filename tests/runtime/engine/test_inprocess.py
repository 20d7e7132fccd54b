"""FakeRuntime(serve=True): worker containers are real bridge servers in this process, relays real
forwarders — so a deployment on the fake is reached, probed and used exactly like one on Docker."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from provisioner.bridge import BridgeClient
from provisioner.errors import BridgeConnectionError, BridgeError, RuntimeProblem
from provisioner.runtime.deployment import Deployment
from provisioner.runtime.engine import FakeRuntime
from provisioner.runtime.lifecycle import UpOptions, down, up
from provisioner.runtime.recipes import replacement_recipe
from provisioner.settings import LayerSpec, Settings

IMAGE = "provisioner-worker:served"
SIGNATURE = {"inputs": [{"name": "question"}], "outputs": [{"name": "answer", "type": "int"}]}


def _up(settings: Settings, runtime: FakeRuntime, **options: Any) -> Deployment:
    """``up`` with the real readiness probe (a bridge ``ping`` through the relay's published port)."""
    return up(settings, UpOptions(image=IMAGE, watchdog=False, **options), runtime=runtime)


def _refused(port: int) -> bool:
    """Nothing answers at 127.0.0.1:port: the connection is refused or closed without a byte."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.settimeout(5)
            return sock.recv(1) == b""
    except OSError:
        return True


def test_a_deployment_on_the_served_fake_answers_through_its_relay(
    settings: Settings, served: FakeRuntime
) -> None:
    env = _up(settings, served, layer="integration", lm_mode="mock", workers=2)
    ids = []
    for worker in env.workers:
        with BridgeClient(worker.host, worker.port, token=env.control_token) as client:
            session = client.session("t1")  # the same program id on both workers: separate processes
            session.create_program(SIGNATURE, "qa")
            assert set(session.execute_program("qa", {"question": "2 + 2?"})["outputs"]) == {"answer"}
            ids.append(client.ping()["worker_id"])
    assert ids == [w.name for w in env.workers]  # each relay port leads to its own slot's worker
    relay_ports = [w.port for w in env.workers]
    assert all(served.containers[w.container_id].served is not None for w in env.workers)
    down(settings, runtime=served)
    assert served.containers == {} and all(_refused(port) for port in relay_ports)


def test_a_replacement_takes_over_the_slots_published_address(
    settings: Settings, served: FakeRuntime
) -> None:
    env = _up(settings, served, layer="integration", lm_mode="mock", workers=1)
    worker = env.workers[0]
    served.crash(worker.container_id)
    assert served.container_state(worker.container_id).exit_code == 137  # type: ignore[union-attr]
    gone = BridgeClient(worker.host, worker.port, connect_timeout=2)
    with pytest.raises(BridgeConnectionError), gone:
        gone.ping()  # the relay closes: nobody holds the alias
    recipe = replacement_recipe(env.recipes[worker.slot], 1)
    cid = served.create_container(recipe)
    served.start_container(cid)
    with BridgeClient(worker.host, worker.port) as client:  # the same address, the new worker
        assert client.ping()["worker_id"] == recipe.name
    env.stop()


def test_a_cached_worker_records_into_the_host_folder_mounted_at_its_cassette_path(
    settings: Settings, served: FakeRuntime
) -> None:
    settings = settings.model_copy(update={"lm": settings.lm.model_copy(update={"cached_inner": "mock"})})
    env = _up(settings, served, layer="integration", lm_mode="cached", workers=1)
    assert any(m.target == "/provision/cassettes" for m in env.recipes[0].mounts)
    worker = env.workers[0]
    with BridgeClient(worker.host, worker.port) as client:
        session = client.session("t1")
        session.create_program(SIGNATURE, "qa")
        session.execute_program("qa", {"question": "what is recorded?"})
    recorded = list(Path(settings.lm.cache_dir).rglob("*.json"))
    assert recorded, f"nothing recorded under {settings.lm.cache_dir}"
    assert "what is recorded?" in json.dumps([json.loads(p.read_text()) for p in recorded])
    env.stop()


def test_a_worker_that_cannot_start_exits_with_its_error_in_the_log(served: FakeRuntime) -> None:
    from provisioner.lmconfig import LM_CONFIG_ENV
    from provisioner.runtime.recipes import ContainerRecipe

    recipe = ContainerRecipe("bad-worker", "worker", IMAGE, ("provision", "worker", "--port", "8765"),
                             {LM_CONFIG_ENV: "{not json"}, {}, ())
    cid = served.create_container(recipe)
    served.start_container(cid)  # the start succeeds; the process dies, as a real one would
    state = served.container_state(cid)
    assert state is not None and (state.status, state.exit_code) == ("exited", 1)
    assert "ConfigError" in served.logs(cid) and LM_CONFIG_ENV in served.logs(cid)


def test_the_gemini_standin_is_refused_with_what_to_do(settings: Settings, served: FakeRuntime) -> None:
    with pytest.raises(RuntimeProblem, match="not the Gemini stand-in"):
        _up(settings, served, layer="e2e", lm_mode="real", workers=1)
    assert [c for c in served.containers.values() if c.served is not None] == []


def test_a_fork_mode_worker_is_refused_with_what_to_do(settings: Settings, served: FakeRuntime) -> None:
    settings = settings.model_copy(
        update={"layers": {**settings.layers, "forked": LayerSpec(adapter="bridge", isolation="process")}}
    )
    with pytest.raises(RuntimeProblem, match="not fork-mode workers"):
        _up(settings, served, layer="forked", lm_mode="mock", workers=1)
    assert [c for c in served.containers.values() if c.served is not None] == []


def test_a_served_worker_takes_the_workers_settings_from_its_environment(
    settings: Settings, served: FakeRuntime
) -> None:
    settings = settings.model_copy(
        update={"worker": settings.worker.model_copy(update={"max_programs": 1, "max_inflight": 3})}
    )
    env = _up(settings, served, layer="integration", lm_mode="mock", workers=1)
    worker = env.workers[0]
    server = served.containers[worker.container_id].served.server
    assert server.max_inflight == 3
    with BridgeClient(worker.host, worker.port) as client:
        session = client.session("t1")
        session.create_program(SIGNATURE, "one")
        with pytest.raises(BridgeError, match="holds 1 programs, its limit"):  # max_programs = 1
            session.create_program(SIGNATURE, "two")
    env.stop()
