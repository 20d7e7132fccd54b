"""Reproduce a dead published port (issue 14, item 7): the engine's userland forwarder of a
127.0.0.1 port (``docker-proxy``, one host process per published port, found by its arguments)
dies while the relay and workers run. A flood of ~10 000 connections does this by running it out of
file descriptors (tests/runtime/test_docker_health.py has that in the slow tier); killing the process
is the deterministic way to reach the same state. Needs the rights to signal the engine's processes
(root, as the engine's own tests run)."""

from __future__ import annotations

import socket
import time


def _arg(cmdline: list[str], flag: str) -> str | None:
    return cmdline[cmdline.index(flag) + 1] if flag in cmdline[:-1] else None


def forwarder_pid(port: int) -> int | None:
    """The pid of the docker-proxy serving 127.0.0.1:``port``, or None."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if (
            cmdline
            and cmdline[0].endswith("docker-proxy")
            and _arg(cmdline, "-host-port") == str(port)
            and _arg(cmdline, "-host-ip") == "127.0.0.1"
        ):
            return int(proc.pid)
    return None


def refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def kill_forwarder(port: int, deadline_s: float = 30.0) -> int:
    """SIGKILL the forwarder of 127.0.0.1:``port`` and wait until the port refuses; return its pid.

    Raises:
        AssertionError: no docker-proxy serves the port (the engine runs with ``userland-proxy``
            off, or in a VM), or this process may not signal it, or the port still accepts.
    """
    import psutil

    pid = forwarder_pid(port)
    if pid is None:
        raise AssertionError(
            f"no docker-proxy process serves 127.0.0.1:{port}: this engine does not forward loopback "
            "ports through its userland proxy (userland-proxy=false, or it runs in a VM), so this "
            "reproduction of a dead port cannot run here"
        )
    try:
        psutil.Process(pid).kill()
    except psutil.AccessDenied:
        raise AssertionError(
            f"may not signal docker-proxy (pid {pid}); run the engine tests as root"
        ) from None
    deadline = time.monotonic() + deadline_s
    while not refuses(port):
        assert time.monotonic() < deadline, f"127.0.0.1:{port} still accepts after its forwarder died"
        time.sleep(0.05)
    return pid
