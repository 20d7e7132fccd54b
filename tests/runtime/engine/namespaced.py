"""A second, real Docker engine in a network namespace of its own, reached over TCP with TLS
certificates made by trustme — the remote engine of the remote-engine tests and of
``benchmarks/bench_remote.py``.

Beside the first engine (one network namespace) the second engine's bridges are blocked by the
first engine's FORWARD rules, so it gets a namespace: a veth pair ``10.213.<n>.1`` (host) /
``10.213.<n>.2`` (namespace), dockerd started with ``nsenter --net=`` (``ip netns exec`` remounts
/sys and dockerd then stops with "Devices cgroup isn't mounted"). Needs root, ``ip``, ``nsenter``
and ``dockerd``. Everything it makes (dockerd, namespace, veth, directories) is removed on exit,
also when the block fails.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from provisioner._files import locked
from provisioner.runtime.engine import ContainerRuntime, DockerRuntime, open_runtime
from provisioner.runtime.polling import poll_until

TOOLS = ("ip", "nsenter", "dockerd")


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


SUBNET_LOCK = Path("/tmp/prov-remote-subnets.lock")


def _free_subnet(pid: int) -> str:
    """A ``10.213.<n>`` /24 that no interface on this machine has an address in (from ``pid % 250``
    on); call under :data:`SUBNET_LOCK` and add the address before letting it go."""
    listing = subprocess.run(["ip", "-o", "-4", "addr", "show"], check=True, capture_output=True, text=True,
                             timeout=60).stdout
    taken = {int(m) for m in re.findall(r"\binet 10\.213\.(\d+)\.", listing)}
    for step in range(250):
        n = (pid + step) % 250
        if n not in taken:
            return f"10.213.{n}"
    raise EngineFailed(f"every 10.213.<n>.0/24 (n < 250) is in use on this machine: {sorted(taken)}")


def missing_tools() -> str | None:
    """What this machine lacks to run a namespaced engine, or None."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing or os.geteuid() != 0:
        lacking = ", ".join(missing) or "root"
        return f"a namespaced engine needs root, ip, nsenter and dockerd (missing: {lacking})"
    return None


@dataclass
class RemoteEngine:
    """The second engine: the DOCKER_* variables that reach it (``env``), its address, the host
    side of the veth pair that is its only way in (cut it with :meth:`cut`, mend with :meth:`mend`)
    and how long dockerd took from start to serving its TLS socket (``start_s``)."""

    env: dict[str, str]
    addr: str
    host_if: str
    data: Path
    start_s: float

    def runtime(self, *, remote: bool = True) -> ContainerRuntime:
        """A runtime for it, made by open_runtime from these DOCKER_* variables (its images come
        from the local engine); ``remote=False``: one without that image source (builds there)."""
        from unittest import mock

        from provisioner.runtime.engine.docker import connect

        with mock.patch.dict(os.environ, self.env):
            if remote:
                return open_runtime()
            return DockerRuntime(connect(60.0), publish_host=self.addr, engine=self.env["DOCKER_HOST"],
                                 owns_client=True)

    @property
    def socket(self) -> Path:
        """Its Unix socket (what ``docker system dial-stdio`` over ssh reaches: see :func:`sshd`)."""
        return self.data / "docker.sock"

    def cut(self) -> None:
        _run("ip", "link", "set", self.host_if, "down")

    def mend(self) -> None:
        _run("ip", "link", "set", self.host_if, "up")


class EngineFailed(Exception):
    """The second dockerd did not come up (the message has its log's tail)."""


@contextlib.contextmanager
def namespaced_engine(workdir: Path) -> Iterator[RemoteEngine]:
    """dockerd in netns ``prov-remote-<pid>`` on ``tcp://10.213.<n>.2:2376`` (a free /24) with TLS
    (certificates under ``workdir``); stopped and removed with everything it made when the block ends.

    Raises:
        EngineFailed: dockerd stopped or did not listen within 60 s.
    """
    import time

    import trustme

    pid = os.getpid()
    ns, host_if, ns_if = f"prov-remote-{pid}", f"vprh{pid}"[:15], f"vprc{pid}"[:15]
    data = Path(f"/tmp/prov-remote-{pid}")  # short: dockerd's exec-root holds unix sockets
    certs = workdir / "certs"
    certs.mkdir(parents=True)
    proc: subprocess.Popen[bytes] | None = None
    log_path = workdir / "dockerd.log"
    try:
        # Several test runs on one machine (xdist workers, other checkouts) each make an engine:
        # each takes a /24 no other holds, chosen and claimed under one lock (pid % 250 collided).
        with locked(SUBNET_LOCK):
            subnet = _free_subnet(pid)
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
            _run("ip", "addr", "add", f"{subnet}.1/24", "dev", host_if)
        addr = f"{subnet}.2"
        ca = trustme.CA()
        server = ca.issue_cert(addr)
        client = ca.issue_cert("provisioner-test-client")
        ca.cert_pem.write_to_path(str(certs / "ca.pem"))
        server.private_key_pem.write_to_path(str(certs / "server-key.pem"))
        server.cert_chain_pems[0].write_to_path(str(certs / "server-cert.pem"))
        client.private_key_pem.write_to_path(str(certs / "key.pem"))
        client.cert_chain_pems[0].write_to_path(str(certs / "cert.pem"))
        _run("ip", "link", "set", ns_if, "netns", ns)
        _run("ip", "link", "set", host_if, "up")
        netns = f"--net=/var/run/netns/{ns}"
        _run("nsenter", netns, "ip", "addr", "add", f"{addr}/24", "dev", ns_if)
        _run("nsenter", netns, "ip", "link", "set", ns_if, "up")
        _run("nsenter", netns, "ip", "link", "set", "lo", "up")
        (data / "data").mkdir(parents=True)
        (data / "exec").mkdir()
        started = time.monotonic()
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                ["nsenter", netns, "dockerd", "--data-root", str(data / "data"),
                 "--exec-root", str(data / "exec"), "--pidfile", str(data / "dockerd.pid"),
                 "-H", f"tcp://{addr}:2376", "-H", f"unix://{data / 'docker.sock'}", "--tlsverify",
                 "--tlscacert", str(certs / "ca.pem"), "--tlscert", str(certs / "server-cert.pem"),
                 "--tlskey", str(certs / "server-key.pem")],
                stdout=log, stderr=subprocess.STDOUT,
            )
        env = {"DOCKER_HOST": f"tcp://{addr}:2376", "DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": str(certs)}
        api_up = f"API listen on {addr}:2376"
        running = proc
        listening = poll_until(
            lambda: api_up in log_path.read_text(errors="replace") or running.poll() is not None, 60, 0.05
        )
        start_s = time.monotonic() - started
        if not listening or proc.poll() is not None:
            raise EngineFailed("the second dockerd did not come up:\n" + log_path.read_text()[-3000:])
        yield RemoteEngine(env, addr, host_if, data, start_s)
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


def require(missing: Callable[[str], object]) -> None:
    """Call ``missing`` (the tests' prerequisite rule) when this machine cannot run the engine."""
    problem = missing_tools()
    if problem is not None:
        missing(problem)


@contextlib.contextmanager
def sshd(engine: RemoteEngine, workdir: Path) -> Iterator[dict[str, str]]:
    """Debian's sshd in the engine's namespace on ``ADDR:22``, admitting root with a key made here;
    ``MaxSessions 64`` (docs/containers.md: what an ``ssh://`` engine's sshd needs); its sessions
    get ``DOCKER_HOST`` = the engine's Unix socket (``SetEnv``), so docker-py's
    ``ssh://`` (``docker system dial-stdio`` on the far side) reaches the namespaced engine, not
    the first one (the namespace shares the host's files and docker CLI). Yields the variables a
    client process needs: ``DOCKER_HOST=ssh://root@ADDR`` and ``HOME`` (paramiko reads
    ``~/.ssh/config`` for the key and ``~/.ssh/known_hosts`` for the host key from there). Stopped
    when the block ends.

    Raises:
        EngineFailed: sshd is not installed (``apt-get install openssh-server``) or did not listen.
    """
    import socket

    if not Path("/usr/sbin/sshd").exists():
        raise EngineFailed("sshd is not installed (apt-get install openssh-server; bash .ci/setup does it)")
    folder = workdir / "sshd"
    home = workdir / "home"
    (home / ".ssh").mkdir(parents=True)
    folder.mkdir()
    for key in ("host_key", "client_key"):
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key, "-f", str(folder / key))
    (folder / "authorized_keys").write_text((folder / "client_key.pub").read_text())
    host_pub = (folder / "host_key.pub").read_text().split()
    (home / ".ssh" / "known_hosts").write_text(f"{engine.addr} {host_pub[0]} {host_pub[1]}\n")
    (home / ".ssh" / "config").write_text(f"Host {engine.addr}\n  IdentityFile {folder / 'client_key'}\n")
    config = folder / "sshd_config"
    config.write_text("\n".join([
        f"ListenAddress {engine.addr}", "Port 22", f"HostKey {folder / 'host_key'}",
        f"PidFile {folder / 'sshd.pid'}", f"AuthorizedKeysFile {folder / 'authorized_keys'}",
        "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "UsePAM no", "StrictModes no",
        # docker-py's paramiko transport opens a session per HTTP connection over one SSH
        # connection; sshd's default of 10 refuses provisioner's parallel calls (docs/containers.md).
        "MaxSessions 64", f"SetEnv DOCKER_HOST=unix://{engine.socket}", "",
    ]))
    Path("/run/sshd").mkdir(exist_ok=True)  # its privilege-separation directory
    netns = f"--net=/var/run/netns/prov-remote-{os.getpid()}"
    log_path = folder / "sshd.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(["nsenter", netns, "/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                                stdout=log, stderr=subprocess.STDOUT)

    def listening() -> bool:
        if proc.poll() is not None:
            return True
        try:
            with socket.create_connection((engine.addr, 22), timeout=1):
                return True
        except OSError:
            return False

    try:
        if not poll_until(listening, 30, 0.05) or proc.poll() is not None:
            raise EngineFailed("sshd did not listen:\n" + log_path.read_text()[-2000:])
        yield {"DOCKER_HOST": f"ssh://root@{engine.addr}", "HOME": str(home)}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
