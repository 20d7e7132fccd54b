"""accept(2) failures do not stop or spin a server: the Gemini stand-in and the in-process fake relay
back off while descriptors are exhausted (as the bridge servers do, one shared
:class:`provisioner._accept.AcceptBackoff`) and serve again afterwards."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from provisioner._accept import ACCEPT_BACKOFF_S
from provisioner.lm.standin import GeminiStandin
from provisioner.runtime.engine import inprocess
from provisioner.runtime.recipes import RELAY_SCRIPT, ContainerRecipe

from ._helpers import echo, tcp_listener


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
    return value


class _FailingListener:
    """A real listening socket whose next ``accept()`` calls raise the given errors first."""

    def __init__(self, sock: socket.socket, errors: list[int]) -> None:
        self._sock = sock
        self.errors = list(errors)
        self.attempts = 0

    def accept(self) -> tuple[socket.socket, Any]:
        self.attempts += 1
        if self.errors:
            code = self.errors.pop(0)
            raise OSError(code, os.strerror(code))
        return self._sock.accept()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _body() -> dict[str, Any]:
    return {"contents": [{"role": "user", "parts": [{"text": "hello"}]}]}


def _generate(url: str, key: str = "k") -> int:
    request = urllib.request.Request(
        f"{url}v1beta/models/gemini-2.5-flash:generateContent", data=json.dumps(_body()).encode(),
        method="POST", headers={"Content-Type": "application/json", "x-goog-api-key": key},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return int(response.status)


def test_the_standin_backs_off_while_out_of_descriptors_and_then_answers() -> None:
    """socketserver ignored the EMFILE and selected again at once: a 100 % CPU loop while the
    connection stayed queued. Now each failed accept waits, doubling from 10 ms, and the queued
    request is answered once accept works again."""
    with GeminiStandin(api_key="k") as standin:
        server = standin._server
        assert server is not None
        waits: list[float] = []
        stop_wait = server.backoff._wait
        server.backoff._wait = lambda s: (waits.append(s), stop_wait(s))
        failing = _FailingListener(server.socket, [errno.EMFILE] * 4 + [errno.ECONNABORTED])
        server.socket = failing  # type: ignore[assignment]
        assert _generate(standin.url) == 200
        assert failing.attempts == 6 and failing.errors == []
        assert waits == [ACCEPT_BACKOFF_S[0] * 2**i for i in range(4)]  # EMFILE waits; ECONNABORTED does not
        assert server.backoff.episodes == 1
        assert _generate(standin.url) == 200  # and the wait is reset: no episode, no wait
        assert len(waits) == 4


def test_the_standin_process_out_of_descriptors_warns_once_and_recovers(tmp_path: Path) -> None:
    """The real thing: ``provision standin gemini`` with RLIMIT_NOFILE at its open descriptors."""
    ready = tmp_path / "port"
    seen: list[bytes] = []
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("provision")), "standin", "gemini", "--port", "0",
         "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "GEMINI_API_KEY": "k"},
    )
    try:
        wait_until(lambda: ready.is_file() and ready.read_text().strip(), 60, "the stand-in's ready file")
        port = int(ready.read_text())
        ps = psutil.Process(proc.pid)
        old = ps.rlimit(psutil.RLIMIT_NOFILE)
        ps.rlimit(psutil.RLIMIT_NOFILE, (ps.num_fds(), old[1]))
        answered: list[int] = []
        caller = threading.Thread(target=lambda: answered.append(_generate(f"http://127.0.0.1:{port}/")))
        try:
            caller.start()
            # The request is queued; the stand-in cannot accept it and backs off (it says so once).
            wait_until(lambda: not answered and _stderr_has(proc, seen),
                       60, "the stand-in to warn that it is out of file descriptors")
        finally:
            ps.rlimit(psutil.RLIMIT_NOFILE, old)
        caller.join(timeout=120)
        assert answered == [200]
        assert _generate(f"http://127.0.0.1:{port}/") == 200
    finally:
        proc.terminate()
        try:
            _out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _out, err = proc.communicate()
    err = b"".join(seen) + (err or b"")
    assert err.count(b"out of file descriptors") == 1, err.decode(errors="replace")[-2000:]


def _stderr_has(proc: subprocess.Popen[bytes], seen: list[bytes]) -> bool:
    """Reads what the process wrote to stderr so far (non-blocking) and looks for the warning."""
    assert proc.stderr is not None
    os.set_blocking(proc.stderr.fileno(), False)
    chunk = proc.stderr.read()
    if chunk:
        seen.append(chunk)
    return b"out of file descriptors" in b"".join(seen)


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A loopback echo server (the relay's upstream)."""
    with tcp_listener(echo()) as port:
        yield port


def test_the_fake_relay_keeps_accepting_after_accept_errors(
    monkeypatch: pytest.MonkeyPatch, echo_port: int
) -> None:
    """Its accept loop returned on any OSError, so one EMFILE (or a peer's reset before accept)
    stopped that published port for good while everything else looked alive."""
    made: list[_FailingListener] = []
    real_create_server = socket.create_server

    def failing_server(*args: Any, **kwargs: Any) -> Any:
        made.append(_FailingListener(real_create_server(*args, **kwargs), [errno.EMFILE, errno.ECONNABORTED]))
        return made[-1]

    monkeypatch.setattr(inprocess.socket, "create_server", failing_server)
    recipe = ContainerRecipe(name="relay", role="relay", image="x", environment={}, labels={}, networks=(),
                             command=("python3", RELAY_SCRIPT, "9000=w0:1"))
    relay = inprocess.ServedRelay(recipe, lambda alias, port: echo_port)
    monkeypatch.undo()
    try:
        with socket.create_connection(("127.0.0.1", relay.ports[9000]), timeout=60) as client:
            client.settimeout(60)
            client.sendall(b"ping")
            assert client.recv(4) == b"ping"
        assert made[0].errors == [] and made[0].attempts >= 3
    finally:
        relay.stop()
