"""The publish address: detected from the engine's URL (DOCKER_HOST), overridable, never every interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from provisioner.errors import ConfigError
from provisioner.runtime.engine import DockerRuntime, is_loopback, publish_host_for
from provisioner.runtime.engine.address import LOOPBACK
from provisioner.runtime.engine.docker import engine_url
from provisioner.runtime.state import RunState


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (None, LOOPBACK),
        ("unix:///var/run/docker.sock", LOOPBACK),
        ("npipe:////./pipe/docker_engine", LOOPBACK),
        ("tcp://127.0.0.1:2376", LOOPBACK),
        ("tcp://localhost:2375", LOOPBACK),
        ("tcp://[::1]:2376", LOOPBACK),
        ("tcp://10.213.7.2:2376", "10.213.7.2"),
        ("https://192.0.2.10:2376", "192.0.2.10"),
        ("ssh://ci@10.213.7.2", "10.213.7.2"),
        ("ssh://ci@10.213.7.2:2222", "10.213.7.2"),
        ("tcp://[2001:db8::5]:2376", "2001:db8::5"),
    ],
)
def test_publish_host_follows_the_engine_url(url: str | None, expected: str) -> None:
    assert publish_host_for(url) == expected


def test_a_host_name_resolves_on_the_controller() -> None:
    assert publish_host_for("tcp://localhost:2376") == LOOPBACK
    assert is_loopback(publish_host_for("ssh://me@localhost"))


def test_the_override_wins_over_the_url() -> None:
    assert publish_host_for("tcp://10.213.7.2:2376", "10.213.9.9") == "10.213.9.9"
    assert publish_host_for(None, "192.0.2.4") == "192.0.2.4"


@pytest.mark.parametrize("every", ["0.0.0.0", "::", "[::]"])
def test_every_interface_is_refused_naming_the_setting(every: str) -> None:
    with pytest.raises(ConfigError, match="PROVISION_PUBLISH_HOST"):
        publish_host_for("tcp://10.213.7.2:2376", every)


def test_an_unresolvable_host_names_the_setting() -> None:
    with pytest.raises(ConfigError, match="PROVISION_PUBLISH_HOST"):
        publish_host_for("tcp://no-such-host.invalid:2376")


def test_the_env_file_names_the_publish_host() -> None:
    state = RunState(
        run_id="r1", layer="unit", lm_mode="mock", instance="i", image="img", created=0.0, owner_pid=1,
        owner_host="h", persistent=False, uses_standin=False, egress=False, networks=[], relay="relay",
        standin=None, workers=[{"slot": 0, "name": "w0", "container_id": "c", "address": "10.213.7.2:41000"}],
    )
    env = state.env()
    assert env["PROVISION_BRIDGE_HOST"] == "10.213.7.2"
    assert env["PROVISION_BRIDGE_ADDRS"] == "10.213.7.2:41000"


def test_the_current_docker_context_names_the_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A docker context (made and selected through docker-py's ContextAPI) is the engine when
    DOCKER_HOST is unset; DOCKER_CONTEXT picks another one; DOCKER_HOST wins over both."""
    from docker.context import ContextAPI

    monkeypatch.delenv("DOCKER_HOST", raising=False)
    monkeypatch.delenv("DOCKER_CONTEXT", raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert engine_url() == (None, "default")
    ContextAPI.create_context("prov-remote-a", host="tcp://10.213.7.2:2376")
    ContextAPI.create_context("prov-remote-b", host="tcp://10.213.7.3:2376")
    ContextAPI.set_current_context("prov-remote-a")
    url, source = engine_url()
    assert source == "docker context prov-remote-a" and publish_host_for(url) == "10.213.7.2"
    monkeypatch.setenv("DOCKER_CONTEXT", "prov-remote-b")
    url, source = engine_url()
    assert source == "docker context prov-remote-b" and publish_host_for(url) == "10.213.7.3"
    monkeypatch.setenv("DOCKER_HOST", "tcp://10.213.7.4:2376")
    assert engine_url() == ("tcp://10.213.7.4:2376", "DOCKER_HOST")


@pytest.mark.parametrize(
    ("config", "context_env", "names"),
    [
        (None, None, False),  # no config file: docker-py's default
        ("{}", None, False),
        ('{"currentContext": "default"}', None, False),
        ("not json", None, False),  # docker-py reads a broken file as "default" too
        ('["a list"]', None, False),
        ('{"currentContext": "prov-remote-a"}', None, True),
        (None, "prov-remote-b", True),
    ],
)
def test_the_context_short_cut_agrees_with_docker_py(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: str | None, context_env: str | None, names: bool
) -> None:
    """engine_url answers "default" without importing docker-py only where docker-py's own current
    context name is "default" (the plugin's start then does not pay docker-py's import)."""
    from docker.context.config import get_current_context_name

    from provisioner.runtime.engine.docker import _names_a_context

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.docker/config.json, no ~/.dockercfg
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    monkeypatch.delenv("DOCKER_CONTEXT", raising=False)
    if context_env is not None:
        monkeypatch.setenv("DOCKER_CONTEXT", context_env)
    if config is not None:
        (tmp_path / "config.json").write_text(config)
    assert _names_a_context() is names
    if context_env is None:
        assert (get_current_context_name() != "default") is names


def test_containers_are_published_on_the_runtime_publish_host() -> None:
    """DockerRuntime binds every published port of a recipe on its publish host (not 127.0.0.1)."""
    from provisioner.runtime.recipes import ContainerRecipe

    made: dict[str, Any] = {}

    class _Containers:
        def create(self, **kwargs: Any) -> Any:
            made.update(kwargs)
            return type("C", (), {"id": "c1"})()

    client = type("Client", (), {"containers": _Containers(), "api": None})()
    rt = DockerRuntime(client, publish_host="10.213.7.2")
    recipe = ContainerRecipe(name="n", role="relay", image="img", command=("x",), environment={}, labels={},
                             networks=(), ports=(9000, 9001))
    assert rt.create_container(recipe) == "c1"
    assert made["ports"] == {"9000/tcp": ("10.213.7.2", None), "9001/tcp": ("10.213.7.2", None)}


def test_the_hosts_a_controller_of_a_remote_engine_reaches() -> None:
    from provisioner.runtime.engine import remote_hosts

    assert remote_hosts(None, "127.0.0.1") == ()
    assert remote_hosts("unix:///var/run/docker.sock", "127.0.0.1") == ()
    assert remote_hosts("tcp://10.213.7.2:2376", "10.213.7.2") == ("10.213.7.2",)
    assert remote_hosts("ssh://root@engine.example", "10.0.0.9") == ("engine.example", "10.0.0.9")
    assert remote_hosts("tcp://127.0.0.1:2376", "127.0.0.1") == ()


def test_no_engine_at_the_address_names_it_and_where_it_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user whose DOCKER_HOST (or docker context) points at nothing learns which address was tried."""
    import socket

    from provisioner.errors import DockerUnavailableError
    from provisioner.runtime.engine.docker import connect

    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("DOCKER_HOST", f"tcp://127.0.0.1:{port}")
    with pytest.raises(DockerUnavailableError) as info:
        connect(timeout=5)
    assert f"at tcp://127.0.0.1:{port} (from DOCKER_HOST)" in str(info.value)
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/docker.sock")
    with pytest.raises(DockerUnavailableError) as info:
        connect(timeout=5)
    assert f"at unix://{tmp_path}/docker.sock (from DOCKER_HOST)" in str(info.value)
