"""A second, real Docker engine in a network namespace this test creates, reached over TCP with TLS
certificates made by trustme: open_runtime reaches it through docker-py's own DOCKER_HOST /
DOCKER_TLS_VERIFY / DOCKER_CERT_PATH handling and publishes on its host's address.

Needs root, ``ip``, ``nsenter`` and ``dockerd`` (as on this project's CI machine); the fixture
removes everything it made (dockerd, namespace, veth, directories) even when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from provisioner.runtime.doctor import doctor
from provisioner.runtime.engine import open_runtime
from provisioner.runtime.polling import poll_until
from provisioner.settings import Settings

pytestmark = pytest.mark.docker


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def remote_engine(tmp_path: Path, prerequisite: Callable[[str], NoReturn]) -> Iterator[dict[str, str]]:
    """dockerd in netns ``prov-remote-<pid>`` on ``tcp://10.213.<n>.2:2376`` with TLS; yields the
    DOCKER_* variables that reach it."""
    import trustme

    missing = [t for t in ("ip", "nsenter", "dockerd") if shutil.which(t) is None]
    if missing or os.geteuid() != 0:
        prerequisite(f"the remote-engine test needs root, ip, nsenter and dockerd (missing: "
                     f"{', '.join(missing) or 'root'})")
    pid = os.getpid()
    ns, host_if, ns_if = f"prov-remote-{pid}", f"vprh{pid}"[:15], f"vprc{pid}"[:15]
    subnet = f"10.213.{pid % 250}"
    addr = f"{subnet}.2"
    data = Path(f"/tmp/prov-remote-{pid}")  # short: dockerd's exec-root holds unix sockets
    certs = tmp_path / "certs"
    certs.mkdir()
    ca = trustme.CA()
    server = ca.issue_cert(addr)
    client = ca.issue_cert("provisioner-test-client")
    ca.cert_pem.write_to_path(str(certs / "ca.pem"))
    server.private_key_pem.write_to_path(str(certs / "server-key.pem"))
    server.cert_chain_pems[0].write_to_path(str(certs / "server-cert.pem"))
    client.private_key_pem.write_to_path(str(certs / "key.pem"))
    client.cert_chain_pems[0].write_to_path(str(certs / "cert.pem"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _run("ip", "link", "set", ns_if, "netns", ns)
        _run("ip", "addr", "add", f"{subnet}.1/24", "dev", host_if)
        _run("ip", "link", "set", host_if, "up")
        netns = f"--net=/var/run/netns/{ns}"
        _run("nsenter", netns, "ip", "addr", "add", f"{addr}/24", "dev", ns_if)
        _run("nsenter", netns, "ip", "link", "set", ns_if, "up")
        _run("nsenter", netns, "ip", "link", "set", "lo", "up")
        (data / "data").mkdir(parents=True)
        (data / "exec").mkdir()
        log = (tmp_path / "dockerd.log").open("wb")
        # nsenter, not `ip netns exec` (it remounts /sys; dockerd then stops: "Devices cgroup isn't mounted").
        proc = subprocess.Popen(
            ["nsenter", netns, "dockerd", "--data-root", str(data / "data"),
             "--exec-root", str(data / "exec"), "--pidfile", str(data / "dockerd.pid"),
             "-H", f"tcp://{addr}:2376", "--tlsverify",
             "--tlscacert", str(certs / "ca.pem"), "--tlscert", str(certs / "server-cert.pem"),
             "--tlskey", str(certs / "server-key.pem")],
            stdout=log, stderr=subprocess.STDOUT,
        )
        env = {"DOCKER_HOST": f"tcp://{addr}:2376", "DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": str(certs)}
        api_up = f"API listen on {addr}:2376"
        if not poll_until(lambda: api_up in (tmp_path / "dockerd.log").read_text(errors="replace")
                          or proc.poll() is not None, 60, 0.1):
            pytest.fail("the second dockerd did not listen within 60 s")
        if proc.poll() is not None:
            pytest.fail("the second dockerd stopped:\n" + (tmp_path / "dockerd.log").read_text()[-3000:])
        yield env
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        with contextlib.suppress(subprocess.CalledProcessError):
            _run("ip", "link", "del", host_if)
        with contextlib.suppress(subprocess.CalledProcessError):
            _run("ip", "netns", "del", ns)
        with contextlib.suppress(subprocess.CalledProcessError, FileNotFoundError):
            subprocess.run(["umount", "-R", str(data / "exec")], capture_output=True, timeout=30)
        shutil.rmtree(data, ignore_errors=True)


def test_a_tls_engine_in_another_namespace_is_reached_through_docker_host(
    remote_engine: dict[str, str], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DOCKER_HOST/DOCKER_TLS_VERIFY/DOCKER_CERT_PATH reach it even with a system-wide
    REQUESTS_CA_BUNDLE (which requests would otherwise prefer to the engine's ca.pem); the workers
    would be published on the engine host's address, and doctor says so."""
    for key, value in remote_engine.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    monkeypatch.setenv("CURL_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    rt = open_runtime(settings)
    try:
        addr = remote_engine["DOCKER_HOST"].removeprefix("tcp://").rsplit(":", 1)[0]
        assert rt.publish_host == addr
        assert rt.engine == f"{remote_engine['DOCKER_HOST']} (DOCKER_HOST)"
        assert rt.list_images("provisioner-worker") == []  # a different engine: none of ours
        checks = {c.name: c for c in doctor(settings, runtime=rt)}
        assert checks["docker engine"].status == "ok"
        assert remote_engine["DOCKER_HOST"] in checks["docker engine"].detail
        assert checks["publish address"].detail == f"workers are published on {addr}"
    finally:
        rt.close()
